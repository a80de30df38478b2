"""TF's `AdamParameters` in an `EmbeddingConfigSpec`, taken as ours at the boundary.

TF's estimator names a table's slot variables by `isinstance` against the
public alias `tf.compat.v1.tpu.experimental.AdamParameters`
(`_tpu_estimator_embedding._get_slot_variable_names`), which `install()`
points at `tpu_embed_adam.AdamParameters`. An instance of TF's own class
(made before `install()`, or through a reference to TF's class) then matches
no optimizer there and TF refuses it. Ours is a subclass of TF's class, so
parameters converted to ours match the alias, installed or not.
"""

from __future__ import annotations

from typing import Any

from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

from tpu_embed_adam.params import as_adam_parameters


def adam_as_ours(value: Any, where: str) -> Any:
    """Returns Adam parameters (TF's or ours) as `tpu_embed_adam.AdamParameters`.

    Args:
      value: the optimization parameters of a spec or a table; anything but
        Adam (another optimizer, None) is returned as it is.
      where: the argument that holds `value`, for the error message.

    Returns:
      `value` as ours, validated, if it is Adam; else `value`.

    Raises:
      TypeError, ValueError: Adam parameters that
        `tpu_embed_adam.AdamParameters` refuses, with its error type; the
        message starts with `where`.
    """
    if not isinstance(value, tf_tpu_embedding.AdamParameters):
        return value
    try:
        return as_adam_parameters(value)
    except (TypeError, ValueError) as err:
        # The same type as the class raises: one rule set, one error type.
        raise type(err)(f"{where}: {err}") from err


def spec_with_our_adam(spec: Any) -> Any:
    """Returns `spec` with its Adam parameters and its tables' as ours.

    Args:
      spec: an `EmbeddingConfigSpec`.

    Returns:
      The spec, with every `AdamParameters` (the spec's, and each
      `table_to_config_dict` table's) a `tpu_embed_adam.AdamParameters`.

    Raises:
      ValueError: Adam parameters that `tpu_embed_adam.AdamParameters`
        refuses, naming the argument that holds them.
    """
    where = "embedding_config_spec"
    tables = spec.table_to_config_dict
    if tables:
        tables = {
            name: table._replace(
                optimization_parameters=adam_as_ours(
                    table.optimization_parameters,
                    f"{where}.table_to_config_dict[{name!r}].optimization_parameters",
                )
            )
            for name, table in tables.items()
        }
    return spec._replace(
        optimization_parameters=adam_as_ours(
            spec.optimization_parameters, f"{where}.optimization_parameters"
        ),
        table_to_config_dict=tables,
    )
