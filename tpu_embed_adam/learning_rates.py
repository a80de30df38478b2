"""`DynamicLearningRate`: a learning rate fed at run time.

Its own module, below both `params.py` and `proto.py`, so that `proto` reads
dynamic rates without importing `params` (which imports `proto`).
"""

from __future__ import annotations

import dataclasses
import numbers

__all__ = ["DynamicLearningRate"]


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
