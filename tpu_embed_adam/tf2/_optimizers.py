"""Which optimizers train on CPU, and each table's `AdamParameters` and learning rate.

A table trains with TF2's `tf.tpu.experimental.embedding.Adam`, its own or
the embedding's, read into our `AdamParameters` (so validated as ours: an
epsilon that vanishes in float32 is refused at construction, naming the
table). `AdamParameters` (ours or TF's v1 class) passed as an optimizer is
converted to TF2's Adam first, so that TF's classes, which check for TF2
optimizers, accept it. SGD, Adagrad, AdagradMomentum and FTRL are refused:
only the TPU's Adam is implemented exactly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding_v1

from tpu_embed_adam.learning_rates import DynamicLearningRate
from tpu_embed_adam.params import AdamParameters, as_adam_parameters

__all__ = ["SUPPORTED", "TableOptimizer", "as_tf2_optimizer", "table_optimizer"]

SUPPORTED = (
    "tf.tpu.experimental.embedding.Adam (or an AdamParameters, tpu_embed_adam's or "
    "tf.compat.v1.tpu.experimental's, which is converted to it)"
)
# The constant that stands in for a callable rate while the other fields are
# read (and validated); the step's rate replaces it.
_PLACEHOLDER_RATE = 1.0


@dataclasses.dataclass(frozen=True)
class TableOptimizer:
    """How one table trains.

    Attributes:
      params: the table's Adam, as our `AdamParameters` (a
        `DynamicLearningRate` when the rate is a callable).
      learning_rate: the callable rate, called at every `apply_gradients`;
        None for a constant rate.
    """

    params: AdamParameters
    learning_rate: Callable[[], Any] | None


def as_tf2_optimizer(optimizer: Any) -> Any:
    """Returns `optimizer` with an `AdamParameters` converted to TF2's Adam.

    Args:
      optimizer: a TF2 optimizer, None, or an `AdamParameters` (ours or TF's
        `tf.compat.v1.tpu.experimental.AdamParameters`).

    Returns:
      A `tf.tpu.experimental.embedding.Adam` for an `AdamParameters`;
      anything else unchanged (TF's constructor checks it).

    Raises:
      ValueError: parameters TF2's Adam cannot hold (a `DynamicLearningRate`).
    """
    if isinstance(optimizer, tf_tpu_embedding_v1.AdamParameters):
        return as_adam_parameters(optimizer).to_tpu_embedding_v2()
    return optimizer


def table_optimizer(table: Any) -> TableOptimizer | None:
    """Reads a table's optimizer; None for a table without one (no training).

    Args:
      table: a `tf.tpu.experimental.embedding.TableConfig` whose `optimizer`
        is set (TF's constructor puts the embedding's there).

    Returns:
      The table's `TableOptimizer`, or None.

    Raises:
      ValueError: an optimizer other than Adam, or Adam values that
        `AdamParameters` refuses, naming the table.
      TypeError: Adam fields of the wrong type, naming the table.
    """
    optimizer = table.optimizer
    if optimizer is None:
        return None
    if not isinstance(optimizer, tf.tpu.experimental.embedding.Adam):
        raise ValueError(
            f"Table {table.name!r} has optimizer {type(optimizer).__name__}; on CPU, "
            f"tpu_embed_adam trains embedding tables only with {SUPPORTED}, the "
            "optimizer whose TPU update it implements exactly."
        )
    rate = optimizer.learning_rate
    readable = copy.copy(optimizer)
    # Our parameters hold neither a callable rate nor the slot creator (the
    # slots are the variables TF created with it, read by name).
    readable.slot_variable_creation_fn = None
    if callable(rate):
        readable.learning_rate = _PLACEHOLDER_RATE
    try:
        params = AdamParameters.from_tpu_embedding_v2(readable)
    except (TypeError, ValueError) as e:
        raise type(e)(f"Table {table.name!r}: {e}") from e
    if not callable(rate):
        return TableOptimizer(params, None)
    return TableOptimizer(params.replace(learning_rate=DynamicLearningRate(0)), rate)
