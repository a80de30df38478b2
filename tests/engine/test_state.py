"""`engine.info()` / `reset()`: eagerly where they can, through a session where eager is off."""

from __future__ import annotations

import subprocess
import sys

import tensorflow as tf
from tpu_embedding_harness import adam_params, embedding_config

from tpu_embed_adam import engine

CONFIG = embedding_config([("a", 10, 4, adam_params())], [(0, [2])])


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
