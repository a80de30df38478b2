"""What TPUEstimator and public TPU programs add around `TPUEmbedding`, on CPU.

TPUEstimator (use_tpu=False plus the engine) captures the activations'
gradients through `TPUEmbeddingActivations` ops, sums gradients with
`CrossShardOptimizer` (`CrossReplicaSum`), builds `INFERENCE`-mode embeddings
for EVAL/PREDICT, and brackets a program with `tpu.initialize_system()` /
`tpu.shutdown_system()`. A loss linear in the activations makes TF prune
`RecvTPUEmbeddingActivations` from the Send step. Each is checked against
the numpy model (`reference.adam_update`) or the plain TF equivalent.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_cluster import LOCAL_JOB, core_device
from harness_graph import EmbeddingGraph, assert_trains_like_numpy
from harness_numpy_model import (
    NumpyModel,
    Slots,
    assert_state_equal,
    constant_learning_rate,
    random_state,
    random_targets,
)
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2
from tensorflow.python.tpu import tpu, tpu_function, tpu_optimizer
from tensorflow.python.tpu import tpu_embedding as te
from tensorflow.python.tpu.ops import tpu_ops
from tensorflow.python.tpu.topology import Topology

import tpu_embed_adam  # noqa: F401  (loads the kernel library: registers the engine's kernels)
from tpu_embed_adam import engine

ADAM = te.AdamParameters(learning_rate=0.05)
raw = tf.raw_ops


@pytest.fixture(autouse=True)
def fresh_engine():
    engine.reset()
    yield
    engine.reset()


def tables() -> dict[str, te.TableConfig]:
    # "sum" everywhere: the numpy lookup then adds the same float32 rows in
    # the same order as the engine, so activations compare bit for bit.
    return {
        "users": te.TableConfig(vocabulary_size=13, dimension=4, combiner="sum"),
        "items": te.TableConfig(vocabulary_size=8, dimension=3, combiner="sum"),
    }


def features() -> dict[str, te.FeatureConfig]:
    return {
        "user": te.FeatureConfig("users"),
        "friends": te.FeatureConfig("users"),
        "item": te.FeatureConfig("items"),
    }


def graph(**kwargs) -> EmbeddingGraph:
    kwargs.setdefault("optimization_parameters", ADAM)
    return EmbeddingGraph(tables(), features(), local=True, **kwargs)


def op_types(g: EmbeddingGraph) -> set[str]:
    return {op.type for op in g.graph.get_operations()}


# --------------------------------------------------------------------------
# TPUEmbeddingActivations: TPUEstimator's gradient capture.


def test_dummy_table_variables_train_as_tf_gradients_do():
    results = []
    for dummy in (False, True):
        engine.reset()
        g = graph(dummy_table_variables=dummy)
        try:
            assert ("TPUEmbeddingActivations" in op_types(g)) == dummy
            start = random_state(g.emb, seed=5)

            def initialize(g: EmbeddingGraph, start=start) -> None:
                g.run_init()  # the dummy variables too
                g.write(start)

            assert_trains_like_numpy(g, steps=3, seed=9, initialize=initialize)
            results.append(g.retrieve())
        finally:
            g.close()
    plain, captured = results
    # The same steps, bit for bit: the captured gradients are tf.gradients'.
    assert_state_equal(captured, plain)
    assert not np.array_equal(captured["users"].w, start["users"].w)


def test_embedding_activations_forwards_the_activations():
    acts = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = raw.TPUEmbeddingActivations(
        embedding_variable=np.zeros(1, np.float32), sliced_activations=acts, table_id=0, lookup_id=0
    )
    np.testing.assert_array_equal(got.numpy(), acts)


# --------------------------------------------------------------------------
# CrossReplicaSum: CrossShardOptimizer in a one-replica run.


def _sgd_run(opt_fn, shards: int | None, steps: int = 3) -> np.ndarray:
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable(
            "w", initializer=np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), use_resource=True
        )
        x = tf.constant([[0.3, -0.7], [1.1, 0.2]])
        loss = tf.reduce_sum(tf.square(tf.matmul(x, w) - 1.0))
        if shards is None:
            train = opt_fn().minimize(loss)
        else:
            with tpu_function.tpu_shard_context(shards):
                train = opt_fn().minimize(loss)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for _ in range(steps):
                sess.run(train)
            return sess.run(w)


def test_cross_shard_optimizer_trains_like_the_plain_optimizer():
    plain = _sgd_run(lambda: tf.compat.v1.train.GradientDescentOptimizer(0.05), None)
    cross = _sgd_run(
        lambda: tpu_optimizer.CrossShardOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(0.05)
        ),
        1,
    )
    np.testing.assert_array_equal(cross, plain)
    assert not np.array_equal(plain, [[1.0, -2.0], [0.5, 3.0]])


def test_cross_shard_optimizer_over_two_replicas_is_refused():
    opt = lambda: tpu_optimizer.CrossShardOptimizer(  # noqa: E731
        tf.compat.v1.train.GradientDescentOptimizer(0.05)
    )
    with pytest.raises(
        tf.errors.UnimplementedError,
        match="CrossReplicaSum: group_assignment has groups of size 2; the CPU kernel "
        "supports only one replica per CPU run",
    ):
        _sgd_run(opt, 2)


@pytest.mark.parametrize(
    "dtype", [tf.half, tf.bfloat16, tf.float32, tf.float64, tf.int32, tf.uint32]
)
def test_cross_replica_sum_is_the_identity_for_groups_of_one(dtype):
    x = tf.cast(tf.constant([[1, 2, 3], [4, 5, 6]]), dtype)
    for groups in ([[0]], [[0], [1], [2]]):
        got = raw.CrossReplicaSum(input=x, group_assignment=groups)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.numpy(), x.numpy())


@pytest.mark.parametrize("groups", [[0], [[]], np.zeros((0, 1), np.int32)])
def test_cross_replica_sum_bad_group_assignment(groups):
    with pytest.raises(tf.errors.InvalidArgumentError, match="group_assignment must be"):
        raw.CrossReplicaSum(input=[1.0], group_assignment=groups)


# --------------------------------------------------------------------------
# INFERENCE mode: what TPUEstimator builds for EVAL and PREDICT.


def test_inference_graph_restores_a_trained_checkpoint_and_looks_it_up(tmp_path):
    trainer = graph()
    try:
        assert_trains_like_numpy(trainer, steps=2, seed=3)
        trained = trainer.retrieve()
        path = trainer.save(str(tmp_path / "model"))
    finally:
        trainer.session.close()
    assert engine.info()["num_hosts"] == 1

    server = graph(mode=te.INFERENCE, optimization_parameters=None)
    try:
        assert {"LoadTPUEmbeddingStochasticGradientDescentParameters"} <= op_types(server)
        assert "LoadTPUEmbeddingADAMParameters" not in op_types(server)
        server.restore(path)
        # initialize_system_for_tpu_embedding (ConfigureTPUEmbedding) with
        # the INFERENCE configuration replaces the TRAINING one.
        server.load()
        rng = np.random.default_rng(4)
        model = NumpyModel(
            server.emb, {t: Slots(s.w, s.m, s.v) for t, s in trained.items()}
        )
        for _ in range(2):
            batch = server.random_batch(rng)
            got = server.lookup(batch)
            for core_got, core_batch in zip(got, batch, strict=True):
                for f, want in model.activations(core_batch).items():
                    np.testing.assert_array_equal(core_got[f], want, err_msg=f)
        server.session.run(server.retrieve_ops)
        for t, table in server.read_tables().items():
            np.testing.assert_array_equal(table, trained[t].w)

        with server.graph.as_default(), tf.device(core_device(0, 0, LOCAL_JOB)):
            zeros = [tf.zeros(a.shape) for a in server.activations[0].values()]
            send = tpu_ops.send_tpu_embedding_gradients(inputs=zeros, config="")
        server.enqueue(server.random_batch(rng))
        with pytest.raises(tf.errors.FailedPreconditionError, match="INFERENCE mode"):
            server.session.run(send)
        # Nothing trained: the table is what the checkpoint held.
        server.session.run(server.retrieve_ops)
        np.testing.assert_array_equal(server.read_tables()["users"], trained["users"].w)
        with pytest.raises(tf.errors.InvalidArgumentError, match="is configured for "
                           "LoadTPUEmbeddingStochasticGradientDescentParameters"):
            raw.LoadTPUEmbeddingADAMParameters(
                parameters=trained["items"].w, momenta=trained["items"].m,
                velocities=trained["items"].v, num_shards=1, shard_id=0, table_name="items",
            )
    finally:
        server.close()

    # And back: the TRAINING graph's initialize_system reconfigures and trains on.
    trainer = graph()
    try:
        trainer.restore(path)
        assert_trains_like_numpy(trainer, steps=1, seed=6, initialize=lambda g: None)
    finally:
        trainer.close()


def _inference_config(optimizer: str) -> bytes:
    cfg = cfg_pb2.TPUEmbeddingConfiguration(
        mode=cfg_pb2.TPUEmbeddingConfiguration.INFERENCE, num_hosts=1, num_tensor_cores=1
    )
    t = cfg.table_descriptor.add(name="t", vocabulary_size=4, dimension=2)
    t.optimization_parameters.learning_rate.constant = 1.0
    getattr(t.optimization_parameters, optimizer).SetInParent()
    cfg.feature_descriptor.add(table_id=0, input_shape=[2])
    return cfg.SerializeToString()


def test_inference_config_refuses_other_optimizers_and_training_batches():
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="table 't' uses optimizer 'adagrad'; in INFERENCE mode"):
        raw.ConfigureTPUEmbedding(config=_inference_config("adagrad"))
    assert not engine.info()["configured"]
    cfg = _inference_config("stochastic_gradient_descent")
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    raw.LoadTPUEmbeddingStochasticGradientDescentParameters(
        parameters=table, num_shards=1, shard_id=0, table_name="t", config=cfg
    )
    ids = [np.array([3, 1], np.int64)]
    enqueue = dict(
        sample_indices_or_row_splits=[np.zeros(0, np.int64)], embedding_indices=ids,
        aggregation_weights=[np.zeros(0, np.float32)], device_ordinal=0,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="configuration is in INFERENCE"):
        raw.EnqueueTPUEmbeddingArbitraryTensorBatch(mode_override="train", **enqueue)
    assert engine.info()["queued_batches"] == 0
    raw.EnqueueTPUEmbeddingArbitraryTensorBatch(mode_override="unspecified", **enqueue)
    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    np.testing.assert_array_equal(act.numpy(), table[[3, 1]])
    got = raw.RetrieveTPUEmbeddingStochasticGradientDescentParameters(
        num_shards=1, shard_id=0, table_name="t"
    )
    np.testing.assert_array_equal(got.numpy(), table)


# --------------------------------------------------------------------------
# tpu.initialize_system() / tpu.shutdown_system().


def test_initialize_system_load_train_retrieve_shutdown():
    g = graph(initialize_system=False)
    try:
        with g.graph.as_default():
            init = tpu.initialize_system(embedding_config=g.emb.config_proto)
            shutdown = tpu.shutdown_system()
        assert "ConfigureDistributedTPU" in op_types(g)
        topology = Topology(serialized=g.session.run(init))
        assert (topology.num_tasks, topology.num_tpus_per_task) == (1, 1)
        assert engine.info()["configured"]
        assert_trains_like_numpy(g, steps=2, seed=1)
        g.session.run(shutdown)
        assert not engine.info()["configured"]
    finally:
        g.close()


def test_configure_distributed_tpu_installs_its_embedding_config():
    cfg = cfg_pb2.TPUEmbeddingConfiguration(
        num_hosts=2, num_tensor_cores=6, mode=cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    )
    t = cfg.table_descriptor.add(name="t", vocabulary_size=4, dimension=2)
    t.optimization_parameters.learning_rate.constant = 0.1
    t.optimization_parameters.adam.epsilon = 1e-3
    cfg.feature_descriptor.add(table_id=0, input_shape=[2])
    topology = Topology(
        serialized=raw.ConfigureDistributedTPU(embedding_config=cfg.SerializeToString()).numpy()
    )
    assert (topology.num_tasks, topology.num_tpus_per_task) == (2, 3)
    assert topology.device_coordinates.shape == (2, 3, 4)
    assert len({tuple(c) for c in topology.device_coordinates.reshape(-1, 4)}) == 6
    info = engine.info()
    assert (info["num_hosts"], info["cores_per_host"]) == (2, 3)
    bad = cfg_pb2.TPUEmbeddingConfiguration(
        num_hosts=1, num_tensor_cores=1, mode=cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    )
    bad.table_descriptor.add(name="t", vocabulary_size=0, dimension=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary_size 0"):
        raw.ConfigureDistributedTPU(embedding_config=bad.SerializeToString())
    assert engine.info()["num_hosts"] == 2


# --------------------------------------------------------------------------
# Send when TF pruned Recv.


def test_send_trains_when_tf_prunes_recv_from_a_linear_loss():
    g = graph(linear_loss=True)
    try:
        needed = tf.compat.v1.graph_util.extract_sub_graph(
            g.graph.as_graph_def(), [op.name for op in g.send_ops]
        )
        ops_needed = {n.op for n in needed.node}
        assert "SendTPUEmbeddingGradients" in ops_needed
        assert "RecvTPUEmbeddingActivations" not in ops_needed
        start = random_state(g.emb, seed=2)
        g.write(start)
        g.load()
        model = NumpyModel(g.emb, start, linear_loss=True)
        rates = {t: constant_learning_rate(g.emb, t) for t in g.tables}
        rng = np.random.default_rng(8)
        for step in range(1, 4):
            batch = g.random_batch(rng)
            targets = random_targets(rng, g.emb)
            g.send_step(batch, targets, step)
            assert engine.info()["queued_batches"] == 0
            model.step(batch, targets, rates)
        assert_state_equal(g.retrieve(), model.state)
    finally:
        g.close()
