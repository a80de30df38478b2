"""TPU embedding sparse Adam with stock TensorFlow ops: the fallback path.

The update is `tpu_embed_adam.reference.adam_update` (its docstring is the
formula and the rules; `docs/semantics.md` gives their sources), applied in
place to `tf.Variable`s. It runs eagerly, in `tf.function`, in a TF1 graph and
under `tf.function(jit_compile=True)`. XLA has no kernel for `tf.unique` and
needs static shapes, so under XLA duplicates are grouped by a stable sort and
every occurrence of a row computes that row's (identical) update.

Under XLA, `tf.debugging` assertions compile to nothing: bad ids or, with
`check_numerics=True`, non-finite gradients cannot raise there. The update is
then masked so that nothing changes (see `docs/semantics.md`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from tpu_embed_adam.ops._rate import resolved_learning_rate
from tpu_embed_adam.reference import Float32Constants, float32_constants

__all__ = ["tf_apply_adam"]


class _Hyper(NamedTuple):
    """The step's constants, formed as the reference forms them (same rounding).

    `constants` are the reference's own float32 values; `lr` and `decay` are
    the tensors that depend on this step's learning rate.
    """

    lr: tf.Tensor
    decay: tf.Tensor
    constants: Float32Constants
    sum_inside_sqrt: bool


def _hyper(params: Any, learning_rate: Any) -> _Hyper:
    lr = resolved_learning_rate(params, learning_rate)
    constants = float32_constants(params)
    decay = tf.constant(constants.weight_decay)
    if params.multiply_weight_decay_factor_by_learning_rate:
        decay = decay * lr
    # Grappler folds `0 * w` to 0 in graphs, which would drop the decay term
    # (an infinite weight would stay infinite, not become NaN as in the
    # reference). It never folds a feedable placeholder: this one passes
    # `decay` through unchanged.
    decay = tf.raw_ops.PlaceholderWithDefault(input=decay, shape=[])
    return _Hyper(lr, decay, constants, bool(params.sum_inside_sqrt))


def _unbounded(bounds: tuple[np.float32, np.float32]) -> bool:
    return bool(bounds[0] == -np.inf and bounds[1] == np.inf)


def _adam_step(
    w: tf.Tensor, m: tf.Tensor, v: tf.Tensor, g: tf.Tensor, hp: _Hyper
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The reference's per-row step, operation for operation (same rounding).

    Clipping to (-inf, +inf) is the identity, NaN included, so it is skipped.
    The decay is not: `w - 0 * w` is NaN for an infinite `w`, as in the
    reference and the fused kernel.
    """
    c = hp.constants
    if not _unbounded(c.gradient_bounds):
        g = tf.clip_by_value(g, *c.gradient_bounds)
    w = w - hp.decay * w
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    if hp.sum_inside_sqrt:
        # In graphs, Grappler's arithmetic optimizer rewrites `x / sqrt(y)` as
        # `x * rsqrt(y)`, which rounds differently. `abs` hides the Sqrt from
        # it and changes nothing: `v + epsilon^2` is never -0, so its root is
        # never negative.
        w = w - hp.lr * m / tf.abs(tf.sqrt(v + c.epsilon * c.epsilon))
    else:
        w = w - hp.lr * m / (tf.sqrt(v) + c.epsilon)
    if not _unbounded(c.weight_bounds):
        w = tf.clip_by_value(w, *c.weight_bounds)
    return w, m, v


class _Updater(NamedTuple):
    """Applies `_adam_step` to variables; `keep` masks off the whole update."""

    var: Any
    m: Any
    v: Any
    hp: _Hyper
    keep: tf.Tensor | None  # scalar bool, or None: always write

    def _step(self, old: list[tf.Tensor], g: tf.Tensor, mask: tf.Tensor | None) -> list[Any]:
        new = _adam_step(old[0], old[1], old[2], g, self.hp)
        if self.keep is not None:
            mask = self.keep if mask is None else tf.logical_and(mask, self.keep)
        if mask is None:
            return list(new)
        if mask.shape.rank == 1:
            mask = mask[:, None]
        return [tf.where(mask, n, o) for n, o in zip(new, old, strict=True)]

    def rows(self, rows: tf.Tensor, g: tf.Tensor, mask: tf.Tensor | None = None) -> list[Any]:
        """Steps `rows` (repeats only with identical `g`); returns the write ops.

        `mask` (per row) keeps a row's old values where False.
        """
        slots = (self.var, self.m, self.v)
        new = self._step([tf.gather(x, rows) for x in slots], g, mask)
        return _ops(
            [x.scatter_update(tf.IndexedSlices(n, rows)) for x, n in zip(slots, new, strict=True)]
        )

    def table(self, g: tf.Tensor) -> list[Any]:
        """Steps every row of the table with the dense gradient `g`; returns the write ops."""
        slots = (self.var, self.m, self.v)
        new = self._step([x.read_value() for x in slots], g, None)
        return _ops([x.assign(n) for x, n in zip(slots, new, strict=True)])


