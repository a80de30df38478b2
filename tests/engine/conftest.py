"""Fixtures of the tests that call TF's TPU embedding ops directly (`test_engine_*.py`).

Every test of those files runs on a `clean_engine` and is skipped when the
kernel library is not built; the marks are added here, once.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness_raw_ops import adam_params, embedding_config, load_all, random_slots

from tpu_embed_adam import _library, engine


def _raw_op_test(path) -> bool:
    return path.name.startswith("test_engine_")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _library.load_library() is None:
        for item in items:
            if _raw_op_test(item.path):
                item.add_marker(pytest.mark.skip(reason="kernel library not built"))


@pytest.fixture(autouse=True)
def _raw_op_tests_start_clean(request: pytest.FixtureRequest) -> None:
    if _raw_op_test(request.node.path):
        request.getfixturevalue("clean_engine")


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
