"""Load and retrieve of table shards through TF's raw ops: round trips in both
sharding layouts, dummy rows, deferred loads, and bad shard names or shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_raw_ops import (
    adam_params,
    assert_engine_unchanged,
    embedding_config,
    engine_snapshot,
    load_all,
    random_slots,
    raw,
    retrieve_all,
)
from harness_sharding import shard_rows

from tpu_embed_adam import engine


@pytest.mark.parametrize("mod", [False, True], ids=["div", "mod"])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_retrieve_round_trip_eager(mod: bool, shards: int) -> None:
    rng = np.random.default_rng(0)
    cfg = embedding_config(
        [("a", 13, 4, adam_params()), ("b", 2, 3, adam_params())],
        [(0, [2]), (1, [2])],
        num_hosts=shards,
        mod=mod,
    )
    state = {"a": random_slots(rng, 13, 4), "b": random_slots(rng, max(2, shards), 3)}
    for i, (name, full) in enumerate(state.items()):
        load_all(cfg if i == 0 else b"", name, full, shards, mod)
    for name, full in state.items():
        got = retrieve_all(name, full[0].shape[0], full[0].shape[1], shards, mod)
        for want, have in zip(full, got, strict=True):
            np.testing.assert_array_equal(have, want)
    info = engine.info()
    assert info["configured"] and [t["name"] for t in engine.tables()] == ["a", "b"]
    a = engine.tables()[0]
    assert a["num_shards"] == shards and a["sharding"] == ("mod" if mod else "div")
    assert [s["rows"] for s in a["shards"]] == [
        len(shard_rows(13, shards, s, mod)) for s in range(shards)
    ]
    assert a["bytes"] == 3 * 13 * 4 * 4


@pytest.mark.parametrize("mod", [False, True], ids=["div", "mod"])
def test_load_retrieve_round_trip_graph(mod: bool) -> None:
    rng = np.random.default_rng(1)
    cfg = embedding_config([("t", 10, 2, adam_params())], [(0, [1])], num_hosts=3, mod=mod)
    full = random_slots(rng, 10, 2)
    with tf.Graph().as_default():
        loads, retrieves = [], []
        for s in range(3):
            rows = shard_rows(10, 3, s, mod)
            loads.append(
                raw.LoadTPUEmbeddingADAMParameters(
                    parameters=full[0][rows],
                    momenta=full[1][rows],
                    velocities=full[2][rows],
                    num_shards=3,
                    shard_id=s,
                    table_id=0,
                    config=cfg if s == 0 else "",
                )
            )
            retrieves.append(
                raw.RetrieveTPUEmbeddingADAMParameters(
                    num_shards=3, shard_id=s, table_id=0, config=cfg if s == 0 else ""
                )
            )
        with tf.compat.v1.Session() as sess:
            # The op carrying the config need not run first (as in a cluster):
            # the others wait for it.
            for op in reversed(loads):
                sess.run(op)
            got = sess.run(retrieves)
    for s in range(3):
        rows = shard_rows(10, 3, s, mod)
        for k in range(3):
            np.testing.assert_array_equal(got[s][k], full[k][rows])


def test_load_before_config_with_bad_shape_fails_at_config() -> None:
    cfg = embedding_config([("t", 4, 2, adam_params())], [(0, [1])])
    z = np.zeros((3, 2), np.float32)
    raw.LoadTPUEmbeddingADAMParameters(
        parameters=z, momenta=z, velocities=z, num_shards=1, shard_id=0, table_name="t"
    )
    assert engine.info()["deferred_loads"] == 1
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"before the configuration: .*table 't' shard 0 is \[4, 2\]",
    ):
        raw.ConfigureTPUEmbedding(config=cfg)
    assert not engine.info()["configured"] and engine.info()["deferred_loads"] == 0


def test_small_vocabulary_gets_dummy_rows() -> None:
    cfg = embedding_config([("tiny", 2, 2, adam_params())], [(0, [1])], num_hosts=3)
    raw.ConfigureTPUEmbedding(config=cfg)
    assert [s["rows"] for s in engine.tables()[0]["shards"]] == [1, 1, 1]


def test_retrieve_before_configure() -> None:
    with pytest.raises(tf.errors.FailedPreconditionError, match="not configured"):
        raw.RetrieveTPUEmbeddingADAMParameters(num_shards=1, shard_id=0, table_name="a")


def test_retrieve_before_load() -> None:
    cfg = embedding_config([("a", 10, 4, adam_params())], [(0, [2])], num_hosts=2)
    raw.ConfigureTPUEmbedding(config=cfg)
    before = engine_snapshot()
    with pytest.raises(
        tf.errors.FailedPreconditionError, match=r"table 'a' shard 1 \(5 x 4\) was never loaded"
    ):
        raw.RetrieveTPUEmbeddingADAMParameters(num_shards=2, shard_id=1, table_name="a")
    assert_engine_unchanged(before)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(table_name="nope"), "unknown table_name 'nope'; configured tables: a, b"),
        (dict(table_id=2), "table_id 2 names none of the 2 configured tables"),
        (dict(table_id=-1), "table_id -1 names none"),
        (dict(table_name="a", table_id=1), "'a' is table id 0, not table_id 1"),
        (dict(table_name="a", shard_id=2), r"table 'a': shard_id 2 is outside \[0, 2\)"),
        (dict(table_name="a", shard_id=-1), r"shard_id -1 is outside \[0, 2\)"),
        (dict(table_name="b", num_shards=3), "table 'b': num_shards 3 differs"),
    ],
)
def test_bad_shard_names(loaded: bytes, kwargs: dict, pattern: str) -> None:
    args = dict(num_shards=2, shard_id=0) | kwargs
    before = engine_snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.RetrieveTPUEmbeddingADAMParameters(**args)
    z = np.zeros((5, 4), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.LoadTPUEmbeddingADAMParameters(parameters=z, momenta=z, velocities=z, **args)
    assert_engine_unchanged(before)


@pytest.mark.parametrize(
    "shapes,bad",
    [
        ([(4, 4), (5, 4), (5, 4)], r"parameters is \[4, 4\]"),
        ([(5, 4), (5, 3), (5, 4)], r"momenta is \[5, 3\]"),
        ([(5, 4), (5, 4), (5,)], r"velocities is \[5\]"),
    ],
)
def test_load_shape_mismatch(loaded: bytes, shapes, bad: str) -> None:
    before = engine_snapshot()
    tensors = [np.ones(s, np.float32) for s in shapes]
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=rf"table 'a' shard 1 is \[5, 4\] but {bad}"
    ):
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=tensors[0],
            momenta=tensors[1],
            velocities=tensors[2],
            num_shards=2,
            shard_id=1,
            table_name="a",
        )
    assert_engine_unchanged(before)


@pytest.mark.parametrize(
    "tensor,value,pattern",
    [
        (0, np.nan, r"parameters\[3, 1\] = nan must be finite"),
        (1, np.inf, r"momenta\[3, 1\] = inf must be finite"),
        (2, -0.5, r"velocities\[3, 1\] = -0.5 must be finite and >= 0"),
        (2, np.nan, r"velocities\[3, 1\] = nan must be finite and >= 0"),
    ],
)
def test_load_refuses_values_no_step_recovers_from(
    loaded: bytes, tensor: int, value: float, pattern: str
) -> None:
    before = engine_snapshot()
    data = [np.ones((5, 4), np.float32) for _ in range(3)]
    data[tensor][3, 1] = value
    kwargs = dict(parameters=data[0], momenta=data[1], velocities=data[2], num_shards=2,
                  table_name="a")
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"table 'a' shard 1: {pattern}"):
        raw.LoadTPUEmbeddingADAMParameters(shard_id=1, **kwargs)
    assert_engine_unchanged(before)
    # A load that waited for the configuration is refused when it arrives.
    engine.reset()
    raw.LoadTPUEmbeddingADAMParameters(shard_id=1, **kwargs)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"before the configuration: .*{pattern}"
    ):
        raw.LoadTPUEmbeddingADAMParameters(shard_id=0, config=loaded, **kwargs)
    assert not engine.info()["configured"]


def test_deferred_loads_are_capped() -> None:
    z = np.zeros((1, 2), np.float32)
    for _ in range(4096):
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=z, momenta=z, velocities=z, num_shards=1, shard_id=0, table_name="t"
        )
    with pytest.raises(tf.errors.ResourceExhaustedError, match="4096 loads already wait"):
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=z, momenta=z, velocities=z, num_shards=1, shard_id=0, table_name="t"
        )
    assert engine.info()["deferred_loads"] == 4096
