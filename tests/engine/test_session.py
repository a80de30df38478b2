"""`retrieve_touched_ops` brings the variables up to date by copying only the rows trained."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph
from harness_numpy_model import assert_state_equal, random_targets
from tensorflow.python.tpu import tpu_embedding as te

from tpu_embed_adam import engine
from tpu_embed_adam.engine._state import library

TABLES = {
    "users": te.TableConfig(vocabulary_size=13, dimension=4),
    "items": te.TableConfig(vocabulary_size=8, dimension=3),
}
FEATURES = {"user": te.FeatureConfig("users"), "item": te.FeatureConfig("items")}


@pytest.fixture(autouse=True)
def fresh_engine():
    engine.reset()
    yield
    engine.reset()


def _graph(num_hosts: int = 1, **adam) -> EmbeddingGraph:
    graph = EmbeddingGraph(
        TABLES,
        FEATURES,
        optimization_parameters=te.AdamParameters(0.05, **adam),
        num_hosts=num_hosts,
        local=num_hosts == 1,
    )
    graph.run_init()
    graph.load()
    with graph.graph.as_default():
        graph.touched_ops = engine.retrieve_touched_ops(graph.vars)
    return graph


def _train(graph: EmbeddingGraph, steps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), step)


@pytest.mark.parametrize("num_hosts", [1, 2])
def test_touched_rows_bring_the_variables_to_what_a_full_retrieve_gives(num_hosts):
    graph = _graph(num_hosts)
    try:
        for loop in range(3):
            _train(graph, steps=2, seed=loop)
            graph.session.run(graph.touched_ops)
            assert engine.unretrieved_tables() == {}
            got = graph.read()
            want = graph.retrieve()
            assert_state_equal(got, want)
    finally:
        graph.close()


def _touched_ids(table: str, num_shards: int = 1, shard: int = 0) -> np.ndarray:
    ids, *_ = library().tpu_embed_adam_retrieve_touched(
        table_name=table, num_shards=num_shards, shard_id=shard
    )
    return np.sort(ids.numpy())


def test_only_the_rows_trained_since_the_last_retrieve_are_copied():
    graph = _graph()
    try:
        rng = np.random.default_rng(3)
        batch = graph.random_batch(rng)
        graph.train_step(batch, random_targets(rng, graph.emb), 1)
        trained = np.unique(np.concatenate([core["user"].ids for core in batch]))
        np.testing.assert_array_equal(_touched_ids("users"), trained)
        # Copied: nothing is left until the next step.
        assert _touched_ids("users").size == 0
        graph.train_step(batch, random_targets(rng, graph.emb), 2)
        graph.retrieve()  # a full retrieve also leaves nothing to copy
        assert _touched_ids("users").size == 0
    finally:
        graph.close()


def test_a_non_lazy_step_touches_every_row():
    graph = _graph(lazy_adam=False)
    try:
        _train(graph, steps=1)
        np.testing.assert_array_equal(_touched_ids("items"), np.arange(8))
    finally:
        graph.close()


def test_a_shard_never_loaded_is_refused():
    with pytest.raises(tf.errors.FailedPreconditionError, match="never loaded|not configured"):
        _touched_ids("users")
