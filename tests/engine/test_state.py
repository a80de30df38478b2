"""`engine.info` and `engine.tables`: this process's engine, and the checks of a worker's.

Reading a worker's engine through a running cluster is tested with the
cluster, in tests/cluster/test_local.py.
"""

from __future__ import annotations

import os

import pytest

from tpu_embed_adam import engine
from tpu_embed_adam.ops import loader

pytestmark = pytest.mark.skipif(loader.load_library() is None, reason="kernel library not built")


def test_info_names_the_process_that_holds_the_engine():
    assert engine.info()["pid"] == os.getpid()
    assert engine.info(None, None)["pid"] == os.getpid()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target": "grpc://localhost:2222"}, ValueError, "Argument `task` is missing"),
        ({"task": 0}, ValueError, "Argument `target` is missing"),
        ({"target": "grpc://localhost:2222", "task": -1}, ValueError, "Argument `task` must be"),
        ({"target": "grpc://localhost:2222", "task": "0"}, TypeError, "Argument `task` must be"),
        ({"target": "grpc://localhost:2222", "task": True}, TypeError, "Argument `task` must be"),
        ({"target": b"grpc://localhost:2222", "task": 0}, TypeError, "Argument `target` must"),
        ({"target": "", "task": 0}, ValueError, "Argument `target` must"),
    ],
)
def test_a_workers_engine_needs_a_target_and_a_task(kwargs, error, message):
    with pytest.raises(error, match=message):
        engine.info(**kwargs)
    with pytest.raises(error, match=message):
        engine.tables(**kwargs)
