"""Session plumbing between TF variables and the engine's tables.

On a TPU, TPUEstimator configures the embedding engine and runs the load ops
when a session starts, and retrieves the tables into their variables after
each training loop. Here the load happens when a session starts
(`load_tables_at_session_start`), and the retrieve right before each
checkpoint save (`RetrievingSaver`): the variables only need the engine's
values when something reads them, and a retrieve copies whole tables
(seconds for large ones), too much for every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.tpu.ops import tpu_ops


def load_tables_at_session_start(
    config_proto: Any, load_ops_fn: Callable[[], list[Any]], init_ops: Sequence[Any]
) -> None:
    """Makes every session of the graph configure the engine and load the tables.

    Both join the scaffold's default local init op, which runs after the
    variables are initialised or restored from a checkpoint and before any
    hook: the first checkpoint `CheckpointSaverHook` writes (in
    `after_create_session`) then already retrieves loaded tables. They go
    in through the table initialisers, the one collection that op reads
    when the scaffold is finalised: metrics built after the model_fn
    returns (TPUEstimatorSpec's `eval_metrics`) add local variables that the
    default op must still initialise.

    Args:
      config_proto: the graph's `TPUEmbeddingConfiguration`.
      load_ops_fn: builds TF's load ops (`VariablesAndOps.load_ops`).
      init_ops: other ops to run once per session (dummy variables).
    """
    # The configuration replaces whatever another graph left in the engine;
    # the loads, built under it, wait for it.
    configure = tpu_ops.configure_tpu_embedding(config=config_proto.SerializeToString())
    with tf.control_dependencies([configure]):
        load_ops = load_ops_fn()
    loaded = tf.group(configure, *init_ops, *load_ops, name="tpu_embed_adam_load_tables")
    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS, loaded)


class RetrievingSaver(tf.compat.v1.train.Saver):
    """A `Saver` that copies the engine's tables into their variables first.

    Without the retrieve, a checkpoint would hold the tables as loaded, not
    as trained. Every `save` (periodic, final, by a hook) retrieves. Use it
    in place of `tf.compat.v1.train.Saver` in a `TPUEmbedding` program::

        saver = tpu_embed_adam.engine.RetrievingSaver(ops.retrieve_ops())
        saver.save(sess, path)  # retrieve, then save
    """

    def __init__(self, retrieve_ops: Sequence[Any], *args: Any, **kwargs: Any):
        """Builds the saver.

        Args:
          retrieve_ops: TF's retrieve ops of the graph's `TPUEmbedding`.
          *args: passed to `tf.compat.v1.train.Saver`.
          **kwargs: passed to `tf.compat.v1.train.Saver`.
        """
        super().__init__(*args, **kwargs)
        self._retrieve = tf.group(*retrieve_ops, name="tpu_embed_adam_retrieve_before_save")

    def save(self, sess: Any, *args: Any, **kwargs: Any) -> Any:
        """Retrieves the tables, then saves; arguments as `Saver.save`."""
        sess.run(self._retrieve)
        return super().save(sess, *args, **kwargs)
