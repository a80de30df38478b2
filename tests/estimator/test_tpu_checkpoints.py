"""CPU checkpoints and the graph TPUEstimator builds for a TPU restore into each other.

The TPU side is TPUEstimator's own variable creation (`get_full_variable_names`
from the columns in TPU mode, then `TPUEmbedding.create_variables_and_ops`),
built here for two TPU hosts on an in-process cluster of workers: each table
and slot is then two partitions, saved as slices of the full tensors.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from estimator_harness import (
    COLUMN_BATCH,
    COLUMN_STEPS,
    TABLE_NAMES,
    ColumnRun,
    Slots,
    column_layer,
    columns,
    replay,
    spec_of,
)
from harness_cluster import cluster
from tensorflow.python.tpu import tpu_embedding, tpu_function
from tensorflow_estimator.python.estimator.tpu import _tpu_estimator_embedding as tf_tpu_est_emb

NUM_HOSTS = 2


def tpu_graph(run: ColumnRun):
    """TPUEstimator's TPU-side variables for `run`'s spec: (graph, variables, saver)."""
    graph = tf.Graph()
    cols = columns(None)  # Partitioned variables take TF's initializers.
    spec = spec_of(cols, run.spec.optimization_parameters)
    with graph.as_default():
        tables, features = tf_tpu_est_emb.get_configs_from_feature_columns(cols)
        emb = tpu_embedding.TPUEmbedding(
            tables,
            features,
            COLUMN_BATCH * NUM_HOSTS,
            tpu_embedding.TRAINING,
            master=None,
            optimization_parameters=spec.optimization_parameters,
            device_config=tpu_embedding.DeviceConfig(NUM_HOSTS, NUM_HOSTS, "/job:worker"),
        )
        # The model_fn's column calls in TPU mode record the variable scopes.
        inputs = {
            f: tf.zeros([COLUMN_BATCH, int(tables[c.table_id].dimension)])
            for f, c in features.items()
        }
        with tpu_function.tpu_shard_context(NUM_HOSTS):
            column_layer(cols)(inputs)
        names, slot_names = tf_tpu_est_emb.get_full_variable_names(
            graph, tables, spec.optimization_parameters
        )
        variables = emb.create_variables_and_ops(names, slot_names)
        tf.compat.v1.get_variable("bias", [], initializer=tf.zeros_initializer())
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
    return graph, variables, saver


def _full(parts):
    return np.concatenate(parts)


def test_cpu_checkpoint_restores_into_tpu_graph(tmp_path):
    run = ColumnRun(tmp_path / "cpu")
    reader = run.train()
    graph, variables, saver = tpu_graph(run)
    servers = cluster(NUM_HOSTS)
    with graph.as_default(), tf.compat.v1.Session(servers[0].target) as sess:
        saver.restore(sess, tf.train.latest_checkpoint(run.model_dir))
        for table, name in TABLE_NAMES.items():
            parts = variables.embedding_variables_by_table[table]
            assert [p.name for p in parts] == [f"{name}/part_{i}:0" for i in range(NUM_HOSTS)]
            np.testing.assert_array_equal(_full(sess.run(list(parts))), reader.get_tensor(name))
            slots = variables.slot_variables_by_table[table]
            for got, suffix in ((slots.m, "/Adam/m"), (slots.v, "/Adam/v")):
                np.testing.assert_array_equal(
                    _full(sess.run(list(got))), reader.get_tensor(name + suffix)
                )


def test_tpu_checkpoint_trains_on_cpu(tmp_path):
    run = ColumnRun(tmp_path)
    graph, variables, saver = tpu_graph(run)
    rng = np.random.default_rng(11)
    start = {}
    servers = cluster(NUM_HOSTS)
    with graph.as_default(), tf.compat.v1.Session(servers[0].target) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        for table in TABLE_NAMES:
            slots = variables.slot_variables_by_table[table]
            values = []
            for group in (variables.embedding_variables_by_table[table], slots.m, slots.v):
                full = np.concatenate([sess.run(p) for p in group])
                full = (
                    rng.normal(size=full.shape) if not values else rng.uniform(0.0, 0.1, full.shape)
                ).astype(np.float32)
                offset = 0
                for part in group:
                    rows = part.shape[0]
                    part.load(full[offset : offset + rows], sess)
                    offset += rows
                values.append(full)
            start[table] = Slots(*values)
        saver.save(sess, str(tmp_path / "model.ckpt"), global_step=0)
    run.train()  # Restores the TPU checkpoint from its model_dir, then trains.
    want = replay(
        run.emb, start, run.batches[:COLUMN_STEPS], run.targets[:COLUMN_STEPS], run.fetched
    )
    reader = tf.train.load_checkpoint(run.model_dir)
    for table, name in TABLE_NAMES.items():
        for slot, suffix in (("w", ""), ("m", "/Adam/m"), ("v", "/Adam/v")):
            np.testing.assert_array_equal(
                reader.get_tensor(name + suffix), getattr(want.state[table], slot)
            )
