"""What `enqueue` keeps of one feature: the ids to look up, where each goes, its weight.

A feature's input (a dense `tf.Tensor`, a `tf.SparseTensor` or a
`tf.RaggedTensor`) becomes a `FeatureBatch`: flat ids, the output row of each,
and weights. Which ids are kept follows TF's own CPU lookup
(`tpu_embedding_for_serving.cpu_embedding_lookup`), the oracle of the forward
pass: ids past a sequence feature's length are dropped, and so, where TF's
"safe" sparse lookup runs, are ids of non-positive weight (combiners other
than "sum"). Kept ids must lie in the table; the check runs before anything
reads or writes a table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

__all__ = [
    "DENSE",
    "RAGGED_BAG",
    "SEQUENCE",
    "SPARSE_BAG",
    "FeatureBatch",
    "check_input",
    "feature_batch",
    "with_id_checks",
]

# How a feature's ids become its activations (tpu_embed_adam.tf2._lookup).
DENSE = "dense"  # one id per output row
SEQUENCE = "sequence"  # each id in its own row of [batch * length] rows, zeros elsewhere
SPARSE_BAG = "sparse_bag"  # a row's ids combined, in the arithmetic of TF's sparse lookup
RAGGED_BAG = "ragged_bag"  # a row's ids combined, in the arithmetic of TF's ragged lookup

_ID_DTYPES = (tf.int32, tf.int64)


@dataclasses.dataclass(frozen=True)
class FeatureBatch:
    """One feature's enqueued input, reduced to what the lookup and its gradient need.

    Attributes:
      path: the feature's path in `feature_config` (as TF joins it), for errors.
      table: the feature's `tf.tpu.experimental.embedding.TableConfig`.
      mode: DENSE, SEQUENCE, SPARSE_BAG or RAGGED_BAG.
      ids: [n] int32 or int64 ids kept.
      rows: [n] int32 row of each id in the flat result, sorted for SPARSE_BAG;
        None for DENSE (id i is row i).
      weights: [n] float32 weights, or None (all 1).
      num_rows: scalar int32, the rows of the flat [num_rows, dim] result.
      shape: the activation shape, the feature's output shape + [dim]; fully
        defined (TF's rule), but for the batch dimension where a subclass
        lets shapes follow each batch (None: any).
    """

    path: str
    table: Any
    mode: str
    ids: tf.Tensor
    rows: Any  # a tf.Tensor, or None for DENSE
    weights: tf.Tensor | None
    num_rows: tf.Tensor
    shape: list[int | None]


def _where(feature_path: str, argument: str) -> str:
    return f"feature {feature_path!r} (argument `{argument}`)"


def check_input(path: str, feature: Any, inp: Any, weight: Any) -> None:
    """Checks one feature's input and weight by type, dtype and rank; builds nothing.

    TF's TPU enqueue casts ids to int64 and weights to float32 whatever they
    are, and skips inputs of other types when it reads shapes; here such
    inputs are refused by name before anything is built.

    Args:
      path: the feature's path in `feature_config`.
      feature: its `FeatureConfig`.
      inp: its input.
      weight: its weight, or None.

    Raises:
      TypeError: an input that is not a Tensor, SparseTensor or RaggedTensor,
        ids that are not int32/int64, a weight of another type than its input
        or not a float.
      ValueError: a weight for a dense input or a sequence feature, or a
        RaggedTensor that is not of rank 2.
    """
    kinds = (tf.Tensor, tf.SparseTensor, tf.RaggedTensor)
    if not isinstance(inp, kinds):
        raise TypeError(
            f"enqueue: {_where(path, 'features')} must be a tf.Tensor, tf.SparseTensor or "
            f"tf.RaggedTensor; received {type(inp).__name__}."
        )
    ids = inp.values if isinstance(inp, tf.SparseTensor | tf.RaggedTensor) else inp
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(
            f"enqueue: {_where(path, 'features')} must hold int32 or int64 ids; "
            f"received {ids.dtype.name}."
        )
    if isinstance(inp, tf.RaggedTensor) and inp.shape.rank != 2:
        raise ValueError(
            f"enqueue: {_where(path, 'features')} must be a RaggedTensor of rank 2; "
            f"received shape {inp.shape}."
        )
    if weight is None:
        return
    if isinstance(inp, tf.Tensor):
        raise ValueError(
            f"enqueue: {_where(path, 'weights')} is given for a dense input, whose "
            "weights are always 1; pass None there."
        )
    if type(weight) is not type(inp):
        raise TypeError(
            f"enqueue: {_where(path, 'weights')} must be a {type(inp).__name__} like its "
            f"input; received {type(weight).__name__}."
        )
    if not weight.values.dtype.is_floating:
        raise TypeError(
            f"enqueue: {_where(path, 'weights')} must hold floats; received "
            f"{weight.values.dtype.name}."
        )
    if feature.max_sequence_length > 0:
        raise ValueError(
            f"enqueue: {_where(path, 'weights')} is given for a sequence feature "
            f"(max_sequence_length={feature.max_sequence_length}), whose ids are not "
            "combined; pass None there."
        )


def _rows_int32(rows: tf.Tensor) -> tf.Tensor:
    return tf.cast(rows, tf.int32)


def _kept(keep: tf.Tensor | None, *tensors: tf.Tensor | None) -> list[tf.Tensor | None]:
    if keep is None:
        return list(tensors)
    return [None if t is None else tf.boolean_mask(t, keep) for t in tensors]


def _sequence_rows(
    sample: tf.Tensor, position: tf.Tensor, num_samples: tf.Tensor, length: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The kept ids' mask, flat rows and row count of a sequence of `length`."""
    sample, position = tf.cast(sample, tf.int64), tf.cast(position, tf.int64)
    keep = position < length
    rows = _rows_int32(sample * length + position)
    return keep, rows, tf.cast(num_samples, tf.int32) * length


def _sparse_batch(
    path: str, feature: Any, inp: tf.SparseTensor, weight: tf.SparseTensor | None, shape: list
) -> FeatureBatch:
    table = feature.table
    rank = inp.shape.rank
    weights = None if weight is None else tf.cast(weight.values, tf.float32)
    if rank == 2 and not feature.output_shape and feature.max_sequence_length > 0:
        keep, rows, num_rows = _sequence_rows(
            inp.indices[:, 0], inp.indices[:, 1], inp.dense_shape[0], feature.max_sequence_length
        )
        ids, rows = _kept(keep, inp.values, rows)
        return FeatureBatch(path, table, SEQUENCE, ids, rows, None, num_rows, shape)
    # The row of an id is its index without the last dimension, row-major,
    # as TF's safe lookup reshapes a rank > 2 input to rank 2.
    leading = inp.dense_shape[:-1]
    strides = tf.math.cumprod(leading, exclusive=True, reverse=True)
    rows = _rows_int32(tf.reduce_sum(inp.indices[:, :-1] * strides, axis=1))
    keep = None
    # TF's serving lookup takes its safe path (which drops ids of weight <= 0
    # unless the combiner is "sum") when it validates or for rank > 2.
    safe = feature.validate_weights_and_indices or rank > 2
    if weights is not None and safe and table.combiner != "sum":
        keep = weights > 0
    ids, rows, weights = _kept(keep, inp.values, rows, weights)
    num_rows = tf.cast(tf.reduce_prod(leading), tf.int32)
    return FeatureBatch(path, table, SPARSE_BAG, ids, rows, weights, num_rows, shape)


def _ragged_batch(
    path: str, feature: Any, inp: tf.RaggedTensor, weight: tf.RaggedTensor | None, shape: list
) -> FeatureBatch:
    table = feature.table
    samples = inp.shape[0]
    length = feature.max_sequence_length
    if feature.output_shape:
        # TF's serving lookup: an output shape of more elements than the batch
        # holds a sequence of the quotient's length (weights and combiner unused).
        total = feature.output_shape.num_elements()
        length = 0
        if samples is not None and total != samples:
            if total < samples or total % samples:
                raise ValueError(
                    f"enqueue: {_where(path, 'features')} has {samples} rows, which "
                    f"neither equals nor divides the {total} elements of its "
                    f"FeatureConfig output_shape {feature.output_shape}."
                )
            length = total // samples
    sample = inp.value_rowids()
    if length > 0:
        position = tf.range(tf.size(inp.values, out_type=inp.row_splits.dtype)) - tf.gather(
            inp.row_splits, sample
        )
        keep, rows, num_rows = _sequence_rows(sample, position, inp.nrows(), length)
        ids, rows = _kept(keep, inp.values, rows)
        return FeatureBatch(path, table, SEQUENCE, ids, rows, None, num_rows, shape)
    weights = None if weight is None else tf.cast(weight.values, tf.float32)
    num_rows = tf.cast(inp.nrows(), tf.int32)
    return FeatureBatch(
        path, table, RAGGED_BAG, inp.values, _rows_int32(sample), weights, num_rows, shape
    )


def feature_batch(
    path: str, feature: Any, inp: Any, weight: Any, output_shape: tf.TensorShape
) -> FeatureBatch:
    """Builds one feature's `FeatureBatch` from an input that `check_input` accepted.

    Args:
      path: the feature's path in `feature_config`.
      feature: its `FeatureConfig`.
      inp: its input: a Tensor, SparseTensor or RaggedTensor of ids.
      weight: its weight (the input's type), or None.
      output_shape: the feature's fully defined output shape (TF's rules).

    Returns:
      The batch; its ids are not checked yet (`with_id_checks`).

    Raises:
      ValueError: a ragged input whose rows do not fit its output shape.
    """
    shape = [*output_shape.as_list(), feature.table.dim]
    if isinstance(inp, tf.SparseTensor):
        return _sparse_batch(path, feature, inp, weight, shape)
    if isinstance(inp, tf.RaggedTensor):
        return _ragged_batch(path, feature, inp, weight, shape)
    ids = tf.reshape(inp, [-1])
    return FeatureBatch(
        path, feature.table, DENSE, ids, None, None, tf.size(ids, out_type=tf.int32), shape
    )


def _id_check(batch: FeatureBatch) -> tf.Operation:
    vocabulary = batch.table.vocabulary_size
    bad = tf.logical_or(batch.ids < 0, batch.ids >= tf.cast(vocabulary, batch.ids.dtype))
    first = tf.where(bad)[:1, 0]
    return tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [
            # Backticks, not quotes: a graph's assertion prints quotes escaped.
            f"enqueue: feature `{batch.path}` (argument `features`) has an id outside "
            f"[0, {vocabulary}), the rows of table `{batch.table.name}`. First such id and "
            "its position among the ids kept:",
            tf.gather(batch.ids, first),
            first,
        ],
    )


def with_id_checks(batches: list[FeatureBatch]) -> list[FeatureBatch]:
    """Returns `batches` whose ids depend on every batch's range check.

    So an id out of range anywhere stops every lookup and update of the step
    before it reads or writes a table; eagerly, it raises here.

    Raises:
      tf.errors.InvalidArgumentError: eagerly, an id outside its table.
    """
    checks = [_id_check(batch) for batch in batches]
    with tf.control_dependencies(checks):
        return [dataclasses.replace(b, ids=tf.identity(b.ids)) for b in batches]
