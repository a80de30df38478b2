"""`dequeue` against TF's `TPUEmbeddingForServing`, and the ids' gradients against TF's autodiff.

Every input kind, combiner, weights, sequence features and output shapes:
the activations must equal TF's serving lookup of the same tables bit for
bit (reshaped to the TPU's output shape; TF's unvalidated sparse lookup
drops trailing empty rows, which are zeros here). The gradient a table gets
is read from the momenta after one step of Adam with beta1 = 0 (m = the
summed gradient exactly) and compared with TF's autodiff of the serving
lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from _tf2_helpers import E, feature, numpy_state, serving_oracle, table

import tpu_embed_adam

_B = 6
_ROWS = 40


def _sparse(rng: np.random.Generator, shape: tuple[int, ...], density: float = 0.5) -> Any:
    mask = rng.random(shape) < density
    mask[-1] = False  # a trailing empty row: TF's unvalidated lookup drops it
    indices = np.argwhere(mask).astype(np.int64)
    return tf.SparseTensor(indices, rng.integers(0, _ROWS, len(indices)), shape)


def _ragged(rng: np.random.Generator, max_len: int = 6) -> Any:
    lengths = rng.integers(0, max_len, _B)
    return tf.RaggedTensor.from_row_lengths(rng.integers(0, _ROWS, lengths.sum()), lengths)


def _weights_like(rng: np.random.Generator, ids: Any, low: float = 0.25) -> Any:
    values = rng.uniform(low, 2.0, ids.values.shape[0]).astype(np.float32)
    if isinstance(ids, tf.SparseTensor):
        return tf.SparseTensor(ids.indices, values, ids.dense_shape)
    return ids.with_values(tf.constant(values))


# name -> (TableConfig kwargs, FeatureConfig kwargs, input builder, weighted)
_CASES: dict[str, tuple[dict, dict, Callable[[np.random.Generator], Any], bool]] = {
    "dense_rank1": ({}, {}, lambda r: tf.constant(r.integers(0, _ROWS, _B)), False),
    "dense_rank2": ({}, {}, lambda r: tf.constant(r.integers(0, _ROWS, (_B, 1))), False),
    "dense_rank3": ({}, {}, lambda r: tf.constant(r.integers(0, _ROWS, (_B, 2, 1))), False),
    "sparse_rank3_mean_weighted": (
        {"combiner": "mean"},
        {},
        lambda r: _sparse(r, (_B, 3, 4)),
        True,
    ),
    "sparse_sequence": ({}, {"max_sequence_length": 3}, lambda r: _sparse(r, (_B, 5)), False),
    "ragged_sequence": ({}, {"max_sequence_length": 3}, _ragged, False),
    "ragged_output_shape_bag": (
        {"combiner": "sqrtn"},
        {"output_shape": [_B // 2, 2]},
        _ragged,
        True,
    ),
    "ragged_output_shape_sequence": ({}, {"output_shape": [_B, 4]}, _ragged, False),
}
for _combiner in ("sum", "mean", "sqrtn"):
    for _weighted in (False, True):
        for _validate in (True, False):
            _CASES[f"sparse_{_combiner}_{'w' if _weighted else 'u'}_{_validate}"] = (
                {"combiner": _combiner},
                {"validate_weights_and_indices": _validate},
                lambda r: _sparse(r, (_B, 5)),
                _weighted,
            )
        _CASES[f"ragged_{_combiner}_{'w' if _weighted else 'u'}"] = (
            {"combiner": _combiner},
            {},
            _ragged,
            _weighted,
        )


def _compare_to_oracle(ours: np.ndarray, theirs: np.ndarray) -> None:
    dim = ours.shape[-1]
    ours, theirs = ours.reshape(-1, dim), theirs.reshape(-1, dim)
    assert len(theirs) <= len(ours)
    np.testing.assert_array_equal(ours[: len(theirs)], theirs)
    np.testing.assert_array_equal(ours[len(theirs) :], 0.0)


def _setup(case: str, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    table_kwargs, feature_kwargs, make_input, weighted = _CASES[case]
    rng = np.random.default_rng(seed)
    config = {"f": feature(table("t", _ROWS, 5, **table_kwargs), "f", **feature_kwargs)}
    inp = make_input(rng)
    weights = {"f": _weights_like(rng, inp)} if weighted else None
    return config, {"f": inp}, weights, rng


@pytest.mark.parametrize("case", sorted(_CASES))
def test_dequeue_equals_serving_lookup(case):
    config, features, weights, _ = _setup(case)
    embedding = tpu_embed_adam.TPUEmbedding(config, E.Adam(0.1))
    embedding.enqueue(features, weights, training=False)
    ours = embedding.dequeue()["f"]
    expected_shape = list(embedding._output_shapes[0]) + [5]
    assert ours.shape == expected_shape
    oracle = serving_oracle(config, {"t": numpy_state(embedding, "t")[0]})
    _compare_to_oracle(ours.numpy(), oracle.embedding_lookup(features, weights)["f"].numpy())


@pytest.mark.parametrize("case", sorted(_CASES))
def test_table_gradient_equals_autodiff_of_serving_lookup(case):
    config, features, weights, rng = _setup(case, seed=1)
    embedding = tpu_embed_adam.TPUEmbedding(config, E.Adam(0.1, beta_1=0.0))
    before = numpy_state(embedding, "t")[0]
    embedding.enqueue(features, weights, training=True)
    activations = embedding.dequeue()
    upstream = rng.normal(size=activations["f"].shape).astype(np.float32)
    embedding.apply_gradients({"f": tf.constant(upstream)})
    summed = numpy_state(embedding, "t")[1]  # m = g exactly when beta1 = 0

    oracle = serving_oracle(config, {"t": before})
    variable = next(iter(oracle.embedding_tables.values()))
    with tf.GradientTape() as tape:
        theirs = oracle.embedding_lookup(features, weights)["f"]
    theirs_upstream = upstream.reshape(-1, 5)[: np.prod(theirs.shape[:-1])].reshape(theirs.shape)
    expected = tf.convert_to_tensor(tape.gradient(theirs, variable, theirs_upstream)).numpy()
    np.testing.assert_allclose(summed, expected, rtol=1e-6, atol=1e-6)
    if case.startswith(("dense", "sparse_sequence", "ragged_sequence")):
        np.testing.assert_array_equal(summed, expected)


def test_sequence_ids_past_the_length_are_dropped():
    config = {"s": feature(table("t", 10, 2), "s", max_sequence_length=2)}
    embedding = tpu_embed_adam.TPUEmbedding(config, E.Adam(0.1))
    before = numpy_state(embedding, "t")
    ids = tf.ragged.constant([[1, 2, 3], [4]], dtype=tf.int64)
    embedding.enqueue({"s": ids}, training=True)
    activations = embedding.dequeue()["s"]
    np.testing.assert_array_equal(activations[1, 1], 0.0)  # padding
    embedding.apply_gradients({"s": tf.ones_like(activations)})
    after = numpy_state(embedding, "t")
    moved = np.flatnonzero(np.any(after[0] != before[0], axis=1))
    np.testing.assert_array_equal(moved, [1, 2, 4])  # 3 is past the length


@pytest.mark.parametrize(
    ("combiner", "validate", "pruned"),
    [
        ("mean", True, True),
        ("sqrtn", True, True),
        ("sum", True, False),
        ("mean", False, False),
    ],
)
def test_non_positive_weights_follow_tfs_serving_lookup(combiner, validate, pruned):
    config = {
        "f": feature(
            table("t", 10, 2, combiner=combiner), "f", validate_weights_and_indices=validate
        )
    }
    # Weight decay moves every row present, whatever its gradient.
    embedding = tpu_embed_adam.TPUEmbedding(config, E.Adam(0.1, weight_decay_factor=0.5))
    before = numpy_state(embedding, "t")[0]
    ids = tf.SparseTensor([[0, 0], [0, 1], [1, 0]], tf.constant([3, 5, 7], tf.int64), [2, 2])
    weights = tf.SparseTensor(ids.indices, [1.0, -0.5, 0.0], ids.dense_shape)
    embedding.enqueue({"f": ids}, {"f": weights}, training=True)
    ours = embedding.dequeue()
    oracle = serving_oracle(config, {"t": before})
    _compare_to_oracle(
        ours["f"].numpy(), oracle.embedding_lookup({"f": ids}, {"f": weights})["f"].numpy()
    )
    embedding.apply_gradients({"f": tf.ones([2, 2])})
    moved = set(np.flatnonzero(np.any(numpy_state(embedding, "t")[0] != before, axis=1)))
    assert moved == ({3} if pruned else {3, 5, 7})
