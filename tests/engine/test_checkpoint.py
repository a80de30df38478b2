"""Checkpoints interchange between the CPU engine and TF's own `TPUEmbedding` variables.

Variables are TF's, from `create_variables_and_ops()`: `{table}/part_i`,
`{table}/Adam/m/part_i`, `{table}/Adam/v/part_i` (part i = shard i = host i,
rows in the sharding strategy's order), plus `dummy_*` local variables when a
table has fewer rows than there are hosts. The engine only moves values in and
out of them through TF's load and retrieve ops, so a `tf.compat.v1.train.Saver`
checkpoint written after `retrieve_ops()` is an ordinary TF checkpoint.

Every graph below re-runs its initializers (fresh random values) right before a
restore or a retrieve, so that a restore or retrieve that wrote nothing fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph, assert_trains_like_numpy
from harness_numpy_model import assert_state_equal, random_state, random_targets
from tensorflow.python.tpu import tpu_embedding as te

import tpu_embed_adam  # noqa: F401  (loads the kernel library: registers the engine's kernels)
from tpu_embed_adam import engine

ADAM = te.AdamParameters(learning_rate=0.05)
HOSTS = 3


@pytest.fixture(autouse=True)
def fresh_engine():
    engine.reset()
    yield
    engine.reset()


def make_graph(strategy: str, num_hosts: int = HOSTS) -> EmbeddingGraph:
    tables = {
        "users": te.TableConfig(vocabulary_size=13, dimension=4, combiner="sum"),
        "items": te.TableConfig(vocabulary_size=8, dimension=3, combiner="mean"),
        "tiny": te.TableConfig(vocabulary_size=2, dimension=2, combiner="sqrtn"),
    }
    features = {
        "user": te.FeatureConfig("users"),
        "item": te.FeatureConfig("items"),
        "flag": te.FeatureConfig("tiny"),
    }
    return EmbeddingGraph(
        tables, features, optimization_parameters=ADAM, num_hosts=num_hosts,
        partition_strategy=strategy, weighted=("item",),
    )


def test_variables_are_named_and_partitioned_as_tf_makes_them():
    graph = make_graph("div")
    try:
        with graph.graph.as_default():
            global_names = {v.op.name for v in tf.compat.v1.global_variables()}
            local_names = {v.op.name for v in tf.compat.v1.local_variables()}
        for table, parts in (("users", 3), ("items", 3), ("tiny", 2)):
            for prefix in (table, f"{table}/Adam/m", f"{table}/Adam/v"):
                for i in range(parts):
                    assert f"{prefix}/part_{i}" in global_names
                assert f"{prefix}/part_{parts}" not in global_names
        # The third host's shard of `tiny` is fed from a dummy: never checkpointed.
        assert {"dummy_2_tiny", "dummy_2_tiny/Adam/m", "dummy_2_tiny/Adam/v"} <= local_names
        assert not any("dummy" in n for n in global_names)
    finally:
        graph.close()


@pytest.mark.parametrize("strategy", ["div", "mod"])
def test_checkpoint_after_retrieve_restores_into_tf_variables(strategy, tmp_path):
    trained = make_graph(strategy)
    try:
        model = assert_trains_like_numpy(trained, steps=2)
        saved = trained.read()
        path = trained.save(str(tmp_path / "ckpt"))
    finally:
        trained.close()
    keys = dict(tf.train.list_variables(path))
    for table, config in trained.emb.table_to_config_dict.items():
        for name in (table, f"{table}/Adam/m", f"{table}/Adam/v"):
            assert keys[name] == [config.vocabulary_size, config.dimension]
    # The gradient accumulator is the engine's hidden slot, as on TPU.
    assert not any("accum" in k.lower() for k in keys)

    engine.reset()
    fresh = make_graph(strategy)
    try:
        fresh.run_init()
        fresh.restore(path)
        restored = fresh.read()
    finally:
        fresh.close()
    assert_state_equal(restored, saved)
    for table, state in model.state.items():
        np.testing.assert_allclose(restored[table].w, state.w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("strategy", ["div", "mod"])
def test_tf_checkpoint_loads_into_engine_and_retrieves_unchanged(strategy, tmp_path):
    writer = make_graph(strategy)
    try:
        writer.run_init()
        want = random_state(writer.emb, seed=7)
        writer.write(want)
        path = writer.save(str(tmp_path / "ckpt"))
    finally:
        writer.close()

    engine.reset()
    reader = make_graph(strategy)
    try:
        reader.run_init()
        reader.restore(path)
        reader.load()
        # Scramble TF's copies so that only the engine still holds the checkpoint.
        reader.run_init()
        assert_state_equal(reader.retrieve(), want)
    finally:
        reader.close()


def test_tf_checkpoint_then_training_matches_the_reference(tmp_path):
    writer = make_graph("mod")
    try:
        writer.run_init()
        writer.write(random_state(writer.emb, seed=3))
        path = writer.save(str(tmp_path / "ckpt"))
    finally:
        writer.close()

    engine.reset()
    reader = make_graph("mod")

    def restore(graph: EmbeddingGraph) -> None:
        graph.run_init()
        graph.restore(path)

    try:
        assert_trains_like_numpy(reader, steps=2, initialize=restore)
    finally:
        reader.close()


def test_div_checkpoint_from_three_hosts_restores_into_one_host(tmp_path):
    """`div` parts are contiguous id ranges, so TF re-slices them for another host count."""
    trained = make_graph("div")
    try:
        assert_trains_like_numpy(trained, steps=1)
        saved = trained.read()
        path = trained.save(str(tmp_path / "ckpt"))
    finally:
        trained.close()

    engine.reset()
    single = make_graph("div", num_hosts=1)
    try:
        single.run_init()
        single.restore(path)
        single.load()
        single.run_init()
        assert_state_equal(single.retrieve(), saved)
    finally:
        single.close()


def test_retrieving_saver_saves_trained_tables(tmp_path):
    """`engine.RetrievingSaver`: a save without retrieve_ops() still holds the trained rows."""
    graph = make_graph("div")
    with graph.graph.as_default():
        saver = engine.RetrievingSaver(graph.retrieve_ops)
    graph.run_init()
    graph.load()
    rng = np.random.default_rng(0)
    for step in range(1, 3):
        batch = graph.random_batch(rng)
        graph.train_step(batch, random_targets(rng, graph.emb), step)
    with graph.graph.as_default():
        path = saver.save(graph.session, str(tmp_path / "ckpt"))
    trained = graph.retrieve()
    reader = tf.train.load_checkpoint(path)
    for table, state in trained.items():
        np.testing.assert_array_equal(reader.get_tensor(table), state.w)
        np.testing.assert_array_equal(reader.get_tensor(f"{table}/Adam/v"), state.v)
    assert np.any(trained["users"].v != 0)