def _groups(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Stable-sorts `ids`; returns (perm, sorted ids, first, count).

    For each sorted position, `first` is the sorted position of the first
    occurrence of its id and `count` how often the id occurs. The sort is
    stable, so within an id the sorted order is the input order.
    """
    perm = tf.argsort(ids, stable=True)
    sorted_ids = tf.gather(ids, perm)
    # Not `tf.searchsorted`, nor `tf.cumsum` over run starts: XLA on CPU lowers
    # them to an [n, n] comparison (17 GB for 65,536 ids) and to an O(n^2)
    # reduce-window. A doubling max-scan of the run starts' positions is
    # log2(n) rounds of O(n).
    n = tf.size(ids, out_type=tf.int32)
    positions = tf.range(n)
    starts = tf.concat([[True], tf.not_equal(sorted_ids[1:], sorted_ids[:-1])], 0)[:n]

    def widen(shift: tf.Tensor, first: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        earlier = tf.gather(first, tf.maximum(positions - shift, 0))
        return shift * 2, tf.maximum(first, earlier)

    _, first = tf.while_loop(
        lambda shift, _: shift < n, widen, [tf.constant(1), tf.where(starts, positions, 0)]
    )
    count = tf.gather(tf.math.unsorted_segment_sum(tf.ones_like(first), first, n), first)
    return perm, sorted_ids, first, count


def _accumulated(ids: tf.Tensor, grads: tf.Tensor, xla: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Sums the gradients of duplicate ids in float32, in input order.

    Returns (rows, gradients). Outside XLA, `rows` are the distinct ids.
    Under XLA, one entry per occurrence (static shape), each carrying its
    row's full sum, so repeated rows receive identical updates.
    """
    if not xla:
        rows, segment = tf.unique(ids, out_idx=tf.int32)
        return rows, tf.math.unsorted_segment_sum(grads, segment, tf.size(rows))
    perm, sorted_ids, first, _ = _groups(ids)
    sums = tf.math.unsorted_segment_sum(tf.gather(grads, perm), first, tf.size(ids))
    return sorted_ids, tf.gather(sums, first)


def _per_occurrence(update: _Updater, ids: tf.Tensor, grads: tf.Tensor, xla: bool) -> tf.Tensor:
    """Accumulation off: one step per occurrence, in input order.

    Round k steps the k-th occurrence of every id; rows within a round are
    distinct, so a round is one gather/step/scatter. Under XLA every sorted
    position takes part in every round (static shapes): it steps its id's
    k-th occurrence, or writes its row back unchanged once the id has fewer.
    """
    perm, sorted_ids, first, count = _groups(ids)
    sorted_grads = tf.gather(grads, perm)
    n = tf.size(ids, out_type=tf.int32)
    rank = tf.range(n) - first
    rounds = tf.reduce_max(tf.concat([count, [0]], 0))

    def body(k: tf.Tensor) -> list[tf.Tensor]:
        if xla:
            source = tf.minimum(first + k, n - 1)
            writes = update.rows(sorted_ids, tf.gather(sorted_grads, source), mask=k < count)
        else:
            chosen = tf.where(tf.equal(rank, k))[:, 0]
            writes = update.rows(tf.gather(sorted_ids, chosen), tf.gather(sorted_grads, chosen))
        # The next round must read what this round wrote (TF1 graphs have no
        # automatic control dependencies).
        with tf.control_dependencies(writes):
            return [k + 1]

    return tf.while_loop(lambda k: k < rounds, body, [tf.constant(0)])[0]


def _ops(results: list[Any]) -> list[Any]:
    """The graph ops behind variable-update results (none when eager)."""
    if tf.executing_eagerly():
        return []
    return [r.op for r in results]


def _runtime_checks(
    var: Any,
    m: Any,
    v: Any,
    ids: tf.Tensor,
    grads: tf.Tensor,
    lr: tf.Tensor,
    check_numerics: bool,
    xla: bool,
) -> tuple[list[Any], tf.Tensor]:
    """Builds the run-time checks; returns (assert ops, scalar: the input is valid).

    Under XLA, asserts compile to nothing (and shapes are static), so only the
    scalar is built: the caller masks the update with it.
    """
    shape = tf.shape(var)
    checks = []
    if not xla:
        checks = [
            tf.debugging.assert_rank(ids, 1, message="`ids` must have rank 1"),
            tf.debugging.assert_rank(grads, 2, message="`grads` must have rank 2"),
        ] + [
            tf.debugging.assert_equal(
                tf.shape(x), shape, message=f"`{name}` must have the shape of `var`"
            )
            for name, x in (("m", m), ("v", v))
        ]
        checks = [c for c in checks if c is not None]
    with tf.control_dependencies(checks):
        rows = tf.cast(shape[0], ids.dtype)
        # Grappler does not keep these ops behind the rank checks (in TF1
        # graphs they can run first), so they must not fail on ids of any rank.
        flat_ids = tf.reshape(ids, [-1])
        bad = tf.logical_or(flat_ids < 0, flat_ids >= rows)
        in_range = tf.logical_not(tf.reduce_any(bad))
        finite = None
        if check_numerics:
            finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(grads)), tf.math.is_finite(lr))
        valid = in_range if finite is None else tf.logical_and(in_range, finite)
        if xla:
            return [], valid
        # argmax over `bad` plus a sentinel True: the first bad position, and
        # well-defined when ids is empty.
        position = tf.argmax(tf.concat([bad, [True]], 0), output_type=tf.int32)
        first_bad = tf.concat([flat_ids, tf.constant([-1], ids.dtype)], 0)[position]
        message = tf.strings.format(
            "`ids` must lie in [0, {}) (the rows of `var`); first bad id: {} at position {}.",
            (rows, first_bad, position),
        )
        checks += [
            tf.debugging.assert_equal(
                tf.shape(grads),
                tf.stack([tf.size(ids), shape[1]]),
                message="`grads` must be [len(ids), row width of `var`]",
            ),
            tf.debugging.Assert(in_range, [message]),
        ]
        if finite is not None:
            checks.append(
                tf.debugging.Assert(
                    finite, ["`grads` or `learning_rate` has NaN or Inf (check_numerics=True)."]
                )
            )
    return [c for c in checks if c is not None], valid


