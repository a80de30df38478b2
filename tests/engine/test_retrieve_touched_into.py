"""`TpuEmbedAdamRetrieveTouchedInto` refuses variables it cannot write, before writing any."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph
from harness_numpy_model import random_targets
from tensorflow.python.tpu import tpu_embedding as te

from tpu_embed_adam import engine
from tpu_embed_adam.engine._state import library

TABLES = {"users": te.TableConfig(vocabulary_size=13, dimension=4)}
FEATURES = {"user": te.FeatureConfig("users")}


@pytest.fixture
def trained():
    engine.reset()
    graph = EmbeddingGraph(
        TABLES, FEATURES, optimization_parameters=te.AdamParameters(0.05), num_hosts=1, local=True
    )
    graph.run_init()
    graph.load()
    rng = np.random.default_rng(0)
    graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), 1)
    yield graph
    graph.close()
    engine.reset()


def _into(*variables: tf.Variable) -> None:
    library().tpu_embed_adam_retrieve_touched_into(
        *(v.handle for v in variables), table_name="users", num_shards=1, shard_id=0
    )


def test_variables_of_another_shape_are_refused_and_the_rows_stay_in_the_engine(trained):
    wrong = [tf.Variable(tf.zeros([13, 5])) for _ in range(3)]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"parameters has shape \[13,5\]"):
        _into(*wrong)
    assert engine.unretrieved_tables() == {"users": 1}


def test_one_variable_for_two_arrays_is_refused(trained):
    var, other = tf.Variable(tf.zeros([13, 4])), tf.Variable(tf.zeros([13, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="three different variables"):
        _into(var, var, other)
    assert engine.unretrieved_tables() == {"users": 1}


def test_rows_are_written_into_the_variables_and_count_as_a_retrieve(trained):
    variables = [tf.Variable(tf.zeros([13, 4])) for _ in range(3)]
    _into(*variables)
    assert engine.unretrieved_tables() == {}
    rows = np.flatnonzero(variables[1].numpy().any(axis=1))  # momenta: the rows trained
    assert rows.size > 0
    want = trained.retrieve()["users"]
    for got, array in zip(variables, (want.w, want.m, want.v), strict=True):
        np.testing.assert_array_equal(got.numpy()[rows], array[rows])
