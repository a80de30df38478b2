"""The learning-rate argument: checked once by `apply_adam`, resolved by each path."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import tensorflow as tf

from tpu_embed_adam.learning_rates import constant_learning_rate


def learning_rate_tensor(params: Any, learning_rate: Any) -> tf.Tensor:
    """Checks this step's learning rate and returns it as a float32 tensor.

    Args:
      params: an `AdamParameters`; its `learning_rate` is used when
        `learning_rate` is None.
      learning_rate: a Python number, a scalar float tensor or variable, or
        None.

    Returns:
      The rate as a float32 tensor (of unknown rank if the input's is unknown;
      the fused kernel checks it at run time).

    Raises:
      ValueError: `learning_rate` is None while `params.learning_rate` is not a
        number (a `DynamicLearningRate`), a tensor of known non-scalar shape,
        or a number that `learning_rates.constant_learning_rate` refuses (not
        finite in float32, not > 0, below the smallest normal float32).
      TypeError: a bool, a non-number, or a non-float tensor.
    """
    if learning_rate is None:
        if not isinstance(params.learning_rate, numbers.Real):
            raise ValueError(
                "Argument `learning_rate` must be given when `params.learning_rate` is "
                f"not a number; received None with params.learning_rate="
                f"{params.learning_rate!r}."
            )
        learning_rate = params.learning_rate
    if isinstance(learning_rate, tf.Tensor | tf.Variable):
        if not learning_rate.dtype.is_floating:
            raise TypeError(
                "Argument `learning_rate` must be a float tensor; received dtype "
                f"{learning_rate.dtype.name}."
            )
        if learning_rate.shape.rank not in (None, 0):
            raise ValueError(
                f"Argument `learning_rate` must be a scalar; received shape {learning_rate.shape}."
            )
    elif isinstance(learning_rate, bool | np.bool_) or not isinstance(
        learning_rate, numbers.Real
    ):
        raise TypeError(
            "Argument `learning_rate` must be a Python number, a scalar float tensor or "
            f"None; received {learning_rate!r} ({type(learning_rate).__name__})."
        )
    else:
        # A number beyond any float (10**400) would otherwise raise
        # OverflowError in a graph; inf or NaN would step every row to NaN, a
        # rate <= 0 would climb the gradient, a subnormal one is flushed to 0.
        constant_learning_rate(learning_rate)
    # A Python number becomes float32 directly (the hint keeps an int from
    # becoming int32), a float64 one is rounded once: either way the value of
    # the reference's np.float32(learning_rate).
    return tf.cast(tf.convert_to_tensor(learning_rate, dtype_hint=tf.float32), tf.float32)


def resolved_learning_rate(params: Any, learning_rate: Any) -> tf.Tensor:
    """The rate an implementation runs with, as a float32 tensor; checks nothing.

    `apply_adam` passes the tensor that `learning_rate_tensor` checked; None
    (direct callers of an implementation) means `params.learning_rate`.
    """
    if learning_rate is None:
        learning_rate = params.learning_rate
    return tf.cast(tf.convert_to_tensor(learning_rate, dtype_hint=tf.float32), tf.float32)

