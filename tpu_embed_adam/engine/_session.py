"""Session plumbing between TF variables and the engine's tables.

On a TPU, TPUEstimator configures the embedding engine and runs the load ops
when a session starts, and retrieves the tables into their variables after
each training loop. Here the load happens when a session starts
(`load_tables_at_session_start`); after each loop `retrieve_touched_ops`
copies only the rows trained since the last retrieve (a full retrieve copies
whole tables, seconds for large ones), and `RetrievingSaver` retrieves in
full before each checkpoint save.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.tpu import tpu_embedding
from tensorflow.python.tpu.ops import tpu_ops

from tpu_embed_adam.engine._state import library


def load_tables_at_session_start(
    config_proto: Any,
    load_ops_fn: Callable[[], list[Any]],
    init_ops: Sequence[Any],
    devices: Sequence[str] | None = None,
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
      devices: where to configure: one device per process whose engine
        holds hosts (each worker of a multi-process cluster); default one
        configuration op, where TF places it.
    """
    # The configuration replaces whatever another graph left in the engine;
    # the loads, built under it, wait for it.
    configure = configure_ops(config_proto, devices)
    with tf.control_dependencies(configure):
        load_ops = load_ops_fn()
    loaded = tf.group(*configure, *init_ops, *load_ops, name="tpu_embed_adam_load_tables")
    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TABLE_INITIALIZERS, loaded)


def configure_ops(config_proto: Any, devices: Sequence[str] | None = None) -> list[tf.Operation]:
    """Builds `ConfigureTPUEmbedding` ops: one per device, or one where TF places it.

    Each process of a multi-process cluster has its own engine, and a
    configuration replaces another only where its op runs.

    Args:
      config_proto: the `TPUEmbeddingConfiguration`.
      devices: one device per process to configure; None: one op, unplaced.

    Returns:
      The ops.
    """
    config = config_proto.SerializeToString()
    if devices is None:
        return [tpu_ops.configure_tpu_embedding(config=config)]
    ops = []
    for device in devices:
        with tf.device(device):
            ops.append(tpu_ops.configure_tpu_embedding(config=config))
    return ops


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


def retrieve_touched_ops(variables_and_ops: tpu_embedding.VariablesAndOps) -> list[tf.Operation]:
    """Builds ops that copy into the variables only the rows trained since the last retrieve.

    Where `retrieve_ops()` copies every table whole, each of these ops takes
    from the engine the rows of one shard that steps changed since that
    shard's last load or retrieve (every row once a non-lazy Adam step ran)
    and writes them, with both Adam slots, into the shard's variables:
    straight into the buffers of resource variables, in parallel
    (`TpuEmbedAdamRetrieveTouchedInto`), through a scatter for reference ones.
    After it the variables equal the engine's tables, as after
    `retrieve_ops()`, at a cost that follows the rows trained: what a
    TPUEstimator train op does after every loop. Tables without Adam slots
    (an INFERENCE configuration) train nothing and get no op.

    Args:
      variables_and_ops: what `TPUEmbedding.create_variables_and_ops()` returned.

    Returns:
      One op per table shard, each colocated with its shard's variable.
    """
    ops = []
    for table, parts in variables_and_ops.embedding_variables_by_table.items():
        slots = variables_and_ops.slot_variables_by_table.get(table)
        if not isinstance(slots, tpu_embedding.AdamSlotVariables):
            continue
        for shard, (w, m, v) in enumerate(zip(parts, slots.m, slots.v, strict=True)):
            name = f"tpu_embed_adam_retrieve_touched_{shard}"
            with tf.compat.v1.colocate_with(w):
                if all(isinstance(var, resource_variable_ops.BaseResourceVariable)
                       for var in (w, m, v)):
                    # The engine writes the rows into the variables' buffers:
                    # no rows in between and no scatter.
                    ops.append(library().tpu_embed_adam_retrieve_touched_into(
                        w.handle, m.handle, v.handle, table_name=table,
                        num_shards=len(parts), shard_id=shard, name=name))
                    continue
                # Reference variables (TF1 without resource variables).
                ids, *rows = library().tpu_embed_adam_retrieve_touched(
                    table_name=table, num_shards=len(parts), shard_id=shard
                )
                ops.append(
                    tf.group(
                        *(
                            tf.compat.v1.scatter_update(var, ids, values)
                            for var, values in zip((w, m, v), rows, strict=True)
                        ),
                        name=name,
                    )
                )
    return ops
