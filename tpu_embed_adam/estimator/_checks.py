"""What the CPU engine path of TPUEstimator honours, checked at construction.

Each check names the argument or column it refuses: a TPU program that
silently trained differently on CPU would be worse than one that stops.
"""

from __future__ import annotations

from typing import Any

from tensorflow.python.tpu import feature_column_v2 as tpu_fc_v2
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

from tpu_embed_adam.estimator._spec import adam_as_ours

# Columns that look their rows up on the TensorCore or the host CPU of a TPU
# (embedding_lookup_device='tpu_tensor_core' / 'cpu'): they bypass the TPU
# embedding engine, which is what this path provides.
_DEVICE_SPECIFIC_COLUMNS = (
    tpu_fc_v2._TPUDeviceSpecificEmbeddingColumnV2,
    tpu_fc_v2._TPUSharedDeviceSpecificEmbeddingColumnV2,
)


def check_adam(value: Any, where: str) -> None:
    """Refuses optimization parameters the engine cannot train with.

    Args:
      value: the optimization parameters of a spec or a table.
      where: the argument that holds it, for the error message.

    Raises:
      ValueError: `value` is not Adam (TF's or ours), or fails
        `AdamParameters` validation; the message starts with `where`.
    """
    if not isinstance(value, tf_tpu_embedding.AdamParameters):
        raise ValueError(
            f"{where}: the CPU TPU embedding engine trains with Adam only; got "
            f"{type(value).__name__}. Use tf.compat.v1.tpu.experimental.AdamParameters "
            "or tpu_embed_adam.AdamParameters."
        )
    adam_as_ours(value, where)


def check_spec(spec: Any, train_batch_size: Any, eval_batch_size: Any) -> None:
    """Refuses an `EmbeddingConfigSpec` or batch size the CPU engine cannot honour.

    Args:
      spec: the `EmbeddingConfigSpec` given to `TPUEstimator`.
      train_batch_size: `TPUEstimator`'s `train_batch_size`.
      eval_batch_size: `TPUEstimator`'s `eval_batch_size` (None: no evaluation).

    Raises:
      ValueError: naming the argument, column or table that cannot be honoured.
    """
    _check_batch_size("train_batch_size", train_batch_size, required=True)
    _check_batch_size("eval_batch_size", eval_batch_size, required=False)
    if spec.optimization_parameters is None:
        raise ValueError(
            "embedding_config_spec.optimization_parameters is None: the CPU TPU "
            "embedding engine needs AdamParameters to train the tables."
        )
    check_adam(spec.optimization_parameters, "embedding_config_spec.optimization_parameters")
    if spec.tensor_core_feature_columns:
        names = [column.name for column in spec.tensor_core_feature_columns]
        raise ValueError(
            "embedding_config_spec.tensor_core_feature_columns: TensorCore embedding "
            f"columns {names} are not supported by the CPU TPU embedding engine."
        )
    for column in spec.feature_columns or ():
        if isinstance(column, _DEVICE_SPECIFIC_COLUMNS):
            raise ValueError(
                f"embedding_config_spec.feature_columns: column {column.name!r} uses "
                f"embedding_lookup_device={column._embedding_lookup_device.name.lower()!r}, which "
                "bypasses the TPU embedding engine; only the default 'tpu_embedding_core' "
                "lookup runs on the CPU engine."
            )
    for name, table in (spec.table_to_config_dict or {}).items():
        if table.optimization_parameters is not None:
            check_adam(
                table.optimization_parameters,
                f"embedding_config_spec.table_to_config_dict[{name!r}].optimization_parameters",
            )


# TF's TPUEmbeddingConfiguration holds a batch size in an int32: a larger one
# fails in TF's proto code when training starts, naming no argument.
_MAX_BATCH_SIZE = 2**31 - 1


def _check_batch_size(name: str, value: Any, required: bool) -> None:
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_BATCH_SIZE:
        raise ValueError(
            f"{name} must be a positive int, at most {_MAX_BATCH_SIZE}, when the CPU TPU "
            f"embedding engine serves embedding_config_spec (it sizes the engine's batches); "
            f"got {value!r}."
        )


def check_export(export_to_cpu: Any) -> None:
    """Refuses `export_to_cpu=False`: off a TPU, only the CPU serving graph exports.

    Raises:
      ValueError: `export_to_cpu` is false.
    """
    if not export_to_cpu:
        raise ValueError(
            f"export_to_cpu={export_to_cpu!r}: with the CPU TPU embedding engine, "
            "export_saved_model writes the CPU serving graph only (TF cannot build the TPU "
            "one off a TPU: its TPU inference graph never creates the embedding tables); "
            "leave export_to_cpu=True."
        )
