"""A `Saver` save of tables the engine trained since their last retrieve logs one warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph
from harness_numpy_model import random_targets
from tensorflow.python.tpu import tpu_embedding as te
from tensorflow.python.training import saver as tf_saver

import tpu_embed_adam  # noqa: F401  (loads the kernel library; turns the check on)
from tpu_embed_adam import engine

TABLES = {
    "users": te.TableConfig(vocabulary_size=13, dimension=4),
    "items": te.TableConfig(vocabulary_size=8, dimension=3),
}
FEATURES = {"user": te.FeatureConfig("users"), "item": te.FeatureConfig("items")}


@pytest.fixture(autouse=True)
def fresh_engine():
    engine.reset()
    yield
    engine.reset()


@pytest.fixture
def graph():
    """TF's TPUEmbedding graph (one host), initialised and loaded."""
    graph = EmbeddingGraph(
        TABLES, FEATURES, optimization_parameters=te.AdamParameters(0.05), local=True
    )
    graph.run_init()
    graph.load()
    yield graph
    graph.close()


def _train(graph: EmbeddingGraph, steps: int = 1) -> None:
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), step)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "Saver.save" in r.getMessage()]


def test_trained_then_saved_without_retrieve_warns_once_naming_the_tables(
    graph, tmp_path, caplog
):
    _train(graph, steps=2)
    assert engine.unretrieved_tables() == {"items": 2, "users": 2}
    with caplog.at_level(logging.WARNING):
        graph.save(str(tmp_path / "ckpt"))
    [message] = _warnings(caplog)
    assert "'items' (2 steps), 'users' (2 steps)" in message
    assert "retrieve_ops()" in message and "RetrievingSaver" in message
    # The warning is the truth: the checkpoint holds the tables as loaded.
    loaded = graph.read()
    assert not np.array_equal(graph.retrieve()["users"].w, loaded["users"].w)


def test_no_warning_after_retrieve(graph, tmp_path, caplog):
    _train(graph)
    graph.retrieve()
    assert engine.unretrieved_tables() == {}
    with caplog.at_level(logging.WARNING):
        graph.save(str(tmp_path / "ckpt"))
    assert _warnings(caplog) == []


def test_no_warning_from_retrieving_saver(graph, tmp_path, caplog):
    with graph.graph.as_default():
        retrieving = engine.RetrievingSaver(graph.retrieve_ops)
    _train(graph)
    with caplog.at_level(logging.WARNING), graph.graph.as_default():
        retrieving.save(graph.session, str(tmp_path / "ckpt"))
    assert _warnings(caplog) == []
    assert engine.unretrieved_tables() == {}
    # Never checked, whatever it retrieves: with training in another thread a
    # step may land between its retrieve and its save.
    with graph.graph.as_default():
        retrieving_nothing = engine.RetrievingSaver([])
    _train(graph)
    with caplog.at_level(logging.WARNING), graph.graph.as_default():
        retrieving_nothing.save(graph.session, str(tmp_path / "ckpt2"))
    assert _warnings(caplog) == []
    assert engine.unretrieved_tables() == {"items": 1, "users": 1}


def test_no_warning_without_engine_state(tmp_path, caplog):
    with tf.Graph().as_default():
        tf.compat.v1.Variable([1.0, 2.0], name="w")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            with caplog.at_level(logging.WARNING):
                saver.save(sess, str(tmp_path / "ckpt"))
    assert _warnings(caplog) == []


def test_turning_it_off_restores_tfs_own_save(graph, tmp_path, caplog):
    checked = tf_saver.Saver.save
    original = checked.__wrapped__
    _train(graph)
    try:
        engine.warn_unretrieved_saves(False)
        assert tf_saver.Saver.save is original
        engine.warn_unretrieved_saves(False)  # idempotent
        with caplog.at_level(logging.WARNING):
            graph.save(str(tmp_path / "off"))
        assert _warnings(caplog) == []
    finally:
        engine.warn_unretrieved_saves()
    assert tf_saver.Saver.save.__wrapped__ is original
    engine.warn_unretrieved_saves()  # idempotent: wraps once
    assert tf_saver.Saver.save.__wrapped__ is original
    with caplog.at_level(logging.WARNING):
        graph.save(str(tmp_path / "on"))
    assert len(_warnings(caplog)) == 1


def test_enabled_must_be_a_bool():
    with pytest.raises(TypeError, match="`enabled` must be a bool, got 0"):
        engine.warn_unretrieved_saves(0)  # type: ignore[arg-type]


def test_works_with_eager_execution_disabled(tmp_path):
    # TF1 programs: the check reads the engine through a throwaway session.
    code = f"""
import numpy as np, tensorflow as tf
tf.compat.v1.disable_eager_execution()
import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import tpu_embed_adam
from harness_graph import EmbeddingGraph
from harness_numpy_model import random_targets
from absl import logging
from tensorflow.python.tpu import tpu_embedding as te
tables = {{"users": te.TableConfig(vocabulary_size=13, dimension=4)}}
graph = EmbeddingGraph(tables, {{"user": te.FeatureConfig("users")}},
    optimization_parameters=te.AdamParameters(0.05), local=True)
graph.run_init(); graph.load()
rng = np.random.default_rng(0)
graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), 1)
graph.save({str(tmp_path / "ckpt")!r})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Saver.save: the TPU embedding engine trained 'users' (1 steps)" in out.stderr


def _write(ckpt, path: str, session) -> None:
    with session.as_default():
        ckpt.write(path)


@pytest.mark.parametrize(
    "make,what",
    [
        (tf.compat.v1.train.Checkpoint, "tf.compat.v1.train.Checkpoint"),
        (tf.train.Checkpoint, "tf.train.Checkpoint"),
    ],
)
def test_an_object_checkpoint_of_unretrieved_tables_warns_too(graph, tmp_path, caplog, make, what):
    _train(graph)
    with graph.graph.as_default():
        ckpt = make(users=graph.vars.embedding_variables_by_table["users"][0])
        with caplog.at_level(logging.WARNING):
            _write(ckpt, str(tmp_path / "ckpt"), graph.session)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in messages if m.startswith(f"{what}: the TPU embedding engine trained")]
    graph.retrieve()
    caplog.clear()
    with graph.graph.as_default(), caplog.at_level(logging.WARNING):
        _write(ckpt, str(tmp_path / "ckpt2"), graph.session)
    assert not [r for r in caplog.records if "TPU embedding engine" in r.getMessage()]
