"""TF's v1 `TPUEmbedding` graph on one worker process per host (`LocalCluster`).

Each process's engine holds its own host's shards; the routing pass sends ids,
rows and gradients between the processes through TF's runtime. Every test
trains through `harness_graph` (activations, loss, tables and slots
checked against the numpy model every step) and compares the final tables and
slots with the same training on an in-process cluster, where every shard is in
one engine: equal bit for bit, since both add the cores' gradients per row in
core order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from harness_graph import EmbeddingGraph, assert_trains_like_numpy
from harness_numpy_model import Slots, four_features, random_state, random_targets
from tensorflow.python.tpu import tpu_embedding as te

from tpu_embed_adam import engine
from tpu_embed_adam.cluster import LocalCluster

ADAM = te.AdamParameters(learning_rate=0.05)


def tables() -> dict[str, te.TableConfig]:
    """Tables of different dimensions and vocabularies, one per combiner; `items`
    takes its learning rate from a schedule of the global step."""
    return {
        "users": te.TableConfig(vocabulary_size=23, dimension=4, combiner="sum"),
        "items": te.TableConfig(
            vocabulary_size=17, dimension=3, combiner="mean",
            learning_rate_fn=lambda step: 0.1 / tf.cast(step + 1, tf.float32),
        ),
        "tags": te.TableConfig(vocabulary_size=11, dimension=5, combiner="sqrtn"),
    }


def initial_state(graph: EmbeddingGraph) -> None:
    graph.write(random_state(graph.emb, seed=7))


def build(target: str | None = None, **kwargs) -> EmbeddingGraph:
    return EmbeddingGraph(
        tables(), four_features(), optimization_parameters=ADAM,
        weighted=("friends", "item"), target=target, **kwargs,
    )


def assert_trains_like_numpy_and_read(
    steps: int, target: str | None = None, **kwargs
) -> dict[str, Slots]:
    """Asserts `steps` steps train like numpy (`assert_trains_like_numpy`); returns the
    retrieved state."""
    engine.reset()
    graph = build(target, **kwargs)
    try:
        assert_trains_like_numpy(graph, steps, initialize=initial_state)
        return graph.read()
    finally:
        graph.close()
        engine.reset()


def assert_equal_states(got: dict[str, Slots], want: dict[str, Slots]) -> None:
    for t in want:
        for slot in ("w", "m", "v"):
            np.testing.assert_array_equal(
                getattr(got[t], slot), getattr(want[t], slot), err_msg=f"table {t} slot {slot}"
            )


@pytest.mark.parametrize(
    ("cores", "strategy"),
    [(1, "div"), (1, "mod"), (2, "div"), pytest.param(2, "mod", marks=pytest.mark.slow)],
)
def test_three_processes_train_as_one(cores, strategy):
    kwargs = dict(num_hosts=3, cores_per_host=cores, partition_strategy=strategy)
    with LocalCluster(3, cores_per_host=cores) as cluster:
        got = assert_trains_like_numpy_and_read(4, cluster.target, **kwargs)
        infos = [engine.info(cluster.target, task) for task in range(3)]
        pids = cluster.pids
    assert_equal_states(got, assert_trains_like_numpy_and_read(4, **kwargs))
    assert [info["pid"] for info in infos] == list(pids) and os.getpid() not in pids
    for task, info in enumerate(infos):
        for table in info["tables"]:
            loaded = [s["shard"] for s in table["shards"] if s["loaded"]]
            assert loaded == [task], (task, table["name"], loaded)


def test_checkpoint_of_three_processes_restores_into_one_and_two_hosts(tmp_path):
    with LocalCluster(3) as cluster:
        graph = build(cluster.target, num_hosts=3)
        try:
            assert_trains_like_numpy(graph, 3, initialize=initial_state)
            want = graph.read()
            path = graph.save(str(tmp_path / "ckpt"))
        finally:
            graph.close()
    for hosts in (1, 2):
        engine.reset()
        graph = build(num_hosts=hosts)
        try:
            graph.run_init()
            graph.restore(path)
            graph.load()
            assert_equal_states(graph.retrieve(), want)
        finally:
            graph.close()
            engine.reset()


def test_dead_worker_fails_the_next_step_and_a_restarted_cluster_resumes(tmp_path):
    rng_seed, steps_before, steps_after = 3, 2, 2
    kwargs = dict(num_hosts=3)

    def step(graph: EmbeddingGraph, rng: np.random.Generator, at: int) -> None:
        graph.train_step(graph.random_batch(rng), random_targets(rng, graph.emb), at)

    # The uninterrupted run.
    engine.reset()
    graph = build(**kwargs)
    rng = np.random.default_rng(rng_seed)
    try:
        initial_state(graph)
        graph.load()
        for at in range(1, steps_before + steps_after + 1):
            step(graph, rng, at)
        want = graph.retrieve()
    finally:
        graph.close()
        engine.reset()

    rng = np.random.default_rng(rng_seed)
    with LocalCluster(3) as cluster:
        # A short timeout: closing the session waits for the dead worker that long.
        graph = build(cluster.target, operation_timeout_ms=5_000, **kwargs)
        initial_state(graph)
        graph.load()
        for at in range(1, steps_before + 1):
            step(graph, rng, at)
        graph.retrieve()
        path = graph.save(str(tmp_path / "ckpt"))
        state = rng.bit_generator.state
        os.kill(cluster.pids[2], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(tf.errors.OpError, match="task:2|task 2"):
            step(graph, rng, steps_before + 1)
        assert time.monotonic() - start < 10
        # Only the session: Session.reset(target) would wait for the dead
        # worker without a bound (TF's), and the cluster goes away anyway.
        with contextlib.suppress(tf.errors.DeadlineExceededError):
            graph.session.close()
    rng.bit_generator.state = state
    with LocalCluster(3) as cluster:
        graph = build(cluster.target, **kwargs)
        try:
            graph.run_init()
            graph.restore(path)
            graph.load()
            for at in range(steps_before + 1, steps_before + steps_after + 1):
                step(graph, rng, at)
            assert_equal_states(graph.retrieve(), want)
        finally:
            graph.close()
