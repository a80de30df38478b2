"""`apply_adam`: the public entry point; picks the fused kernel or the TF path.

Both implementations follow `tpu_embed_adam.reference.adam_update`; they differ
only in speed. "auto" takes the fused kernel when its library loaded and the
update can run there, else the pure-TF path with a one-time logged reason.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.ops import control_flow_util, resource_variable_ops
from tensorflow.python.ops import variables as variables_lib

from tpu_embed_adam import _library
from tpu_embed_adam.ops import fused, options
from tpu_embed_adam.ops._rate import learning_rate_tensor
from tpu_embed_adam.ops.tf_path import tf_apply_adam
from tpu_embed_adam.params import as_adam_parameters
from tpu_embed_adam.slots import APPLY_VARIABLES

__all__ = ["apply_adam"]

_IMPLEMENTATIONS = ("auto", "fused", "tf")


def _split_gradient(ids: Any, grads: Any) -> tuple[Any, Any]:
    """Takes ids and values from an `IndexedSlices` gradient; checks `ids` is None."""
    if not isinstance(grads, tf.IndexedSlices):
        if ids is None:
            raise ValueError("Argument `ids` is required unless `grads` is a tf.IndexedSlices.")
        return ids, grads
    if ids is not None:
        raise ValueError(
            "Argument `ids` must be None when `grads` is a tf.IndexedSlices (its "
            "`indices` are the ids)."
        )
    return grads.indices, grads.values




def _check_variables(var: Any, m: Any, v: Any) -> None:
    """Raises TypeError/ValueError unless `var`, `m`, `v` are three float32 variables.

    Aliases would make the step read values it has just written; the fused
    kernel refuses them at run time, so every path refuses them here.
    """
    variables = dict(zip(APPLY_VARIABLES, (var, m, v), strict=True))
    for name, x in variables.items():
        if not isinstance(x, tf.Variable):
            hint = (
                " (apply the update to each partition: list(var))"
                if isinstance(x, variables_lib.PartitionedVariable)
                else ""
            )
            raise TypeError(
                f"Argument `{name}` must be a tf.Variable; received "
                f"{type(x).__name__}{hint}."
            )
        if x.dtype.base_dtype != tf.float32:
            raise TypeError(
                f"Argument `{name}` must be float32; received {x.dtype.base_dtype.name}."
            )
    for i, first in enumerate(APPLY_VARIABLES):
        for second in APPLY_VARIABLES[i + 1 :]:
            a, b = variables[first], variables[second]
            if a is b or getattr(a, "handle", a) is getattr(b, "handle", b):
                raise ValueError(
                    "Arguments `var`, `m` and `v` must be three distinct variables; "
                    f"`{second}` is `{first}`."
                )


def _validated(var: Any, m: Any, v: Any, ids: Any, grads: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Checks what is known before running; returns `ids` and `grads` as tensors.

    The one place that raises TypeError (dtypes, argument types) and
    ValueError (static ranks and shapes) for both implementations. Run-time
    shapes and ids are checked by each implementation (InvalidArgumentError).
    """
    _check_variables(var, m, v)
    # No dtype hints: a hint converts numpy arrays silently (float64 ids to
    # int32, float64 gradients to float32); Python lists become int32/float32.
    ids = tf.convert_to_tensor(ids)
    grads = tf.convert_to_tensor(grads)
    if ids.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"Argument `ids` must be int32 or int64; received {ids.dtype.name}.")
    if grads.dtype != tf.float32:
        raise TypeError(f"Argument `grads` must be float32; received {grads.dtype.name}.")
    for name, x, rank in (("var", var, 2), ("ids", ids, 1), ("grads", grads, 2)):
        if x.shape.rank is not None and x.shape.rank != rank:
            raise ValueError(f"Argument `{name}` must have rank {rank}; received shape {x.shape}.")
    for name, x in (("m", m), ("v", v)):
        if not x.shape.is_compatible_with(var.shape):
            raise ValueError(
                f"Argument `{name}` must have the shape of `var` {var.shape}; received {x.shape}."
            )
    if not grads.shape[:1].is_compatible_with(ids.shape):
        raise ValueError(
            f"Argument `grads` {grads.shape} must have one row per id; `ids` {ids.shape}."
        )
    if not grads.shape[1:].is_compatible_with(var.shape[1:]):
        raise ValueError(
            f"Argument `grads` {grads.shape} must have the row width of `var` {var.shape}."
        )
    return ids, grads


def _fallback_reason(var: Any, m: Any, v: Any) -> str | None:
    """Why "auto" cannot use the fused kernel for these variables, or None if it can."""
    if options.is_custom_kernel_disabled():
        return (
            f"the custom kernel is disabled ({options.DISABLE_ENV_VAR} or disable_custom_kernel())"
        )
    if _library.load_library() is None:
        return f"the kernel library did not load: {_library.load_error()}"
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return "inside an XLA-compiled function (the fused op has no XLA kernel)"
    # The kernel updates all three in place on the CPU: one that is a ref
    # variable or lives elsewhere rules it out as surely as the table does.
    for name, x in (("var", var), ("m", m), ("v", v)):
        if not isinstance(x, resource_variable_ops.BaseResourceVariable):
            return f"`{name}` is not a resource variable ({type(x).__name__})"
        if tf.DeviceSpec.from_string(x.device).device_type not in (None, "CPU"):
            return f"`{name}` is on {x.device}; the fused kernel runs on CPU only"
    return None


