"""Training with TF2's API on CPU: every Adam option, bit for bit against `reference.adam_update`.

Two tables, three features: a dense feature on "users"; a sparse feature
and a weighted ragged feature sharing "items" (combiner mean), whose ids'
gradients are summed per row as on a TPU. The loss is sum(activations * C)
for a constant C per step, so the activations' gradient is C exactly and
the ids' gradients follow in float32 (the weights are dyadic, so their sums
are exact): the expected tables and slots are `reference.adam_update` of
each table, its features' ids and gradients concatenated in the order of
`nest.flatten(feature_config)` (a dict's keys sorted).
The loop runs as TF's docstring writes it (tf.function, tf.range,
strategy.run) under the default strategy and a OneDeviceStrategy, and
eagerly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from _tf2_helpers import E, feature, numpy_state, reference_step, table

import tpu_embed_adam
from tpu_embed_adam import AdamParameters

_B = 8
_USERS, _ITEMS, _DIM = 24, 16, 4


def _config(items_optimizer: Any = None) -> dict[str, Any]:
    users = table("users", _USERS, _DIM)
    items = table("items", _ITEMS, _DIM, combiner="mean", optimizer=items_optimizer)
    return {
        "user": feature(users, "user"),
        "item": feature(items, "item"),
        "history": feature(items, "history"),
    }


def _batch(rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """Features, weights (history only) and the loss's constants C, per feature."""
    user = rng.integers(0, _USERS, _B)
    mask = rng.random((_B, 3)) < 0.6
    indices = np.argwhere(mask)
    item = tf.SparseTensor(indices, rng.integers(0, _ITEMS // 2, len(indices)), [_B, 3])
    lengths = rng.integers(0, 4, _B)
    history = tf.RaggedTensor.from_row_lengths(rng.integers(0, _ITEMS // 2, lengths.sum()), lengths)
    weights = history.with_values(
        tf.constant(rng.choice([0.25, 0.5, 1.0, 2.0], lengths.sum()).astype(np.float32))
    )
    constants = {
        k: rng.normal(size=(_B, _DIM)).astype(np.float32) for k in ("user", "item", "history")
    }
    return (
        {"user": tf.constant(user), "item": item, "history": history},
        {"user": None, "item": None, "history": weights},
        constants,
    )


def _mean_gradients(upstream: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The "mean" combiner's id gradients: (upstream / the row's weight sum)[row] * weight."""
    sums = np.zeros(len(upstream), np.float32)
    np.add.at(sums, rows, weights)  # dyadic weights: exact in any order
    scaled = np.divide(
        upstream, sums[:, None], out=np.zeros_like(upstream), where=sums[:, None] != 0
    )
    return scaled[rows] * weights[:, None]


def _id_gradients(features: dict, weights: dict, constants: dict) -> dict[str, tuple]:
    """Each feature's (ids, gradients), as docs/tf2.md states them, in numpy float32."""
    item, history, w = features["item"], features["history"], weights["history"]
    item_rows = item.indices.numpy()[:, 0]
    return {
        "user": (features["user"].numpy(), constants["user"]),
        "item": (
            item.values.numpy(),
            _mean_gradients(constants["item"], item_rows, np.ones(len(item_rows), np.float32)),
        ),
        "history": (
            history.values.numpy(),
            _mean_gradients(constants["history"], history.value_rowids().numpy(), w.values.numpy()),
        ),
    }


def _expected(states: dict, batches: list, users_params: Any, items_params: Any, rates=None):
    for step, (features, weights, constants) in enumerate(batches):
        grads = _id_gradients(features, weights, constants)
        rate = None if rates is None else rates[step]
        states["users"] = reference_step(
            states["users"], [grads["user"][0]], [grads["user"][1]], users_params, rate
        )
        # Features in nest.flatten order: a dict's keys sorted.
        states["items"] = reference_step(
            states["items"],
            [grads["history"][0], grads["item"][0]],
            [grads["history"][1], grads["item"][1]],
            items_params,
            rate,
        )
    return states


def _assert_states(embedding: Any, states: dict) -> None:
    for name, expected in states.items():
        for got, want in zip(numpy_state(embedding, name), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def _eager_steps(embedding: Any, batches: list) -> None:
    for features, weights, constants in batches:
        embedding.enqueue(features, weights, training=True)
        with tf.GradientTape() as tape:
            activations = embedding.dequeue()
            tape.watch(activations)
            loss = sum(tf.reduce_sum(activations[k] * constants[k]) for k in constants)
        embedding.apply_gradients(tape.gradient(loss, activations))


_OPTIONS = {
    "default": {},
    "non_lazy": {"lazy_adam": False},
    "epsilon_outside": {"sum_inside_sqrt": False, "epsilon": 1e-3},
    "no_accumulation": {"use_gradient_accumulation": False},
    "clipvalue": {"clipvalue": 0.05},
    "clipvalue_pair": {"clipvalue": (-0.02, None)},
    "clip_weights": {"clip_weight_min": -0.3, "clip_weight_max": 0.25},
    "weight_decay": {"weight_decay_factor": 0.01},
    "weight_decay_times_rate": {
        "weight_decay_factor": 0.2,
        "multiply_weight_decay_factor_by_learning_rate": True,
    },
    "betas": {"beta_1": 0.5, "beta_2": 0.75},
}


@pytest.mark.parametrize("option", sorted(_OPTIONS))
def test_every_adam_option_matches_the_reference(option):
    optimizer = E.Adam(0.05, **_OPTIONS[option])
    embedding = tpu_embed_adam.TPUEmbedding(_config(), optimizer)
    rng = np.random.default_rng(3)
    batches = [_batch(rng) for _ in range(3)]
    states = {name: numpy_state(embedding, name) for name in ("users", "items")}
    _eager_steps(embedding, batches)
    _assert_states(embedding, _expected(states, batches, optimizer, optimizer))


def test_per_table_optimizers_and_our_adam_parameters():
    items = AdamParameters(0.2, beta2=0.9, clip_gradient_max=0.01)
    embedding = tpu_embed_adam.TPUEmbedding(_config(items), AdamParameters(0.03))
    rng = np.random.default_rng(4)
    batches = [_batch(rng) for _ in range(2)]
    states = {name: numpy_state(embedding, name) for name in ("users", "items")}
    _eager_steps(embedding, batches)
    _assert_states(embedding, _expected(states, batches, AdamParameters(0.03), items))


def _docstring_loop(embedding: Any, strategy: Any, dataset: Any, steps: int) -> None:
    @tf.function
    def training_step(dataset_iterator, num_steps):
        def tpu_step(tpu_features):
            with tf.GradientTape() as tape:
                activations = embedding.dequeue()
                tape.watch(activations)
                loss = sum(tf.reduce_sum(activations[k] * tpu_features[k]) for k in tpu_features)
            embedding_gradients = tape.gradient(loss, activations)
            embedding.apply_gradients(embedding_gradients)

        for _ in tf.range(num_steps):
            embedding_features, tpu_features = next(dataset_iterator)
            embedding.enqueue(embedding_features, training=True)
            strategy.run(tpu_step, args=(tpu_features,))

    training_step(iter(dataset), tf.constant(steps))


def _dataset(batches: list) -> tf.data.Dataset:
    """The batches as a dataset of ((features, weights), constants); weights ride along."""

    def gen():
        for features, weights, constants in batches:
            yield (
                (features["user"], features["item"], features["history"], weights["history"]),
                constants,
            )

    spec = (
        (
            tf.TensorSpec([_B], tf.int64),
            tf.SparseTensorSpec([_B, 3], tf.int64),
            tf.RaggedTensorSpec([_B, None], tf.int64, 1, tf.int64),
            tf.RaggedTensorSpec([_B, None], tf.float32, 1, tf.int64),
        ),
        {k: tf.TensorSpec([_B, _DIM], tf.float32) for k in ("user", "item", "history")},
    )
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


class _WeightedEnqueue:
    """The embedding with the history weights enqueued beside the features."""

    def __init__(self, embedding: Any):
        self._embedding = embedding

    def enqueue(self, inputs: tuple, training: bool) -> None:
        user, item, history, weights = inputs
        self._embedding.enqueue(
            {"user": user, "item": item, "history": history},
            {"user": None, "item": None, "history": weights},
            training=training,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedding, name)


@pytest.mark.parametrize("strategy_name", ["default", "one_device"])
def test_docstring_training_loop_in_a_tf_function(strategy_name):
    strategy = (
        tf.distribute.get_strategy()
        if strategy_name == "default"
        else tf.distribute.OneDeviceStrategy("/cpu:0")
    )
    optimizer = E.Adam(0.05)
    with strategy.scope():
        embedding = tpu_embed_adam.TPUEmbedding(_config(), optimizer)
    rng = np.random.default_rng(5)
    batches = [_batch(rng) for _ in range(4)]
    states = {name: numpy_state(embedding, name) for name in ("users", "items")}
    _docstring_loop(_WeightedEnqueue(embedding), strategy, _dataset(batches), len(batches))
    _assert_states(embedding, _expected(states, batches, optimizer, optimizer))


def test_callable_learning_rate_is_read_at_every_apply():
    step = tf.Variable(0.0)
    schedule = tf.keras.optimizers.schedules.InverseTimeDecay(0.1, 1.0, 1.0)
    users = E.Adam(lambda: schedule(step))
    items = E.Adam(lambda: 0.02 * (1.0 + step))
    embedding = tpu_embed_adam.TPUEmbedding(_config(items), users)
    rng = np.random.default_rng(6)
    batches = [_batch(rng) for _ in range(3)]
    states = {name: numpy_state(embedding, name) for name in ("users", "items")}

    @tf.function
    def train(features, weights, constants):
        embedding.enqueue(features, weights, training=True)
        with tf.GradientTape() as tape:
            activations = embedding.dequeue()
            tape.watch(activations)
            loss = sum(tf.reduce_sum(activations[k] * constants[k]) for k in constants)
        embedding.apply_gradients(tape.gradient(loss, activations))
        step.assign_add(1.0)

    for batch in batches:
        train(*batch)
    users_rates = [float(np.float32(schedule(s))) for s in range(3)]
    items_rates = [float(np.float32(0.02) * np.float32(1.0 + s)) for s in range(3)]
    for name, rates, optimizer in (("users", users_rates, users), ("items", items_rates, items)):
        for s, (features, weights, constants) in enumerate(batches):
            grads = _id_gradients(features, weights, constants)
            keys = ["user"] if name == "users" else ["history", "item"]
            states[name] = reference_step(
                states[name],
                [grads[k][0] for k in keys],
                [grads[k][1] for k in keys],
                optimizer,
                rates[s],
            )
    _assert_states(embedding, states)


def test_eager_tf_function_and_pipelining_agree():
    rng = np.random.default_rng(7)
    batches = [_batch(rng) for _ in range(3)]
    results = []
    for pipelined in (False, True):
        embedding = tpu_embed_adam.TPUEmbedding(
            _config(), E.Adam(0.05), pipeline_execution_with_tensor_core=pipelined
        )
        _eager_steps(embedding, batches)
        results.append([numpy_state(embedding, n) for n in ("users", "items")])
    embedding = tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.05))
    _docstring_loop(
        _WeightedEnqueue(embedding), tf.distribute.get_strategy(), _dataset(batches), len(batches)
    )
    results.append([numpy_state(embedding, n) for n in ("users", "items")])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)


def test_evaluation_loop_reads_without_training():
    embedding = tpu_embed_adam.TPUEmbedding(_config(), optimizer=None)
    rng = np.random.default_rng(8)
    features, weights, _ = _batch(rng)
    before = embedding.embedding_tables
    before = {t.name: v.numpy() for t, v in before.items()}

    @tf.function
    def evaluation_step():
        embedding.enqueue(features, weights, training=False)
        return embedding.dequeue()

    activations = evaluation_step()
    np.testing.assert_array_equal(
        activations["user"].numpy(), before["users"][features["user"].numpy()]
    )
    with pytest.raises(ValueError, match="has no optimizer"):
        embedding.enqueue(features, weights, training=True)


def test_slot_variable_creation_fn_slots_are_stepped():
    made = {}

    def create_slots(table_variable, names, initializers):
        slots = {
            name: tf.Variable(
                init(table_variable.shape, tf.float32), name=f"custom_{name}", trainable=False
            )
            for name, init in zip(names, initializers, strict=True)
        }
        made[table_variable.name] = slots
        return slots

    optimizer = E.Adam(0.05, slot_variable_creation_fn=create_slots)
    embedding = tpu_embed_adam.TPUEmbedding(_config(), optimizer)
    rng = np.random.default_rng(9)
    batches = [_batch(rng)]
    states = {name: numpy_state(embedding, name) for name in ("users", "items")}
    _eager_steps(embedding, batches)
    _assert_states(embedding, _expected(states, batches, E.Adam(0.05), E.Adam(0.05)))
    assert embedding._variables["users"]["momenta"] is made["users:0"]["momenta"]
