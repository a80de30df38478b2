"""Argument checks shared by the launcher and the worker."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_seconds"]


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """Returns `value` as an int after checking that it is one in [low, high].

    Args:
      name: the argument's name, for the error.
      value: what the caller passed.
      low: the smallest value allowed.
      high: the largest value allowed.

    Returns:
      `int(value)`.

    Raises:
      TypeError: `value` is not an integer (a bool is not one).
      ValueError: `value` is outside [low, high].
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"Argument `{name}` must be an int; received: {value!r} ({type(value).__name__})."
        )
    as_int = int(value)
    if not low <= as_int <= high:
        raise ValueError(f"Argument `{name}` must be in [{low}, {high}]; received: {value!r}.")
    return as_int


def check_seconds(name: str, value: Any) -> float:
    """Returns `value` as a float after checking that it is a duration > 0.

    Args:
      name: the argument's name, for the error.
      value: what the caller passed, in seconds.

    Returns:
      `float(value)`.

    Raises:
      TypeError: `value` is not a real number (a bool is not one).
      ValueError: `value` is not finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Argument `{name}` must be a number of seconds; received: {value!r} "
            f"({type(value).__name__})."
        )
    as_float = float(value)
    if not 0 < as_float < math.inf:
        raise ValueError(f"Argument `{name}` must be finite and > 0; received: {value!r}.")
    return as_float
