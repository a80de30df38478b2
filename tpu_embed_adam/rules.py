"""The rules a single Adam hyper-parameter obeys, each defined once.

`AdamParameters` applies them to its arguments, `bias_corrected_learning_rate`
to its betas, and the C++ reader (`cc/core/adam_config.cc`) mirrors them with
the same messages (tests/test_rule_set.py runs both on one corpus). The
constant learning rate's rule is `learning_rates.constant_learning_rate`.
Messages follow one style: "Argument `name` must ...; received: value."
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["decay_rate", "real"]


def real(name: str, value: Any) -> float:
    """Returns `value` as a float finite in float32, or raises naming the argument.

    The proto, the kernels and the TPU hold float32: a value that overflows
    float32 (1e39) would serialize as inf and no longer read back.

    Args:
      name: the argument, for the message.
      value: the value received.

    Returns:
      `value` as a Python float.

    Raises:
      TypeError: `value` is a bool or not a real number.
      ValueError: `value` is not finite in float32.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Argument `{name}` must be a real number; received: {value!r} "
            f"({type(value).__name__})."
        )
    try:
        result = float(value)
    except OverflowError:  # an int or Fraction beyond any float (10**400)
        result = math.inf
    with np.errstate(over="ignore"):
        finite = math.isfinite(result) and math.isfinite(np.float32(result))
    if not finite:
        hint = " (use None for no bound)" if name.startswith("clip_") else ""
        raise ValueError(
            f"Argument `{name}` must be finite in float32{hint}; received: {value!r}."
        )
    return result


def decay_rate(name: str, value: Any) -> float:
    """Returns a moment's decay rate (`beta1`, `beta2`) as a float, or raises naming it.

    Checked in float32 too: 0.99999999 rounds to 1.0 there, and the moment
    would never decay.

    Args:
      name: the argument, for the message.
      value: the value received.

    Returns:
      `value` as a Python float in [0, 1).

    Raises:
      TypeError: `value` is a bool or not a real number.
      ValueError: `value` is not finite, or outside [0, 1) (also in float32).
    """
    rate = real(name, value)
    if not (0.0 <= rate < 1.0 and np.float32(rate) < 1.0):
        raise ValueError(
            f"Argument `{name}` must be >= 0 and < 1 (also in float32); received: {value!r}."
        )
    return rate