def tf_apply_adam(
    var: tf.Variable,
    m: tf.Variable,
    v: tf.Variable,
    ids: Any,
    grads: Any,
    params: Any,
    learning_rate: Any = None,
    check_numerics: bool = False,
) -> tf.Operation | None:
    """Applies one TPU embedding Adam step to `var`, `m`, `v` with stock TF ops.

    The semantics are those of `tpu_embed_adam.reference.adam_update`.
    Arguments are `apply_adam`'s to check (this function trusts them);
    run-time shapes and ids are checked here before anything is written, and
    on error nothing changes.
    Unlike the fused kernel, this path takes no lock: concurrent calls on the
    same variables are not serialised and may interleave within a row.

    Args:
      var: [rows, dim] float32 table variable.
      m: [rows, dim] float32 first-moment variable.
      v: [rows, dim] float32 second-moment variable.
      ids: [n] int32/int64 row ids in [0, rows), duplicates allowed.
      grads: [n, dim] float32 gradients, one row per id.
      params: a `tpu_embed_adam.AdamParameters` (`apply_adam` converts TF's),
        read by attribute.
      learning_rate: this step's rate (float32 scalar tensor, as
        `apply_adam` checked it, or a Python number); None:
        `params.learning_rate`.
      check_numerics: raise if `grads` or the learning rate holds NaN or Inf
        (by default they propagate into the table, as on a TPU).

    Returns:
      The update op in graph mode; None when executing eagerly.

    Raises:
      tf.errors.InvalidArgumentError: at run time, for shape mismatches, ids
        out of range (naming the first bad id and the table size) or, with
        `check_numerics`, non-finite gradients or rate. Not under XLA (see
        the module docstring).
    """
    ids = tf.convert_to_tensor(ids)
    grads = tf.convert_to_tensor(grads, dtype_hint=tf.float32)
    hp = _hyper(params, learning_rate)
    xla = control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    checks, valid = _runtime_checks(var, m, v, ids, grads, hp.lr, check_numerics, xla)
    with tf.control_dependencies(checks):
        # In TF1 graphs, Grappler's constant folding can start the update
        # before a failed rank check stops the step: flat ids cannot fail first.
        ids = tf.reshape(ids, [-1])
        update = _Updater(var, m, v, hp, keep=valid if xla else None)
        if not params.use_gradient_accumulation:
            writes = [_per_occurrence(update, ids, grads, xla)]
        elif params.lazy_adam:
            writes = update.rows(*_accumulated(ids, grads, xla))
        else:
            dense = tf.math.unsorted_segment_sum(grads, ids, tf.shape(var)[0])
            writes = update.table(dense)
    if tf.executing_eagerly():
        return None
    return tf.group(*writes)
