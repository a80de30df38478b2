"""Learning rates: the rule every constant rate obeys, and `DynamicLearningRate`.

Its own module, below both `params.py` and `proto.py`, so that `proto` reads
dynamic rates without importing `params` (which imports `proto`), and so that
`AdamParameters`, `apply_adam` and `bias_corrected_learning_rate` check a
constant rate by one rule (`constant_learning_rate`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from tpu_embed_adam.rules import real

__all__ = ["DynamicLearningRate", "constant_learning_rate"]

_SMALLEST_NORMAL = np.finfo(np.float32).tiny


def constant_learning_rate(value: Any) -> float:
    """Returns a constant learning rate as a float, or raises naming `learning_rate`.

    A constant rate must be a real number whose float32 rounding is a normal
    float32 > 0 (at least about 1.18e-38): the kernels, the proto and the TPU
    hold it in float32, where a subnormal rate is flushed to 0 (no update at
    all) and a rate beyond float32 is inf.

    Args:
      value: the rate.

    Returns:
      `value` as a Python float.

    Raises:
      TypeError: `value` is a bool or not a real number.
      ValueError: `value` is not finite in float32, not > 0, or below the
        smallest normal float32.
    """
    rate = real("learning_rate", value)
    with np.errstate(over="ignore"):
        rate32 = np.float32(rate)
    if rate <= 0:
        raise ValueError(f"Argument `learning_rate` must be > 0; received: {value!r}.")
    if rate32 < _SMALLEST_NORMAL:
        raise ValueError(
            "Argument `learning_rate` must be a normal float32, at least "
            f"{_SMALLEST_NORMAL:.4g} (a smaller rate is subnormal or 0 in float32, and "
            f"flushed to 0 where the update runs); received: {value!r}."
        )
    return rate


@dataclasses.dataclass(frozen=True, repr=False)
class DynamicLearningRate:
    """A learning rate fed at run time, as `OptimizationParameters.learning_rate.dynamic`.

    TF's `TPUEmbedding` gives each distinct `TableConfig.learning_rate_fn` a tag
    and feeds its value at every step; use this as `learning_rate` to describe
    such a table (it is what `AdamParameters.from_proto` returns for a dynamic
    rate, so that the proto round-trips without loss).

    Attributes:
      tag: the non-negative integer tag of the rate.
    """

    tag: int

    def __post_init__(self) -> None:
        if isinstance(self.tag, bool) or not isinstance(self.tag, numbers.Integral):
            raise TypeError(
                f"Argument `tag` must be an int; received: {self.tag!r} "
                f"({type(self.tag).__name__})."
            )
        if not 0 <= self.tag < 2**31:
            raise ValueError(f"Argument `tag` must be in [0, 2**31); received: {self.tag!r}.")
        object.__setattr__(self, "tag", int(self.tag))

    def __repr__(self) -> str:
        return f"tpu_embed_adam.DynamicLearningRate(tag={self.tag})"
