"""The harness's numpy model against TF's CPU embedding ops (no engine needed).

The graph tests trust `harness_numpy_model.NumpyModel` as their oracle; here
its lookup is checked against `tf.nn.embedding_lookup_sparse` and its
per-id gradient rows against TF's autodiff of that lookup, for every
combiner, with and without weights and sample indices.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_cluster import JOB
from harness_numpy_model import FeatureInput, NumpyModel, Slots, random_batch, random_targets
from harness_sharding import join_table, split_table
from tensorflow.python.tpu import tpu_embedding as te


def make_embedding(combiner: str) -> te.TPUEmbedding:
    return te.TPUEmbedding(
        {"t": te.TableConfig(vocabulary_size=9, dimension=3, combiner=combiner)},
        {"a": te.FeatureConfig("t"), "b": te.FeatureConfig("t"), "c": te.FeatureConfig("t")},
        batch_size=10,
        mode=te.TRAINING,
        optimization_parameters=te.AdamParameters(0.1),
        device_config=te.DeviceConfig(1, 2, JOB),
    )


def tf_lookup(table: tf.Variable, x: FeatureInput, batch: int, combiner: str) -> tf.Tensor:
    indices = x.sample_indices
    if indices is None:
        indices = np.stack([np.arange(len(x.ids)), np.zeros(len(x.ids), np.int64)], 1)
    sp_ids = tf.SparseTensor(indices, x.ids, [batch, 4])
    sp_weights = None if x.weights is None else tf.SparseTensor(indices, x.weights, [batch, 4])
    return tf.nn.embedding_lookup_sparse(table, sp_ids, sp_weights, combiner=combiner)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_lookup_and_gradient_rows_match_tf(combiner):
    emb = make_embedding(combiner)
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(9, 3)).astype(np.float32)
    state = {"t": Slots(w0, np.zeros_like(w0), np.zeros_like(w0))}
    model = NumpyModel(emb, state)
    batch = random_batch(rng, emb, weighted=("b",), one_id_per_sample=("c",))
    targets = random_targets(rng, emb)
    acts, loss, ids, grads = model.forward_backward(batch, targets)

    table = tf.Variable(w0)
    with tf.GradientTape() as tape:
        tf_loss = 0.0
        for core, target, act in zip(batch, targets, acts, strict=True):
            for feature, x in core.items():
                got = tf_lookup(table, x, emb.batch_size_per_core, combiner)
                np.testing.assert_allclose(act[feature], got.numpy(), rtol=1e-6, atol=1e-6)
                tf_loss += 0.5 * tf.reduce_sum(tf.square(got - target[feature]))
    np.testing.assert_allclose(loss, tf_loss.numpy(), rtol=1e-5)
    want = tf.convert_to_tensor(tape.gradient(tf_loss, table)).numpy()
    dense = np.zeros_like(w0)
    np.add.at(dense, ids["t"], grads["t"])
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["div", "mod"])
@pytest.mark.parametrize("vocab, hosts", [(13, 5), (13, 1), (2, 3), (6, 3)])
def test_split_and_join_invert_and_match_tf_part_sizes(strategy, vocab, hosts):
    full = np.arange(vocab * 2, dtype=np.float32).reshape(vocab, 2)
    parts = split_table(full, hosts, strategy)
    n = min(vocab, hosts)
    assert [len(p) for p in parts] == [vocab // n + (i < vocab % n) for i in range(n)]
    np.testing.assert_array_equal(join_table(parts, vocab, strategy), full)
    if strategy == "mod":
        assert all(p[0, 0] == 2 * i for i, p in enumerate(parts))


def test_mean_of_weights_summing_below_zero_divides_as_tf():
    """TF (div_no_nan) and the engine (engine/batch.cc) divide by any nonzero sum.

    The model gave such a sample a zero activation: the random batches' weights
    are positive, so no test met it, but an oracle must not differ there.
    """
    emb = make_embedding("mean")
    w0 = np.random.default_rng(2).normal(size=(9, 3)).astype(np.float32)
    model = NumpyModel(emb, {"t": Slots(w0, w0 * 0, w0 * 0)})
    x = FeatureInput(
        np.array([1, 2, 3, 4], np.int64),
        np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.int64),
        np.array([-1.0, -2.0, 0.5, -0.5], np.float32),
    )
    got = model.activations({f: x for f in emb.feature_to_config_dict})["a"]
    want = tf_lookup(tf.constant(w0), x, emb.batch_size_per_core, "mean").numpy()
    # TF's lookup stops at the last sample with ids; the model covers the batch.
    np.testing.assert_allclose(got[: len(want)], want, rtol=1e-6, atol=1e-6)
    assert got[0].any() and not got[len(want) :].any()
