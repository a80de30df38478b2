"""What the CPU `TPUEmbedding` refuses, before it builds or writes anything."""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.distribute import distribute_lib, one_device_strategy
from tensorflow.python.util import nest

__all__ = [
    "check_gradient",
    "check_slots",
    "check_strategy",
    "check_structure",
    "check_tables",
]


def check_strategy(strategy: Any) -> None:
    """Accepts the default strategy and a `OneDeviceStrategy`: one replica.

    Raises:
      ValueError: any other strategy (several replicas would each need their
        share of the batch and a sum of their gradients).
    """
    # TF has no public test for the default strategy; its class is the one.
    one_replica = (
        distribute_lib._DefaultDistributionStrategy,
        one_device_strategy.OneDeviceStrategy,
        one_device_strategy.OneDeviceStrategyV1,
    )
    if not isinstance(strategy, one_replica):
        raise ValueError(
            "TPUEmbedding on CPU (tpu_embed_adam) runs under the default strategy or a "
            f"tf.distribute.OneDeviceStrategy; it was created under {type(strategy).__name__}."
        )


def check_tables(tables: list[Any]) -> None:
    """Refuses what a table asks of a TPU that the CPU lookup does not do.

    Raises:
      ValueError: a table with a `quantization_config` (a TPU quantizes the
        activations it looks up; here they would silently not be).
    """
    for table in tables:
        if table.quantization_config is not None:
            raise ValueError(
                f"Table {table.name!r} has a quantization_config: simulated quantization of "
                "the activations is not implemented on CPU; remove it."
            )


def check_structure(caller: str, argument: str, value: Any, feature_config: Any) -> None:
    """Raises unless `value` has the nested structure of `feature_config`.

    Raises:
      ValueError: a different number of entries or keys.
      TypeError: different kinds of sequences.
    """
    try:
        nest.assert_same_structure(feature_config, value)
    except (ValueError, TypeError) as e:
        raise type(e)(
            f"TPUEmbedding.{caller}: argument `{argument}` must have the structure of "
            f"feature_config: {e}"
        ) from e


def check_gradient(path: str, gradient: Any, shape: list[int | None]) -> None:
    """Checks one feature's gradient: None, or a float32 tensor of the activations' shape.

    Raises:
      ValueError: not a tensor (an `IndexedSlices` too, as on a TPU), or a
        shape other than the feature's activations'.
      TypeError: a dtype other than float32.
    """
    if gradient is None:
        return
    where = f"TPUEmbedding.apply_gradients: feature {path!r} (argument `gradients`)"
    if not isinstance(gradient, tf.Tensor):
        hint = (
            " (tf.convert_to_tensor makes it one)" if isinstance(gradient, tf.IndexedSlices) else ""
        )
        raise ValueError(
            f"{where} must be a tf.Tensor or None; received {type(gradient).__name__}{hint}."
        )
    if gradient.dtype != tf.float32:
        raise TypeError(f"{where} must be float32; received {gradient.dtype.name}.")
    if not gradient.shape.is_compatible_with(shape):
        raise ValueError(
            f"{where} must have the shape of its activations {shape}; received {gradient.shape}."
        )


def check_slots(tables: list[Any], variables: dict[str, dict[str, Any]]) -> None:
    """Checks each table's variable and Adam slots before the first update.

    TF creates the slots, with a `slot_variable_creation_fn` if the optimizer
    has one; checked here, a bad one is refused before any table steps.

    Raises:
      TypeError: a table, `momenta` or `velocities` that is not a float32
        `tf.Variable` of the table's shape.
    """
    for table in tables:
        shape = [table.vocabulary_size, table.dim]
        for slot in ("parameters", "momenta", "velocities"):
            variable = variables[table.name].get(slot)
            if not (
                isinstance(variable, tf.Variable)
                and variable.dtype == tf.float32
                and variable.shape == shape
            ):
                described = (
                    f"{variable.dtype.name} variable of shape {variable.shape}"
                    if isinstance(variable, tf.Variable)
                    else type(variable).__name__
                )
                raise TypeError(
                    f"Table {table.name!r}: `{slot}` must be a float32 tf.Variable of shape "
                    f"{shape} to train with Adam (a slot_variable_creation_fn makes the "
                    f"slots); received {described}."
                )
