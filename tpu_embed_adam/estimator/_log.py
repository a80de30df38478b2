"""The log lines of `TPUEstimator` on the engine, through TF's logger.

TF's logger rather than absl's (which the rest of the package uses): these
lines belong beside TPUEstimator's own, and follow the verbosity estimator
programs set with `tf.compat.v1.logging.set_verbosity`, which leaves absl's
INFO lines hidden.
"""

from __future__ import annotations

from collections.abc import Mapping

from tensorflow.python.platform import tf_logging as logging
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding


def log_training(emb: tf_tpu_embedding.TPUEmbedding, names: Mapping[str, str] | None) -> None:
    """Logs (INFO), in one line, the tables the engine trains and their optimizer.

    A TPU program moved to CPU runs the same code with the engine or without
    it (TF's own `TPUEstimator(use_tpu=False)` trains the tables with the
    model_fn's optimizer instead): the line says which one runs.

    Args:
      emb: the TRAIN mode `TPUEmbedding` of the spec.
      names: the tables' variable names by table (those of the checkpoint);
        None: the tables' own names.
    """
    shown = {table: (names or {}).get(table, table) for table in emb.table_to_config_dict}
    overrides = []
    for table, config in emb.table_to_config_dict.items():
        if config.optimization_parameters is not None:
            overrides.append(f"table {shown[table]!r}: {config.optimization_parameters!r}")
        if config.learning_rate is not None:
            overrides.append(f"table {shown[table]!r}: learning_rate={config.learning_rate!r}")
        if config.learning_rate_fn is not None:
            overrides.append(f"table {shown[table]!r}: learning_rate_fn")
    logging.info(
        "tpu_embed_adam: the software TPU embedding engine trains tables %s with %r%s",
        sorted(shown.values()),
        emb.optimization_parameters,
        "".join(f"; {override}" for override in overrides),
    )


def warn_tpu_export_skipped() -> None:
    """Warns that `export_saved_model` skips the TPU serving graph, and why."""
    logging.warning(
        "tpu_embed_adam: export_saved_model writes the CPU serving graph only and skips "
        "TPUEstimator's TPU one (export_to_tpu=True): TF builds that by rewriting the "
        "model_fn for TPU inference, where the TPU embedding tables are never created, "
        "so off a TPU it fails ('Variable does not exist'). Pass "
        "export_to_tpu=False to TPUEstimator to silence this."
    )
