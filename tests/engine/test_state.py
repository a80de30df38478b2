"""`engine.info`, `tables` and `reset`: this process's engine (eagerly where they can,
through a session where eager execution is off), and the checks of a worker's.

Reading a worker's engine through a running cluster is tested with the
cluster, in tests/cluster/test_local.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tensorflow as tf
from harness_raw_ops import adam_params, embedding_config

from tpu_embed_adam import _library, engine

pytestmark = pytest.mark.skipif(_library.load_library() is None, reason="kernel library not built")

CONFIG = embedding_config([("a", 10, 4, adam_params())], [(0, [2])])


def test_info_names_the_process_that_holds_the_engine():
    assert engine.info()["pid"] == os.getpid()
    assert engine.info(None, None)["pid"] == os.getpid()


def test_inside_a_graph_they_run_eagerly_and_add_no_op(clean_engine):
    tf.raw_ops.ConfigureTPUEmbedding(config=CONFIG)
    outside = engine.info()
    assert outside["configured"] and [t["name"] for t in outside["tables"]] == ["a"]
    with tf.Graph().as_default() as graph:
        assert engine.info() == outside
        engine.reset()
        assert graph.get_operations() == []
    assert not engine.info()["configured"]


def test_with_eager_execution_disabled_they_run_in_a_session():
    code = f"""
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
from tpu_embed_adam import engine
with tf.compat.v1.Session() as sess:
    sess.run(tf.raw_ops.ConfigureTPUEmbedding(config={CONFIG!r}))
info = engine.info()
assert info["configured"] and info["tables"][0]["name"] == "a", info
engine.reset()
assert not engine.info()["configured"]
print("done")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "done"


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
