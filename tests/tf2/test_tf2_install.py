"""install(): TF2's own `TPUEmbedding` trains on CPU; uninstall() restores TF's methods."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from _tf2_helpers import E, feature, numpy_state, table
from tensorflow.python.tpu import tpu_embedding_v2

import tpu_embed_adam
from tpu_embed_adam.tf2 import _embedding

_METHODS = ("build", "enqueue", "dequeue", "apply_gradients")


def _config():
    t = table("t", 12, 3)
    return {"a": feature(t, "a"), "b": feature(t, "b")}


def _steps(embedding, steps=3):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        features = {
            "a": tf.constant(rng.integers(0, 12, 5)),
            "b": tf.constant(rng.integers(0, 12, 5)),
        }
        embedding.enqueue(features, training=True)
        with tf.GradientTape() as tape:
            activations = embedding.dequeue()
            tape.watch(activations)
            loss = tf.reduce_sum(activations["a"] * activations["b"])
        embedding.apply_gradients(tape.gradient(loss, activations))


@pytest.fixture
def installed():
    with tpu_embed_adam.installed():
        yield


def test_installed_tf_class_trains_as_ours(installed):
    theirs = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.Adam(0.1))
    assert type(theirs) is tpu_embedding_v2.TPUEmbedding
    ours = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    _steps(theirs)
    _steps(ours)
    for a, b in zip(numpy_state(theirs, "t"), numpy_state(ours, "t"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.any(numpy_state(theirs, "t")[1] != 0)


def test_uninstall_restores_tfs_methods_and_errors():
    originals = {name: tpu_embedding_v2.TPUEmbedding.__dict__[name] for name in _METHODS}
    init = tpu_embedding_v2.TPUEmbedding.__init__
    with tpu_embed_adam.installed():
        for name in _METHODS:
            assert tpu_embedding_v2.TPUEmbedding.__dict__[name] is not originals[name]
        assert tpu_embedding_v2.TPUEmbedding.__init__ is init  # TF's constructor stays
    for name in _METHODS:
        assert tpu_embedding_v2.TPUEmbedding.__dict__[name] is originals[name]
    embedding = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.Adam(0.1))
    with pytest.raises(RuntimeError, match="not created under a TPUStrategy"):
        embedding.enqueue({"a": tf.constant([1]), "b": tf.constant([2])})


@pytest.mark.parametrize("method", _METHODS)
def test_under_a_tpu_strategy_every_method_is_tfs(installed, monkeypatch, method):
    calls = []
    monkeypatch.setitem(
        _embedding._TF_METHODS, method, lambda self, *args: calls.append((method, args))
    )
    embedding = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.Adam(0.1))
    embedding._using_tpu = True  # as TF's constructor sets it under a TPUStrategy
    arguments = {"build": (), "enqueue": ({},), "dequeue": (), "apply_gradients": ({},)}
    getattr(embedding, method)(*arguments[method])
    assert [c[0] for c in calls] == [method]
    assert not hasattr(embedding, "_tpu_embed_adam_cpu")  # no CPU state made


def test_installed_tf_class_with_sgd_serves_but_refuses_training(installed):
    embedding = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.SGD(0.1))
    features = {"a": tf.constant([1, 2]), "b": tf.constant([3, 4])}
    embedding.enqueue(features, training=False)
    activations = embedding.dequeue()
    tables = {t.name: v.numpy() for t, v in embedding.embedding_tables.items()}
    np.testing.assert_array_equal(activations["a"].numpy(), tables["t"][[1, 2]])
    with pytest.raises(ValueError, match="optimizer SGD.*embedding.Adam"):
        embedding.enqueue(features, training=True)


def test_installed_is_idempotent_and_nests(installed):
    tpu_embed_adam.install()
    with tpu_embed_adam.installed():
        pass
    assert (
        tpu_embedding_v2.TPUEmbedding.__dict__["enqueue"]
        is tpu_embed_adam.TPUEmbedding.__dict__["enqueue"]
    )


def test_import_alone_leaves_tfs_class_alone():
    code = (
        "import tensorflow as tf, tpu_embed_adam\n"
        "from tensorflow.python.tpu import tpu_embedding_v2 as v2\n"
        "assert v2.TPUEmbedding.enqueue.__module__ == v2.__name__\n"
        "print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "clean"
