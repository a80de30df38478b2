"""Checkpoints: ours write what TF's class writes, and go both ways with TF's classes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from _tf2_helpers import E, feature, numpy_state, table
from tensorflow.core.protobuf import trackable_object_graph_pb2

import tpu_embed_adam

_TABLES = ("users", "items")


def _config():
    users = table("users", 20, 4)
    items = table("items", 15, 3, combiner="sum", optimizer=E.Adam(0.3, lazy_adam=False))
    return {
        "user": feature(users, "user"),
        "item": feature(items, "item"),
        "seq": feature(items, "seq", max_sequence_length=2),
    }


def _features(rng):
    lengths = rng.integers(0, 4, 6)
    return {
        "user": tf.constant(rng.integers(0, 20, 6)),
        "item": tf.RaggedTensor.from_row_lengths(rng.integers(0, 15, lengths.sum()), lengths),
        "seq": tf.RaggedTensor.from_row_lengths(rng.integers(0, 15, lengths.sum()), lengths),
    }


def _train(embedding, rng, steps):
    for _ in range(steps):
        embedding.enqueue(_features(rng), training=True)
        with tf.GradientTape() as tape:
            activations = embedding.dequeue()
            tape.watch(activations)
            loss = sum(tf.reduce_sum(tf.square(a)) for a in activations.values())
        embedding.apply_gradients(tape.gradient(loss, activations))


def _object_graph(path):
    reader = tf.train.load_checkpoint(path)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph, sorted(reader.get_variable_to_shape_map().items())


def _state(embedding):
    return {name: numpy_state(embedding, name) for name in _TABLES}


def _assert_same(a, b):
    for name in _TABLES:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture
def trained(tmp_path):
    """Ours after two steps, and its checkpoint."""
    embedding = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    _train(embedding, np.random.default_rng(0), 2)
    return embedding, tf.train.Checkpoint(embedding=embedding).save(str(tmp_path / "ours"))


def test_keys_and_object_graph_are_tfs(trained, tmp_path):
    _, path = trained
    theirs = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.Adam(0.1))
    theirs.build()
    their_path = tf.train.Checkpoint(embedding=theirs).save(str(tmp_path / "theirs"))
    ours_graph, ours_keys = _object_graph(path)
    assert (ours_graph, ours_keys) == _object_graph(their_path)
    names = {key for key, _ in ours_keys}
    for name in _TABLES:
        assert f"embedding/{name}/.ATTRIBUTES/VARIABLE_VALUE" in names
        assert f"embedding/{name}.Smomenta/.ATTRIBUTES/VARIABLE_VALUE" in names
        assert f"embedding/{name}.Svelocities/.ATTRIBUTES/VARIABLE_VALUE" in names
    savers = [n.registered_saver.name for n in ours_graph.nodes if n.registered_saver.name]
    assert savers == ["tf.TPUEmbeddingCallback"]


def test_ours_restores_into_tfs_serving_class_and_serves_our_lookups(trained):
    ours, path = trained
    serving = tf.tpu.experimental.embedding.TPUEmbeddingForServing(_config(), E.Adam(0.1))
    status = tf.train.Checkpoint(embedding=serving).restore(path)
    serving.build()  # restores as it creates the variables
    status.assert_consumed()
    features = _features(np.random.default_rng(9))
    ours.enqueue(features, training=False)
    expected = ours.dequeue()
    served = serving.embedding_lookup(features)
    for name in ("user", "item"):
        np.testing.assert_array_equal(served[name].numpy(), expected[name].numpy())
    np.testing.assert_array_equal(served["seq"].numpy(), expected["seq"].numpy())
    slim = tf.tpu.experimental.embedding.TPUEmbeddingForServing(_config(), optimizer=None)
    tf.train.Checkpoint(embedding=slim).restore(path).expect_partial()
    for config, variable in slim.embedding_tables.items():
        np.testing.assert_array_equal(variable.numpy(), numpy_state(ours, config.name)[0])


def test_ours_and_tfs_cpu_class_restore_each_other(trained, tmp_path):
    ours, path = trained
    theirs = tf.tpu.experimental.embedding.TPUEmbedding(_config(), E.Adam(0.1))
    theirs.build()
    tf.train.Checkpoint(embedding=theirs).restore(path).assert_consumed()
    _assert_same(_state(theirs), _state(ours))
    for variables in theirs._variables.values():
        for variable in variables.values():
            variable.assign(variable * 0.5 + 0.25)
    their_path = tf.train.Checkpoint(embedding=theirs).save(str(tmp_path / "theirs"))
    again = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    again.build()
    tf.train.Checkpoint(embedding=again).restore(their_path).assert_consumed()
    _assert_same(_state(again), _state(theirs))


def test_restore_and_continue_equals_an_uninterrupted_run(trained, tmp_path):
    ours, path = trained
    _train(ours, np.random.default_rng(1), 3)
    # Restored before its first enqueue builds it (TF's deferred restoration).
    resumed = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    status = tf.train.Checkpoint(embedding=resumed).restore(path)
    _train(resumed, np.random.default_rng(1), 3)
    status.assert_consumed()
    _assert_same(_state(resumed), _state(ours))


def test_serving_saved_model_from_our_checkpoint(trained, tmp_path):
    ours, path = trained
    serving = tf.tpu.experimental.embedding.TPUEmbeddingForServing(_config(), optimizer=None)
    tf.train.Checkpoint(embedding=serving).restore(path).expect_partial()
    module = tf.Module()
    module.embedding = serving
    ragged = tf.RaggedTensorSpec([None, None], tf.int64, 1, tf.int64)
    # dict(): TF returns feature_config's tracking wrapper, which a
    # tf.function cannot return (with typing_extensions >= 4.6).
    module.serve = tf.function(
        lambda features: dict(serving.embedding_lookup(features)),
        input_signature=[{"user": tf.TensorSpec([None], tf.int64), "item": ragged, "seq": ragged}],
    )
    tf.saved_model.save(module, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    features = _features(np.random.default_rng(2))
    served = loaded.serve(features)
    ours.enqueue(features, training=False)
    for name, activations in ours.dequeue().items():
        np.testing.assert_array_equal(served[name].numpy(), activations.numpy())


def test_tfs_serving_class_restores_into_ours(tmp_path):
    serving = tf.tpu.experimental.embedding.TPUEmbeddingForServing(_config(), E.Adam(0.1))
    serving.build()
    for variables in serving._variables.values():
        for variable in variables.values():
            variable.assign(tf.random.stateless_normal(variable.shape, [1, 2]))
    path = tf.train.Checkpoint(embedding=serving).save(str(tmp_path / "serving"))
    ours = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    ours.build()
    tf.train.Checkpoint(embedding=ours).restore(path).assert_consumed()
    _assert_same(_state(ours), _state(serving))
