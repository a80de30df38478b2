"""Enqueue through TF's raw ops: bad ids, row splits, sample indices and weights
fail before any write, and the queue limits hold.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from harness_raw_ops import (
    adam_params,
    assert_engine_unchanged,
    dense_ids,
    embedding_config,
    engine_snapshot,
    enqueue,
    load_all,
    random_slots,
    raw,
    retrieve_all,
    system_config,
)

from tpu_embed_adam import engine


@pytest.mark.parametrize(
    "feats,pattern",
    [
        (
            dense_ids([0, 10], [1, 2]),
            r"feature 0 \(table 'a'\): embedding_indices\[1\] = 10 is "
            r"outside the vocabulary \[0, 10\)",
        ),
        (dense_ids([0, 1], [-1, 2]), r"feature 1 \(table 'b'\): embedding_indices\[0\] = -1"),
        (dense_ids([0, 1, 2], [1, 2]), "3 embedding_indices without sample indices"),
        (dense_ids([0, 1]), "enqueue has 1 features; the configuration has 2"),
    ],
)
def test_bad_enqueue(loaded: bytes, feats, pattern: str) -> None:
    before = engine_snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        enqueue("arbitrary", feats, [], [0, 1])
    assert_engine_unchanged(before)
    with pytest.raises(tf.errors.FailedPreconditionError, match="nothing was enqueued"):
        raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)


def test_bad_enqueue_details(loaded: bytes) -> None:
    before = engine_snapshot()
    idx = np.array([[0, 0], [2, 0]], np.int64)
    feats = [(idx, np.array([1, 2], np.int64), np.zeros((0,), np.float32)), dense_ids([1, 2])[0]]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sample index 2 at 1 is outside"):
        enqueue("arbitrary", feats, [], [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="table_ids entry 0 but"):
        enqueue("sparse", dense_ids([0, 1], [1, 2]), [], [0, 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="combiner 'max'"):
        enqueue("arbitrary", dense_ids([0, 1], [1, 2]), ["sum", "max"], [0, 1])
    splits = (np.array([0, 1, 3], np.int64), np.array([1, 2], np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="row splits of size 3"):
        enqueue("ragged", [splits, dense_ids([1, 2])[0]], [], [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="core 1 of task 0 is outside"):
        enqueue("arbitrary", dense_ids([0, 1], [1, 2]), [], [0, 1], ordinal=1)
    assert_engine_unchanged(before)


_MONOTONE = r"row splits must be non-decreasing within \[0, 5\]; "


_FEATURE_R = r"feature 0 \(table 'r'\): "


@pytest.mark.parametrize("kind", ["ragged", "arbitrary"])
@pytest.mark.parametrize(
    "splits,pattern",
    [
        # Splits past the ids used to fill slots far beyond them (heap overflow).
        ([0, 100, 4, 5], _MONOTONE + "entry 1 is 100 after 0"),
        ([0, 3, 2, 5], _MONOTONE + "entry 2 is 2 after 3"),
        ([0, -2, 3, 5], _MONOTONE + "entry 1 is -2 after 0"),
        ([0, 2, 3, 6], r"row splits of size 4 must have batch \+ 1 = 4 entries from 0 to 5"),
    ],
)
def test_bad_row_splits_fail_before_any_write(kind: str, splits: list[int], pattern: str) -> None:
    cfg = embedding_config([("r", 10, 2, adam_params())], [(0, [3])])
    load_all(cfg, "r", random_slots(np.random.default_rng(8), 10, 2), 1, False)
    before = engine_snapshot()
    feat = (np.array(splits, np.int64), np.arange(5, dtype=np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_FEATURE_R + pattern):
        enqueue(kind, [feat], [], [0])
    assert_engine_unchanged(before)
    # Good splits still work.
    enqueue(kind, [(np.array([0, 2, 3, 5], np.int64), feat[1], feat[2])], [], [0])
    assert engine.info()["queued_batches"] == 1


@pytest.mark.parametrize(
    "index,shape,pattern",
    [
        ([[0, 0], [3, 0]], [3], r"sample index 3 at 1 is outside the batch \[0, 3\)"),
        ([[0, 0], [-1, 0]], [3], r"sample index -1 at 1 is outside the batch \[0, 3\)"),
        ([[0, 0], [1, -1]], [3, 2], r"sequence position -1 at 1 is negative"),
        ([[0, 0]], [3], r"sample indices of 2 values with 2 columns for 2 embedding_indices"),
    ],
)
def test_bad_sample_indices(index, shape: list[int], pattern: str) -> None:
    cfg = embedding_config([("r", 10, 2, adam_params())], [(0, shape)])
    raw.ConfigureTPUEmbedding(config=cfg)
    before = engine_snapshot()
    feat = (np.array(index, np.int64), np.array([1, 2], np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_FEATURE_R + pattern):
        enqueue("sparse", [feat], [], [0])
    assert_engine_unchanged(before)


def test_bad_weights_length(loaded: bytes) -> None:
    before = engine_snapshot()
    ids, index = np.array([1, 2], np.int64), np.array([0, 1, 2], np.int64)
    feats = [(index, ids, np.ones((3,), np.float32)), dense_ids([1, 2])[0]]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="aggregation_weights has 3 values for 2 embedding_indices",
    ):
        enqueue("arbitrary", feats, [], [0, 1])
    assert_engine_unchanged(before)


def test_ids_in_dummy_padding_are_outside_the_vocabulary() -> None:
    # vocab 2 < 3 hosts: the third shard holds a dummy row that id 2 must not reach.
    cfg = embedding_config([("tiny", 2, 2, adam_params())], [(0, [1])], num_hosts=3)
    raw.ConfigureTPUEmbedding(config=cfg)
    before = engine_snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"feature 0 \(table 'tiny'\): embedding_indices\[0\] = 2 is outside the "
        r"vocabulary \[0, 2\)",
    ):
        enqueue("arbitrary", dense_ids([2]), [], [0])
    assert_engine_unchanged(before)
    enqueue("arbitrary", dense_ids([1]), [], [0])


def test_bad_enqueue_values(loaded: bytes) -> None:
    before = engine_snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="device_ordinal -5 must be a core"
    ):
        enqueue("arbitrary", dense_ids([0, 1], [1, 2]), [], [0, 1], ordinal=-5)
    three = (np.array([[0, 0, 0], [1, 0, 0]], np.int64), np.array([1, 2], np.int64),
             np.zeros((0,), np.float32))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"feature 0 \(table 'a'\): sample indices have 3 columns; input_shape \[2\] takes",
    ):
        enqueue("arbitrary", [three, dense_ids([1, 2])[0]], [], [0, 1])
    for bad in (np.nan, np.inf):
        weighted = (np.array([0, 1, 2], np.int64), np.array([1, 2], np.int64),
                    np.array([1.0, bad], np.float32))
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=rf"feature 0 \(table 'a'\): aggregation_weights\[1\] = {bad} is not finite",
        ):
            enqueue("ragged", [weighted, dense_ids([1, 2])[0]], ["mean", "sum"], [0, 1])
    assert_engine_unchanged(before)
    assert engine.info()["queued_batches"] == 0


def test_enqueue_limits() -> None:
    wide = system_config(dim=2**30, input_shape=[1])
    raw.ConfigureTPUEmbedding(config=wide)
    with pytest.raises(
        tf.errors.ResourceExhaustedError, match="reach 3221225472 gradient elements"
    ):
        enqueue("arbitrary", [(np.zeros((3, 2), np.int64), np.array([0, 1, 2], np.int64),
                                np.zeros((0,), np.float32))], [], [0])
    engine.reset()
    raw.ConfigureTPUEmbedding(config=embedding_config([("a", 10, 4, adam_params())], [(0, [2])]))
    for _ in range(1024):
        enqueue("arbitrary", dense_ids([0, 1]), [], [0])
    with pytest.raises(tf.errors.ResourceExhaustedError, match="already has 1024 batches"):
        enqueue("arbitrary", dense_ids([0, 1]), [], [0])
    assert engine.info()["queued_batches"] == 1024


def _one_table_with_rows(
    shape: list[int], vocab: int = 6, dim: int = 2
) -> tuple[bytes, np.ndarray]:
    """Table "t" (vocab x dim, rows = their id) under one feature of `shape`."""
    cfg = embedding_config([("t", vocab, dim, adam_params())], [(0, shape)])
    table = np.repeat(np.arange(vocab, dtype=np.float32)[:, None], dim, axis=1)
    load_all(cfg, "t", [table, np.zeros_like(table), np.zeros_like(table)], 1, False)
    return cfg, table


_NO_WEIGHTS = np.zeros((0,), np.float32)


@pytest.mark.parametrize(
    "kind,index",
    [
        ("sparse", np.zeros((0, 2), np.int64)),
        ("arbitrary", np.zeros((0, 2), np.int64)),
        ("arbitrary", np.zeros((0,), np.int64)),
        ("ragged", np.zeros((4,), np.int64)),
    ],
)
def test_a_feature_with_no_ids_in_the_batch_gives_zero_activations(kind: str, index) -> None:
    cfg = embedding_config(
        [("a", 10, 4, adam_params()), ("b", 6, 2, adam_params())], [(0, [3]), (1, [3])]
    )
    rng = np.random.default_rng(7)
    a_state = random_slots(rng, 10, 4)
    load_all(cfg, "a", a_state, 1, False)
    b_rows = random_slots(rng, 6, 2)
    load_all(b"", "b", b_rows, 1, False)
    empty = (index, np.zeros((0,), np.int64), _NO_WEIGHTS)
    full = (np.array([0, 1, 2, 3], np.int64), np.array([5, 0, 4], np.int64), _NO_WEIGHTS)
    if kind != "ragged":
        full = (np.array([[0, 0], [1, 0], [2, 0]], np.int64), full[1], _NO_WEIGHTS)
    enqueue(kind, [empty, full], [], [0, 1])
    a, b = raw.RecvTPUEmbeddingActivations(num_outputs=2, config=cfg)
    np.testing.assert_array_equal(a.numpy(), np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(b.numpy(), b_rows[0][[5, 0, 4]])
    # Its gradient touches no row: the empty feature's table is unchanged.
    raw.SendTPUEmbeddingGradients(
        inputs=[np.ones((3, 4), np.float32), np.ones((3, 2), np.float32)],
        learning_rates=[],
        config=cfg,
    )
    for got, loaded in zip(retrieve_all("a", 10, 4, 1, False), a_state, strict=True):
        np.testing.assert_array_equal(got, loaded)


@pytest.mark.parametrize("kind", ["sparse", "ragged"])
def test_ids_past_the_sequence_length_are_dropped_before_the_vocabulary_check(kind: str) -> None:
    cfg, table = _one_table_with_rows([2, 2])
    # Sample 0 holds 3 ids, the last past max_sequence_length 2 and outside the vocabulary.
    ids = np.array([1, 2, 6, 3], np.int64)
    if kind == "ragged":
        index = np.array([0, 3, 4], np.int64)
    else:
        index = np.array([[0, 0], [0, 1], [0, 2], [1, 0]], np.int64)
    enqueue(kind, [(index, ids, _NO_WEIGHTS)], [], [0])
    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    want = np.zeros((2, 2, 2), np.float32)
    want[0, 0], want[0, 1], want[1, 0] = table[1], table[2], table[3]
    np.testing.assert_array_equal(act.numpy(), want)


def test_an_id_within_the_sequence_length_is_still_checked() -> None:
    _one_table_with_rows([2, 2])
    index = np.array([[0, 0], [0, 1]], np.int64)
    outside = r"embedding_indices\[1\] = 6 is outside"
    with pytest.raises(tf.errors.InvalidArgumentError, match=outside):
        enqueue("sparse", [(index, np.array([1, 6], np.int64), _NO_WEIGHTS)], [], [0])


def test_integer_batch_enqueues_one_id_per_sample_for_each_feature() -> None:
    cfg = embedding_config(
        [("a", 10, 4, adam_params()), ("b", 6, 2, adam_params())], [(0, [3]), (1, [3])]
    )
    rng = np.random.default_rng(8)
    a_rows, b_rows = random_slots(rng, 10, 4), random_slots(rng, 6, 2)
    load_all(cfg, "a", a_rows, 1, False)
    load_all(b"", "b", b_rows, 1, False)
    raw.EnqueueTPUEmbeddingIntegerBatch(
        batch=[np.array([9, 0, 9], np.int32), np.array([1, 2, 5], np.int32)],
        mode_override="unspecified",
    )
    a, b = raw.RecvTPUEmbeddingActivations(num_outputs=2, config=cfg)
    np.testing.assert_array_equal(a.numpy(), a_rows[0][[9, 0, 9]])
    np.testing.assert_array_equal(b.numpy(), b_rows[0][[1, 2, 5]])


def test_integer_batch_refuses_bad_ids_before_any_write() -> None:
    _one_table_with_rows([2])
    before = engine_snapshot()
    for batch, pattern in (
        (np.array([0, 6], np.int32), r"embedding_indices\[1\] = 6 is outside"),
        (np.zeros((2, 1), np.int32), "batch must be rank 1"),
        (np.zeros((3,), np.int32), "3 embedding_indices without sample"),
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
            raw.EnqueueTPUEmbeddingIntegerBatch(batch=[batch], mode_override="unspecified")
    assert_engine_unchanged(before)
