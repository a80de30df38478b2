"""A feature's activations from its table, and its ids' gradients from theirs.

The forward pass is TF's own CPU lookup
(`tf.tpu.experimental.embedding.serving_embedding_lookup`, which
`TPUEmbeddingForServing` runs) op for op, so its floats are TF's: the sparse
path's sorted `segment_sum`, `sparse_segment_*` without weights, the ragged
path's `unsorted_segment_sum`, `div_no_nan` by the weight sums (their square
roots for "sqrtn"). Only rows are gathered, never the whole table. The
backward pass gives each id kept the gradient of its row, as TF's autodiff of
that lookup does: `div_no_nan(dL/dactivation, weight sum)` of its row, times
its weight. The ids' gradients are not summed here: `apply_adam` sums those of
a table's duplicate ids, in order, as a TPU accumulates them.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tpu_embed_adam.tf2._inputs import DENSE, RAGGED_BAG, SEQUENCE, SPARSE_BAG, FeatureBatch

__all__ = ["activations", "id_gradients"]

_SPARSE_SEGMENT = {
    "sum": tf.sparse.segment_sum,
    "mean": tf.sparse.segment_mean,
    "sqrtn": tf.sparse.segment_sqrt_n,
}


def _pad_rows(x: tf.Tensor, num_rows: tf.Tensor) -> tf.Tensor:
    """`segment_sum` stops at the last row with an id: empty rows after it are zeros."""
    return tf.pad(x, [[0, num_rows - tf.shape(x)[0]], [0, 0]])


def _weight_sums(batch: FeatureBatch) -> tf.Tensor | None:
    """[num_rows, 1] divisor of each bag row: None for "sum" or a non-bag feature.

    TF's sparse lookup sums weights with the sorted `segment_sum` (and squares
    them with `pow`), its ragged lookup with `unsorted_segment_sum` (squares
    by product); counts when unweighted, which are exact either way.
    """
    combiner = batch.table.combiner
    if batch.mode not in (SPARSE_BAG, RAGGED_BAG) or combiner == "sum":
        return None
    if batch.weights is None:
        weights = tf.ones_like(batch.rows, dtype=tf.float32)[:, None]
    else:
        weights = batch.weights[:, None]
    if batch.mode == SPARSE_BAG:
        terms = tf.pow(weights, 2) if combiner == "sqrtn" else weights
        sums = _pad_rows(tf.math.segment_sum(terms, batch.rows), batch.num_rows)
    else:
        terms = weights * weights if combiner == "sqrtn" else weights
        sums = tf.math.unsorted_segment_sum(terms, batch.rows, batch.num_rows)
    return tf.sqrt(sums) if combiner == "sqrtn" else sums


def activations(batch: FeatureBatch, table: Any) -> tf.Tensor:
    """Returns the feature's activations, of shape `batch.shape`.

    Args:
      batch: the feature's enqueued batch.
      table: its table variable, [vocabulary_size, dim].

    Returns:
      The looked-up, combined rows: TF's serving lookup of the same input
      (reshaped to the TPU's output shape; rows past the last id zero).
    """
    rows = tf.gather(table, batch.ids)
    dim = batch.shape[-1]
    if batch.mode == DENSE:
        flat = rows
    elif batch.mode == SEQUENCE:
        flat = tf.scatter_nd(batch.rows[:, None], rows, tf.stack([batch.num_rows, dim]))
    elif batch.mode == SPARSE_BAG and batch.weights is None:
        flat = _SPARSE_SEGMENT[batch.table.combiner](
            rows, tf.range(tf.shape(rows)[0]), batch.rows, num_segments=batch.num_rows
        )
    else:
        if batch.weights is not None:
            rows = rows * batch.weights[:, None]
        if batch.mode == SPARSE_BAG:
            flat = _pad_rows(tf.math.segment_sum(rows, batch.rows), batch.num_rows)
        else:
            flat = tf.math.unsorted_segment_sum(rows, batch.rows, batch.num_rows)
        sums = _weight_sums(batch)
        if sums is not None:
            flat = tf.math.divide_no_nan(flat, sums)
    return tf.reshape(flat, [-1 if d is None else d for d in batch.shape])


def id_gradients(batch: FeatureBatch, gradient: tf.Tensor | None) -> tf.Tensor:
    """Returns the [n, dim] gradient of each id kept, from the activations' gradient.

    Args:
      batch: the feature's enqueued batch.
      gradient: dL/d(activations), of shape `batch.shape`; None is zero (as
        TF sends for a feature without one: lazy Adam still steps its rows).

    Returns:
      One row per id of `batch.ids`, in their order.
    """
    dim = batch.shape[-1]
    if gradient is None:
        return tf.zeros(tf.stack([tf.size(batch.ids), dim]), tf.float32)
    flat = tf.reshape(gradient, [-1, dim])
    if batch.mode == DENSE:
        return flat
    sums = _weight_sums(batch)
    if sums is not None:
        flat = tf.math.divide_no_nan(flat, sums)
    grads = tf.gather(flat, batch.rows)
    if batch.weights is not None:
        grads = grads * batch.weights[:, None]
    return grads
