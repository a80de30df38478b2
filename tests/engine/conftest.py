"""Fixtures of the tests that call TF's TPU embedding ops directly
(`test_engine_*.py`, which ask for `clean_engine` in their `pytestmark`)."""

from __future__ import annotations

import numpy as np
import pytest
from tpu_embedding_harness import adam_params, embedding_config, load_all, random_slots

from tpu_embed_adam import engine


@pytest.fixture
def clean_engine(monkeypatch: pytest.MonkeyPatch):
    """An empty engine before and after the test; Recv waits 1 ms for a batch."""
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "1")
    engine.reset()
    yield
    engine.reset()


@pytest.fixture
def loaded(clean_engine) -> bytes:
    """Two tables, "a" (10 x 4) and "b" (6 x 2), loaded on two hosts; returns the config."""
    cfg = embedding_config(
        [("a", 10, 4, adam_params()), ("b", 6, 2, adam_params())], [(0, [2]), (1, [2])],
        num_hosts=2,
    )
    rng = np.random.default_rng(6)
    load_all(cfg, "a", random_slots(rng, 10, 4), 2, False)
    load_all(b"", "b", random_slots(rng, 6, 2), 2, False)
    return cfg