def apply_adam(
    var: tf.Variable,
    m: tf.Variable,
    v: tf.Variable,
    ids: Any,
    grads: Any,
    params: Any,
    learning_rate: Any = None,
    implementation: str = "auto",
    check_numerics: bool = False,
) -> tf.Operation | None:
    """Applies one TPU embedding sparse Adam step to `var`, `m` and `v` in place.

    The update is `tpu_embed_adam.reference.adam_update` (see its docstring and
    `docs/semantics.md`). Nothing is written when an input is invalid.

    Concurrent calls on the same variables: the fused kernel locks all three
    for the whole step, so such calls never interleave within a row. The TF
    path does not serialise them: two concurrent TF-path steps (or one TF-path
    and one fused step) on the same variables may interleave their reads and
    writes and lose or tear updates. Serialise them yourself on that path.

    Example:
      >>> params = AdamParameters(0.1)
      >>> table = tf.Variable(tf.zeros([4, 2]))
      >>> m, v = tf.Variable(tf.zeros([4, 2])), tf.Variable(tf.zeros([4, 2]))
      >>> with tf.GradientTape() as tape:
      ...     loss = tf.reduce_sum(tf.gather(table, [1, 3, 1]))
      >>> apply_adam(table, m, v, None, tape.gradient(loss, table), params)

    Args:
      var: [rows, dim] float32 table variable.
      m: [rows, dim] float32 first-moment variable, zero-initialised.
      v: [rows, dim] float32 second-moment variable, zero-initialised.
      ids: [n] int32/int64 row ids, duplicates allowed; must be None when
        `grads` is a `tf.IndexedSlices`.
      grads: [n, dim] float32 gradients, or a `tf.IndexedSlices` (the gradient
        of `tf.gather`/`tf.nn.embedding_lookup`), whose indices are the ids.
      params: an `AdamParameters`, ours or TF's
        `tf.compat.v1.tpu.experimental.AdamParameters` (converted to ours, so
        validated as ours: e.g. `epsilon=1e-23` is refused).
      learning_rate: this step's rate: a Python number or a scalar float
        tensor; None for `params.learning_rate` (required when that is a
        `DynamicLearningRate`). See `bias_corrected_learning_rate`.
      implementation: "auto" (fused kernel when available, outside XLA, and
        `var`, `m` and `v` are all resource variables on the CPU; else the TF
        path with a one-time logged reason),
        "fused" (the kernel, or an error) or "tf" (the pure-TF path).
      check_numerics: raise if `grads` or the learning rate holds NaN or Inf;
        by default they propagate into the table, as on a TPU.

    Returns:
      The update op in graph mode; None when executing eagerly.

    Every implementation raises the same error type for the same bad input:
    the arguments are checked here, once, before either runs.

    Raises:
      ValueError: an unknown `implementation`, TF's `AdamParameters` with
        values ours refuses, `ids` given with
        `IndexedSlices`, a non-scalar learning rate, static rank or shape
        mismatches, or `var`, `m`, `v` not three distinct variables.
      TypeError: `params` not an AdamParameters (or TF's with an attribute of
        the wrong type), `var`, `m` or `v` not a
        `tf.Variable` (a numpy array, a tensor, a `PartitionedVariable`), or
        wrong dtypes (float32 variables and gradients, int32/int64 ids).
      RuntimeError: `implementation="fused"` without the kernel library.
      tf.errors.InvalidArgumentError: run-time shape mismatches, ids outside
        [0, rows) or, with `check_numerics`, non-finite gradients or rate.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"Argument `implementation` must be one of {_IMPLEMENTATIONS}; "
            f"received: {implementation!r}."
        )
    # The one place the arguments are checked: both implementations take the
    # results (our AdamParameters, a float32 rate, ids and grads as tensors).
    params = as_adam_parameters(params)
    learning_rate = learning_rate_tensor(params, learning_rate)
    ids, grads = _validated(var, m, v, *_split_gradient(ids, grads))
    if implementation == "fused" and _library.load_library() is None:
        raise RuntimeError(
            "implementation='fused' needs the kernel library, which did not load: "
            f"{_library.load_error()}. Build it with `make lib`, or pass "
            "implementation='auto' or 'tf'."
        )
    if implementation == "auto":
        reason = _fallback_reason(var, m, v)
        if reason is not None:
            options.warn_fallback(reason)
            implementation = "tf"
    if implementation == "tf":
        return tf_apply_adam(var, m, v, ids, grads, params, learning_rate, check_numerics)
    return fused.fused_apply_adam(var, m, v, ids, grads, params, learning_rate, check_numerics)
