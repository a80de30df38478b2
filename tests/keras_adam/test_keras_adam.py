"""`tpu_embed_adam.keras.Adam`: TPU embedding Adam for sparse gradients, Keras Adam for dense."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tpu_embed_adam import AdamParameters, DynamicLearningRate, reference
from tpu_embed_adam.keras import Adam

_ROWS, _DIM = 12, 3


def _sparse_steps(rng, steps=3):
    """(ids, grads) per step: duplicates included, dyadic-free random floats."""
    return [
        (rng.integers(0, _ROWS // 2, 7), rng.normal(size=(7, _DIM)).astype(np.float32))
        for _ in range(steps)
    ]


@pytest.mark.parametrize(
    "params",
    [
        AdamParameters(0.05),
        AdamParameters(0.05, use_gradient_accumulation=False),
        AdamParameters(0.05, lazy_adam=False, clip_gradient_max=0.3, weight_decay_factor=0.01),
        tf.tpu.experimental.embedding.Adam(0.05, sum_inside_sqrt=False),
    ],
    ids=["default", "no_accumulation", "non_lazy_clipped_decayed", "tf2_adam"],
)
def test_sparse_gradients_step_by_tpu_adam_and_dense_by_keras_adam(params):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(_ROWS, _DIM)).astype(np.float32)
    table = tf.Variable(start)
    dense, keras_dense = (tf.Variable(np.ones([4], np.float32)) for _ in range(2))
    optimizer = Adam(params, learning_rate=0.01)
    keras_adam = tf.keras.optimizers.Adam(learning_rate=0.01)
    expected = (start, np.zeros_like(start), np.zeros_like(start))
    ours = optimizer.embedding_params
    for ids, grads in _sparse_steps(rng):
        dense_grad = tf.constant(rng.normal(size=4).astype(np.float32))
        sparse = tf.IndexedSlices(tf.constant(grads), tf.constant(ids), [_ROWS, _DIM])
        optimizer.apply_gradients([(sparse, table), (dense_grad, dense)])
        keras_adam.apply_gradients([(dense_grad, keras_dense)])
        expected = reference.adam_update(*expected, ids, grads, ours)
    np.testing.assert_array_equal(table.numpy(), expected[0])
    np.testing.assert_array_equal(optimizer._momentums[0].numpy(), expected[1])
    np.testing.assert_array_equal(optimizer._velocities[0].numpy(), expected[2])
    np.testing.assert_array_equal(dense.numpy(), keras_dense.numpy())


def test_model_fit_trains_embedding_layers_with_tpu_adam():
    """fit() on a model whose tables' gradients are dyadic: exact in any summation order."""
    batch, steps = 8, 4
    rng = np.random.default_rng(1)
    ids = {k: rng.integers(0, _ROWS // 2, batch * steps) for k in ("item", "history")}
    signs = rng.choice([-1.0, 1.0], batch * steps).astype(np.float32)
    mix = np.array([0.5, -0.25, 1.0], np.float32)

    items = tf.keras.layers.Embedding(_ROWS, _DIM, name="items")
    inputs = {k: tf.keras.Input([], dtype=tf.int64, name=k) for k in ids}
    # Both inputs share the table: its gradient is the union of their rows.
    summed = items(inputs["item"]) + items(inputs["history"])
    output = tf.reduce_sum(summed * mix, axis=1)
    model = tf.keras.Model(inputs, output)
    start = items.embeddings.numpy()
    params = AdamParameters(0.05)
    model.compile(optimizer=Adam(params), loss=lambda y, p: y * p)
    model.fit(ids, signs, batch_size=batch, epochs=1, shuffle=False, verbose=0)

    expected = (start, np.zeros_like(start), np.zeros_like(start))
    for s in range(steps):
        rows = slice(s * batch, (s + 1) * batch)
        # Loss mean over the batch: each sample's row gradient is sign * mix / batch.
        grads = (signs[rows, None] * mix / batch).astype(np.float32)
        step_ids = np.concatenate([ids["item"][rows], ids["history"][rows]])
        expected = reference.adam_update(
            *expected, step_ids, np.concatenate([grads, grads]), params
        )
    np.testing.assert_array_equal(items.embeddings.numpy(), expected[0])
    untouched = np.setdiff1d(np.arange(_ROWS), np.concatenate(list(ids.values())))
    np.testing.assert_array_equal(items.embeddings.numpy()[untouched], start[untouched])


def test_embedding_learning_rate_schedule_is_read_each_step():
    schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.1, 0.01])
    optimizer = Adam(AdamParameters(DynamicLearningRate(0)), embedding_learning_rate=schedule)
    rng = np.random.default_rng(2)
    start = rng.normal(size=(_ROWS, _DIM)).astype(np.float32)
    table = tf.Variable(start)
    expected = (start, np.zeros_like(start), np.zeros_like(start))
    params = AdamParameters(1.0)
    for step, (ids, grads) in enumerate(_sparse_steps(rng)):
        sparse = tf.IndexedSlices(tf.constant(grads), tf.constant(ids), [_ROWS, _DIM])
        optimizer.apply_gradients([(sparse, table)])
        rate = 0.1 if step <= 1 else 0.01
        expected = reference.adam_update(*expected, ids, grads, params, learning_rate=rate)
    np.testing.assert_array_equal(table.numpy(), expected[0])


def test_config_round_trip():
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    optimizer = Adam(
        AdamParameters(DynamicLearningRate(3), beta2=0.99),
        learning_rate=0.002,
        embedding_learning_rate=schedule,
    )
    again = Adam.from_config(optimizer.get_config())
    assert again.embedding_params == optimizer.embedding_params
    assert again._embedding_learning_rate.get_config() == schedule.get_config()
    assert float(again.learning_rate) == pytest.approx(0.002)
    assert tf.keras.optimizers.deserialize(
        tf.keras.optimizers.serialize(optimizer)
    ).embedding_params == (optimizer.embedding_params)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dynamic learning rate"):
        Adam(AdamParameters(DynamicLearningRate(0)))
    with pytest.raises(TypeError, match="embedding_learning_rate"):
        Adam(AdamParameters(0.1), embedding_learning_rate=lambda: 0.1)
    with pytest.raises(TypeError, match="AdamParameters"):
        Adam(0.1)
