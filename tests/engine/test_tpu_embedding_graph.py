"""TF's own v1 `TPUEmbedding` graph trains on CPU through the engine, as the numpy model says.

Each test builds `tensorflow.python.tpu.tpu_embedding.TPUEmbedding` unchanged,
runs it on a local cluster of `tf.distribute.Server` workers (one per host,
one logical CPU device per core), and compares activations and the loss every
step, then every table and slot after `retrieve_ops()`, with
`harness_numpy_model.NumpyModel` (numpy lookup + `reference.adam_update`).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph, assert_trains_like_numpy
from harness_numpy_model import NumpyModel, four_features, random_targets
from harness_sharding import shard_ids
from tensorflow.python.tpu import tpu_embedding as te

import tpu_embed_adam  # noqa: F401  (loads the kernel library: registers the engine's kernels)
from tpu_embed_adam import engine

ADAM = te.AdamParameters(learning_rate=0.05)


@pytest.fixture(autouse=True)
def fresh_engine():
    engine.reset()
    yield
    engine.reset()


def three_tables() -> dict[str, te.TableConfig]:
    """Tables of different dimensions and vocabularies, one per combiner."""
    return {
        "users": te.TableConfig(vocabulary_size=23, dimension=4, combiner="sum"),
        "items": te.TableConfig(vocabulary_size=17, dimension=3, combiner="mean"),
        "tags": te.TableConfig(vocabulary_size=11, dimension=5, combiner="sqrtn"),
    }


WEIGHTED = ("friends", "item", "tag")


def assert_graph_trains_like_numpy(steps: int = 3, **kwargs) -> NumpyModel:
    """Builds an `EmbeddingGraph` (three tables, four features unless given) and
    asserts it trains like numpy (`assert_trains_like_numpy`); returns the model."""
    graph = EmbeddingGraph(
        kwargs.pop("tables", None) or three_tables(),
        kwargs.pop("features", None) or four_features(),
        optimization_parameters=kwargs.pop("optimization_parameters", ADAM),
        weighted=kwargs.pop("weighted", WEIGHTED),
        **kwargs,
    )
    try:
        return assert_trains_like_numpy(graph, steps)
    finally:
        graph.close()


def test_one_host_three_tables_shared_table_all_combiners():
    assert_graph_trains_like_numpy(num_hosts=1)


@pytest.mark.parametrize("strategy", ["div", "mod"])
def test_three_hosts(strategy):
    assert_graph_trains_like_numpy(num_hosts=3, partition_strategy=strategy)


def test_one_host_two_cores():
    assert_graph_trains_like_numpy(num_hosts=1, cores_per_host=2)


@pytest.mark.parametrize("cores", [1, 2])
def test_one_host_in_a_plain_session_without_cluster(cores):
    assert_graph_trains_like_numpy(num_hosts=1, cores_per_host=cores, local=True)


@pytest.mark.parametrize("strategy", ["div", "mod"])
def test_vocabulary_smaller_than_hosts_uses_dummy_partitions(strategy):
    tables = three_tables()
    tables["tiny"] = te.TableConfig(vocabulary_size=2, dimension=2, combiner="sum")
    features = {**four_features(), "flag": te.FeatureConfig("tiny")}
    assert_graph_trains_like_numpy(
        num_hosts=3, partition_strategy=strategy, tables=tables, features=features
    )


@pytest.mark.parametrize("ragged", [False, True])
def test_sequence_features_truncate_past_max_sequence_length(ragged):
    features = {
        **four_features(),
        "history": te.FeatureConfig("items", max_sequence_length=3),
        "clicks": te.FeatureConfig("tags", max_sequence_length=2, weight_key="w"),
    }
    assert_graph_trains_like_numpy(
        num_hosts=3, features=features, ragged=ragged, weighted=(*WEIGHTED, "clicks")
    )


def test_ragged_enqueue_with_empty_samples():
    assert_graph_trains_like_numpy(num_hosts=3, cores_per_host=2, ragged=True, min_ids_per_sample=0)


def test_sparse_enqueue_with_empty_samples():
    assert_graph_trains_like_numpy(num_hosts=1, min_ids_per_sample=0)


@pytest.mark.parametrize("num_hosts", [1, 3])
def test_load_ops_alone_configure_the_engine(num_hosts):
    """Without initialize_system, only TF's first load op carries the config, and the
    load ops of one `Session.run` run in any order."""
    for _ in range(3):  # the order varies from run to run
        engine.reset()
        assert_graph_trains_like_numpy(steps=1, num_hosts=num_hosts, initialize_system=False)


def test_one_id_per_sample_without_sample_indices():
    # combiner=None is TF's spelling for dense (one id per sample) features; TF's
    # own warning for a combiner without sample indices is malformed (%f of a str).
    tables = three_tables()
    tables["items"] = tables["items"]._replace(combiner=None)
    tables["tags"] = tables["tags"]._replace(combiner=None)
    assert_graph_trains_like_numpy(
        num_hosts=1, tables=tables, one_id_per_sample=("item", "tag"),
        weighted=("friends", "tag"),
    )


def test_dynamic_learning_rates_by_tag_and_per_table_parameters():
    def decay(step):
        return 0.1 / tf.cast(step, tf.float32)

    def warmup(step):
        return 0.01 * tf.cast(step, tf.float32)

    non_lazy = te.AdamParameters(
        learning_rate=0.3, beta1=0.5, beta2=0.9, epsilon=1e-3, lazy_adam=False,
        sum_inside_sqrt=False,
    )
    tables = {
        "users": te.TableConfig(23, 4, combiner="sum", learning_rate_fn=decay),
        "items": te.TableConfig(17, 3, combiner="mean", learning_rate_fn=warmup),
        "tags": te.TableConfig(11, 5, combiner="sqrtn", optimization_parameters=non_lazy),
        "zones": te.TableConfig(7, 2, combiner="sum", learning_rate=0.2),
    }
    features = {**four_features(), "zone": te.FeatureConfig("zones")}
    assert_graph_trains_like_numpy(steps=4, num_hosts=3, tables=tables, features=features)


@pytest.mark.parametrize("mode", ["unspecified", "train", "training"])
def test_mode_override_as_tf_documents_it(mode):
    """TF 2.15 spells the training override both ways: 'training' in the op
    definitions (`gen_tpu_ops`) and `TPUEmbedding.generate_enqueue_ops`, 'train' in
    the `tpu_ops` wrappers."""
    assert_graph_trains_like_numpy(steps=2, num_hosts=1, mode_override=mode)


def test_clipping_and_weight_decay_per_table():
    tables = three_tables()
    tables["users"] = tables["users"]._replace(optimization_parameters=te.AdamParameters(
        learning_rate=0.1, clip_gradient_min=-0.5, clip_gradient_max=0.3,
        clip_weight_min=-0.4, clip_weight_max=0.45,
    ))
    tables["items"] = tables["items"]._replace(optimization_parameters=te.AdamParameters(
        learning_rate=0.1, weight_decay_factor=0.2,
        multiply_weight_decay_factor_by_learning_rate=True,
    ))
    tables["tags"] = tables["tags"]._replace(optimization_parameters=te.AdamParameters(
        learning_rate=0.1, weight_decay_factor=0.01, lazy_adam=False,
    ))
    assert_graph_trains_like_numpy(steps=3, num_hosts=3, tables=tables)


def test_gradient_accumulation_disabled_one_core():
    """One step per id occurrence, in input order; one core and one feature per
    table give that order a meaning (features, then ids, as enqueued)."""
    params = te.AdamParameters(learning_rate=0.1, use_gradient_accumulation=False)
    features = {"user": te.FeatureConfig("users"), "item": te.FeatureConfig("items")}
    tables = three_tables()
    del tables["tags"]
    assert_graph_trains_like_numpy(
        steps=3, num_hosts=1, tables=tables, features=features, weighted=("item",),
        optimization_parameters=params,
    )


def test_info_reports_tables_and_shards():
    graph = EmbeddingGraph(
        three_tables(), four_features(), optimization_parameters=ADAM, num_hosts=3
    )
    try:
        graph.run_init()
        graph.load()
        info = engine.info()
    finally:
        graph.close()
    assert info["configured"] and info["num_hosts"] == 3
    by_name = {t["name"]: t for t in info["tables"]}
    assert list(by_name) == sorted(three_tables())  # table id = name order, as in TF
    for name, config in three_tables().items():
        table = by_name[name]
        assert table["dimension"] == config.dimension
        assert table["num_shards"] == 3
        rows = [len(ids) for ids in shard_ids(config.vocabulary_size, 3, "div")]
        assert [s["rows"] for s in table["shards"]] == rows
        assert all(s["loaded"] for s in table["shards"])
        # parameters, m and v: 3 float32 arrays of the whole table, at least.
        assert table["bytes"] >= 3 * 4 * config.vocabulary_size * config.dimension


def test_info_counts_the_steps_since_each_shards_last_load_or_retrieve():
    # Non-lazy Adam steps every row of every loaded shard each step.
    graph = EmbeddingGraph(
        three_tables(), four_features(), num_hosts=3, weighted=WEIGHTED,
        optimization_parameters=te.AdamParameters(learning_rate=0.05, lazy_adam=False),
    )

    def steps() -> set[int]:
        return {s["steps_since_retrieve"] for t in engine.tables() for s in t["shards"]}

    rng = np.random.default_rng(0)

    def train(n: int) -> None:
        for step in range(n):
            graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), step)

    try:
        graph.run_init()
        graph.load()
        assert steps() == {0}
        train(2)
        assert steps() == {2}
        graph.retrieve()
        assert steps() == {0}
        train(1)
        assert steps() == {1}
        graph.load()
        assert steps() == {0}
    finally:
        graph.close()


def test_second_session_retrieves_what_the_first_trained():
    graph = EmbeddingGraph(
        three_tables(), four_features(), optimization_parameters=ADAM, num_hosts=3,
        weighted=WEIGHTED,
    )
    try:
        model = assert_trains_like_numpy(graph, steps=2)
        graph.session.close()
        graph.session = tf.compat.v1.Session(graph.target, graph=graph.graph)
        graph.run_init()  # only the engine still holds the trained tables
        got = graph.retrieve()
    finally:
        graph.close()
    for table, state in model.state.items():
        np.testing.assert_array_equal(got[table].w, state.w)
        np.testing.assert_array_equal(got[table].v, state.v)


def test_reset_then_another_config_in_the_same_process():
    assert_graph_trains_like_numpy(steps=2, num_hosts=1)
    engine.reset()
    tables = {"users": te.TableConfig(vocabulary_size=9, dimension=6, combiner="mean")}
    assert_graph_trains_like_numpy(
        steps=2, num_hosts=3, tables=tables, features={"user": te.FeatureConfig("users")},
        weighted=(),
    )


@pytest.mark.slow
def test_long_run_three_hosts_two_cores_mod():
    """150 steps on 3 hosts x 2 cores match the numpy model bit for bit, every step.

    Exact, not within a tolerance, because no tolerance holds over a long
    run: Adam divides each step by the row's RMS gradient, so a last-bit
    difference d in a summed gradient moves w by up to about
    lr * (1 - beta1) * d / sqrt(v), and a row whose gradient history is
    small (small v) that then receives large gradients makes that ratio as
    large as it likes; w keeps every such difference. This run drew a few
    rows per step with three or more gradients from different cores, so a
    model that summed in another order, or rounded combiner scales in
    float32 while the engine divides in float64, drifted to 0.1-0.3 of the
    former rtol=2e-5 budget and failed in 2 of about 15 runs. The engine's
    floats are fixed across hosts (each core sums its rows, then cores in
    core order) and `NumpyModel` does the same arithmetic bit for bit.
    """
    tables = {
        "users": te.TableConfig(20_000, 32, combiner="sqrtn"),
        "items": te.TableConfig(5_000, 16, combiner="mean"),
    }
    features = {
        "user": te.FeatureConfig("users"),
        "friends": te.FeatureConfig("users"),
        "item": te.FeatureConfig("items"),
    }
    assert_graph_trains_like_numpy(
        steps=150, num_hosts=3, cores_per_host=2, partition_strategy="mod", tables=tables,
        features=features, weighted=("friends",), batch_size_per_core=64,
    )
