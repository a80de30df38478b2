"""The fused C++ update: a thin wrapper over the `TpuEmbedAdamApply` op.

The kernel (`cc/kernels/adam_apply_kernel.cc`) applies
`tpu_embed_adam.reference.adam_update` to the variables in place, in one
parallel pass, bit for bit as the reference computes it. Its hyper-parameters
are one attribute, the serialized TF `OptimizationParameters` of
`AdamParameters.to_tf_proto()`, which the kernel reads with the same C++
function as the engine reads a table's (`cc/core/adam_config.h`). Most callers want
`tpu_embed_adam.apply_adam`, which picks this path or the pure-TF one.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from tpu_embed_adam import _library
from tpu_embed_adam.ops._rate import resolved_learning_rate

__all__ = ["fused_apply_adam"]


def _resource(name: str, variable: Any) -> tf.Tensor:
    if isinstance(variable, resource_variable_ops.BaseResourceVariable):
        return variable.handle
    if isinstance(variable, tf.Tensor) and variable.dtype == tf.resource:
        return variable
    raise TypeError(
        f"Argument `{name}` must be a resource tf.Variable; received "
        f"{type(variable).__name__} (in TF1 graphs create it with use_resource=True)."
    )


def fused_apply_adam(
    var: tf.Variable,
    m: tf.Variable,
    v: tf.Variable,
    ids: Any,
    grads: Any,
    params: Any,
    learning_rate: Any = None,
    check_numerics: bool = False,
) -> tf.Operation | None:
    """Applies one TPU embedding sparse Adam step in place with the fused kernel.

    The update is `tpu_embed_adam.reference.adam_update`; see its docstring.
    Arguments are `apply_adam`'s to check (this function trusts them). The
    kernel locks the three variables for the whole step (concurrent calls
    never interleave within a row) and checks run-time shapes, ids and
    aliasing before writing, so on error the variables are unchanged. On
    Linux it backs each variable of 8 MB or more with transparent huge pages
    (rows are updated at random), moving the pages TF wrote once per
    variable: a one-time copy in the first call, about 2 ms per MB on the
    development machine (none where the host's mode is "never", or where
    glibc already asked for huge pages: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`).

    Args:
      var: [rows, dim] float32 resource variable, the table.
      m: [rows, dim] float32 resource variable, the first-moment slot.
      v: [rows, dim] float32 resource variable, the second-moment slot.
      ids: [n] int32 or int64 row ids in [0, rows), duplicates allowed.
      grads: [n, dim] float32 gradients, one row per id.
      params: a `tpu_embed_adam.AdamParameters` (`apply_adam` converts TF's),
        or any object whose `to_tf_proto()` gives TF's `OptimizationParameters`
        with Adam set (its learning rate is not read).
      learning_rate: this step's rate (a float32 scalar tensor or a Python
        number); None for `params.learning_rate`.
      check_numerics: raise `InvalidArgumentError` before any write if `grads`
        or the learning rate is NaN or infinite.

    Returns:
      The update op in graph mode; None when executing eagerly.

    Raises:
      RuntimeError: the kernel library is not built or failed to load.
      TypeError: a variable is not a resource variable.
      tf.errors.InvalidArgumentError: parameters the engine would refuse too,
        shape mismatches, ids outside [0, rows), aliased variables, or
        non-finite values with `check_numerics`.
    """
    library = _library.load_library()
    if library is None:
        raise RuntimeError(
            "The fused TpuEmbedAdamApply kernel is not available: "
            f"{_library.load_error()}. Build it with `make lib`, or use "
            "tpu_embed_adam.apply_adam(..., implementation='tf')."
        )
    handles = [_resource(name, x) for name, x in (("var", var), ("m", m), ("v", v))]
    # Deterministic bytes: equal parameters give equal attrs (one kernel).
    serialized = params.to_tf_proto().SerializeToString(deterministic=True)
    return library.tpu_embed_adam_apply(
        var=handles[0],
        m=handles[1],
        v=handles[2],
        ids=ids,
        grads=grads,
        learning_rate=resolved_learning_rate(params, learning_rate),
        optimization_parameters=serialized,
        check_numerics=bool(check_numerics),
    )
