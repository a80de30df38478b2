"""The fused C++ update: a thin wrapper over the `TpuEmbedAdamApply` op.

The kernel (`cc/kernels/adam_apply_kernel.cc`) applies
`tpu_embed_adam.reference.adam_update` to the variables in place, in one
parallel pass, bit for bit as the reference computes it. Most callers want
`tpu_embed_adam.apply_adam`, which picks this path or the pure-TF one.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from tpu_embed_adam.ops import _loader
from tpu_embed_adam.ops._rate import learning_rate_tensor
from tpu_embed_adam.reference import _constants

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
    Types and static shapes are `apply_adam`'s to check (this function trusts
    them). The kernel locks the three variables for the whole step
    (concurrent calls never interleave within a row) and checks run-time
    shapes, ids and aliasing before writing, so on error the variables are
    unchanged.

    Args:
      var: [rows, dim] float32 resource variable, the table.
      m: [rows, dim] float32 resource variable, the first-moment slot.
      v: [rows, dim] float32 resource variable, the second-moment slot.
      ids: [n] int32 or int64 row ids in [0, rows), duplicates allowed.
      grads: [n, dim] float32 gradients, one row per id.
      params: an `AdamParameters` (ours or TF's), read by attribute; None for
        a clipping bound or the decay means unset.
      learning_rate: this step's rate (Python number or scalar float tensor);
        None for `params.learning_rate`.
      check_numerics: raise `InvalidArgumentError` before any write if `grads`
        or the learning rate is NaN or infinite.

    Returns:
      The update op in graph mode; None when executing eagerly.

    Raises:
      RuntimeError: the kernel library is not built or failed to load.
      TypeError: a variable is not a resource variable, or a learning rate
        that is not a number or a float tensor.
      ValueError: no learning rate (`params.learning_rate` is dynamic and
        `learning_rate` is None), or a learning rate of known non-scalar shape.
      tf.errors.InvalidArgumentError: shape mismatches, ids outside [0, rows),
        aliased variables, or non-finite values with `check_numerics`.
    """
    library = _loader.load_library()
    if library is None:
        raise RuntimeError(
            "The fused TpuEmbedAdamApply kernel is not available: "
            f"{_loader.load_error()}. Build it with `make lib`, or use "
            "tpu_embed_adam.apply_adam(..., implementation='tf')."
        )
    handles = [_resource(name, x) for name, x in (("var", var), ("m", m), ("v", v))]
    lr = learning_rate_tensor(params, learning_rate)
    c = _constants(params)
    return library.tpu_embed_adam_apply(
        var=handles[0],
        m=handles[1],
        v=handles[2],
        ids=ids,
        grads=grads,
        learning_rate=lr,
        # The attributes are float32: these floats are exactly the reference's.
        beta1=float(c.beta1),
        beta2=float(c.beta2),
        epsilon=float(c.epsilon),
        lazy_adam=bool(params.lazy_adam),
        sum_inside_sqrt=bool(params.sum_inside_sqrt),
        use_gradient_accumulation=bool(params.use_gradient_accumulation),
        clip_weight_min=float(c.weight_bounds[0]),
        clip_weight_max=float(c.weight_bounds[1]),
        weight_decay_factor=float(c.weight_decay),
        multiply_weight_decay_factor_by_learning_rate=bool(
            params.multiply_weight_decay_factor_by_learning_rate
        ),
        clip_gradient_min=float(c.gradient_bounds[0]),
        clip_gradient_max=float(c.gradient_bounds[1]),
        check_numerics=bool(check_numerics),
    )
