"""TF's TPU embedding ops, run directly on the software engine's CPU kernels.

Configurations are built as `TPUEmbeddingConfiguration` protos; every step is
checked against a numpy lookup and `reference.adam_update`, and every bad
input against an unchanged engine.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
import types
import zlib

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as opt_pb2
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2

from tpu_embed_adam import engine, reference
from tpu_embed_adam.ops import loader

pytestmark = pytest.mark.skipif(loader.load_library() is None, reason="kernel library not built")

raw = tf.raw_ops


def _params(lr: float = 0.05, **kw: object) -> types.SimpleNamespace:
    base = dict(
        learning_rate=lr,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-3,
        lazy_adam=True,
        sum_inside_sqrt=True,
        use_gradient_accumulation=True,
        clip_weight_min=None,
        clip_weight_max=None,
        weight_decay_factor=0.0,
        multiply_weight_decay_factor_by_learning_rate=False,
        clip_gradient_min=None,
        clip_gradient_max=None,
        dynamic_tag=None,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def _config(
    tables: list[tuple[str, int, int, types.SimpleNamespace]],
    features: list[tuple[int, list[int]]],
    num_hosts: int = 1,
    cores_per_host: int = 1,
    mod: bool = False,
    optimizer: str = "adam",
) -> bytes:
    cfg = cfg_pb2.TPUEmbeddingConfiguration()
    for name, vocab, dim, p in tables:
        t = cfg.table_descriptor.add(name=name, vocabulary_size=vocab, dimension=dim)
        o = t.optimization_parameters
        if p.dynamic_tag is not None:
            o.learning_rate.dynamic.tag = p.dynamic_tag
        else:
            o.learning_rate.constant = p.learning_rate
        o.gradient_accumulation_status = opt_pb2.GradientAccumulationStatus.ENABLED
        if p.clip_weight_min is not None:
            o.clipping_limits.lower.value = p.clip_weight_min
        if optimizer == "adam":
            o.adam.beta1, o.adam.beta2, o.adam.epsilon = p.beta1, p.beta2, p.epsilon
            o.adam.use_non_lazy_adam = not p.lazy_adam
            o.adam.use_sum_inside_sqrt = p.sum_inside_sqrt
        else:
            o.adagrad.SetInParent()
    for table_id, shape in features:
        cfg.feature_descriptor.add(table_id=table_id, input_shape=shape)
    cfg.mode = cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    cfg.num_hosts = num_hosts
    cfg.num_tensor_cores = num_hosts * cores_per_host
    cfg.sharding_strategy = (
        cfg_pb2.TPUEmbeddingConfiguration.MOD
        if mod
        else cfg_pb2.TPUEmbeddingConfiguration.DIV_DEFAULT
    )
    return cfg.SerializeToString()


def _shard_ids(vocab: int, shards: int, shard: int, mod: bool) -> np.ndarray:
    """Global ids of shard `shard`'s rows, in local order (TF's layouts)."""
    vocab = max(vocab, shards)
    if mod:
        return np.arange(shard, vocab, shards)
    sizes = [vocab // shards + (i < vocab % shards) for i in range(shards)]
    start = sum(sizes[:shard])
    return np.arange(start, start + sizes[shard])


def _load_all(cfg: bytes, name: str, full: list[np.ndarray], shards: int, mod: bool) -> None:
    vocab = full[0].shape[0]
    for s in range(shards):
        rows = _shard_ids(vocab, shards, s, mod)
        raw.LoadTPUEmbeddingADAMParameters(
            parameters=full[0][rows],
            momenta=full[1][rows],
            velocities=full[2][rows],
            num_shards=shards,
            shard_id=s,
            table_name=name,
            config=cfg if s == 0 else "",
        )


def _retrieve_all(name: str, vocab: int, dim: int, shards: int, mod: bool) -> list[np.ndarray]:
    out = [np.zeros((vocab, dim), np.float32) for _ in range(3)]
    for s in range(shards):
        rows = _shard_ids(vocab, shards, s, mod)
        got = raw.RetrieveTPUEmbeddingADAMParameters(num_shards=shards, shard_id=s, table_name=name)
        for full, part in zip(out, got, strict=True):
            full[rows] = part.numpy()
    return out


def _random_state(rng: np.random.Generator, vocab: int, dim: int) -> list[np.ndarray]:
    return [
        rng.normal(size=(vocab, dim)).astype(np.float32),
        rng.normal(size=(vocab, dim)).astype(np.float32) * 0.1,
        rng.uniform(0.01, 1.0, size=(vocab, dim)).astype(np.float32),
    ]


@pytest.fixture(autouse=True)
def _clean_engine(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "1")
    engine.reset()
    yield
    engine.reset()


# --------------------------------------------------------------------------
# Configuration, load and retrieve.


@pytest.mark.parametrize("mod", [False, True], ids=["div", "mod"])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_retrieve_round_trip_eager(mod: bool, shards: int) -> None:
    rng = np.random.default_rng(0)
    cfg = _config(
        [("a", 13, 4, _params()), ("b", 2, 3, _params())],
        [(0, [2]), (1, [2])],
        num_hosts=shards,
        mod=mod,
    )
    state = {"a": _random_state(rng, 13, 4), "b": _random_state(rng, max(2, shards), 3)}
    for i, (name, full) in enumerate(state.items()):
        _load_all(cfg if i == 0 else b"", name, full, shards, mod)
    for name, full in state.items():
        got = _retrieve_all(name, full[0].shape[0], full[0].shape[1], shards, mod)
        for want, have in zip(full, got, strict=True):
            np.testing.assert_array_equal(have, want)
    info = engine.info()
    assert info["configured"] and [t["name"] for t in engine.tables()] == ["a", "b"]
    a = engine.tables()[0]
    assert a["num_shards"] == shards and a["sharding"] == ("mod" if mod else "div")
    assert [s["rows"] for s in a["shards"]] == [
        len(_shard_ids(13, shards, s, mod)) for s in range(shards)
    ]
    assert a["bytes"] == 3 * 13 * 4 * 4


@pytest.mark.parametrize("mod", [False, True], ids=["div", "mod"])
def test_load_retrieve_round_trip_graph(mod: bool) -> None:
    rng = np.random.default_rng(1)
    cfg = _config([("t", 10, 2, _params())], [(0, [1])], num_hosts=3, mod=mod)
    full = _random_state(rng, 10, 2)
    with tf.Graph().as_default():
        loads, retrieves = [], []
        for s in range(3):
            rows = _shard_ids(10, 3, s, mod)
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
        rows = _shard_ids(10, 3, s, mod)
        for k in range(3):
            np.testing.assert_array_equal(got[s][k], full[k][rows])


def test_load_before_config_with_bad_shape_fails_at_config() -> None:
    cfg = _config([("t", 4, 2, _params())], [(0, [1])])
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
    cfg = _config([("tiny", 2, 2, _params())], [(0, [1])], num_hosts=3)
    raw.ConfigureTPUEmbedding(config=cfg)
    assert [s["rows"] for s in engine.tables()[0]["shards"]] == [1, 1, 1]


def test_configure_is_initialized_and_reset() -> None:
    cfg = _config([("t", 4, 2, _params())], [(0, [1])])
    assert not raw.IsTPUEmbeddingInitialized().numpy()
    raw.ConfigureTPUEmbedding(config=cfg)
    assert raw.IsTPUEmbeddingInitialized().numpy()
    full = _random_state(np.random.default_rng(2), 4, 2)
    _load_all(b"", "t", full, 1, False)
    raw.ConfigureTPUEmbedding(config=cfg)  # same config again: state kept
    np.testing.assert_array_equal(_retrieve_all("t", 4, 2, 1, False)[0], full[0])
    other = _config([("u", 5, 2, _params())], [(0, [1])])
    raw.ConfigureTPUEmbedding(config=other)  # an explicit re-initialisation
    assert [t["name"] for t in engine.tables()] == ["u"]
    engine.reset()
    assert not raw.IsTPUEmbeddingInitialized().numpy()
    assert engine.info()["tables"] == []


# --------------------------------------------------------------------------
# One training step.


def _bags(rng: np.random.Generator, batch: int, vocab: int, max_ids: int, weighted: bool):
    """Per sample, a list of (id, weight); every sample holds at least one id."""
    out = []
    for _ in range(batch):
        n = int(rng.integers(1, max_ids + 1))
        ids = rng.integers(0, vocab, size=n)
        weights = rng.uniform(0.5, 2.0, size=n) if weighted else np.ones(n)
        out.append([(int(i), float(w)) for i, w in zip(ids, weights, strict=True)])
    return out


def _formats(bags, weighted: bool, layout: str):
    """(index, ids, weights) tensors for one feature in the given layout."""
    ids = np.array([i for bag in bags for i, _ in bag], np.int64)
    weights = (
        np.array([w for bag in bags for _, w in bag], np.float32)
        if weighted
        else np.zeros((0,), np.float32)
    )
    if layout == "dense":
        index = np.zeros((0,), np.int64)
    elif layout == "splits":
        index = np.cumsum([0] + [len(b) for b in bags]).astype(np.int64)
    else:
        index = np.array(
            [[b, k] for b, bag in enumerate(bags) for k in range(len(bag))], np.int64
        ).reshape(-1, 2)
    return index, ids, weights


def _lookup(table: np.ndarray, bags, combiner: str):
    """Numpy activations and, per id occurrence, its (slot, scale)."""
    out = np.zeros((len(bags), table.shape[1]), np.float32)
    scales = []
    for b, bag in enumerate(bags):
        ws = np.array([w for _, w in bag], np.float32)
        denom = {"sum": 1.0, "mean": ws.sum(), "sqrtn": np.sqrt((ws * ws).sum())}[combiner]
        for i, w in bag:
            out[b] += w * table[i]
            scales.append((b, w / denom))
        out[b] /= denom
    return out, scales


ENQUEUE_CASES = [
    ("arbitrary", "indices"),
    ("arbitrary", "splits"),
    ("arbitrary", "dense"),
    ("sparse", "indices"),
    ("ragged", "splits"),
]


def _enqueue(kind: str, feats, combiners: list[str], table_ids: list[int], ordinal: int = 0):
    index, ids, weights = (list(x) for x in zip(*feats, strict=True))
    if kind == "arbitrary":
        return raw.EnqueueTPUEmbeddingArbitraryTensorBatch(
            sample_indices_or_row_splits=index,
            embedding_indices=ids,
            aggregation_weights=weights,
            mode_override="unspecified",
            device_ordinal=ordinal,
            combiners=combiners,
        )
    if kind == "sparse":
        return raw.EnqueueTPUEmbeddingSparseTensorBatch(
            sample_indices=index,
            embedding_indices=ids,
            aggregation_weights=weights,
            mode_override="unspecified",
            device_ordinal=ordinal,
            combiners=combiners,
            table_ids=table_ids,
        )
    return raw.EnqueueTPUEmbeddingRaggedTensorBatch(
        sample_splits=index,
        embedding_indices=ids,
        aggregation_weights=weights,
        mode_override="unspecified",
        device_ordinal=ordinal,
        combiners=combiners,
        table_ids=table_ids,
    )


@pytest.mark.parametrize("kind,layout", ENQUEUE_CASES)
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_step_matches_numpy_lookup_and_reference(kind: str, layout: str, combiner: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind}{layout}{combiner}".encode()))
    mod = layout == "splits"
    weighted = layout != "dense"
    p_a, p_b = _params(0.05), _params(0.02, lazy_adam=False, sum_inside_sqrt=False)
    specs = {"a": (11, 4, p_a), "b": (7, 3, p_b)}
    batch = 4
    # Features in table order: two share table "a".
    feature_tables = [0, 0, 1]
    cfg = _config(
        [(n, v, d, p) for n, (v, d, p) in specs.items()],
        [(t, [batch]) for t in feature_tables],
        num_hosts=2,
        mod=mod,
    )
    state = {n: _random_state(rng, v, d) for n, (v, d, _) in specs.items()}
    for i, (n, full) in enumerate(state.items()):
        _load_all(cfg if i == 0 else b"", n, full, 2, mod)

    names = list(specs)
    max_ids = 1 if layout == "dense" else 3
    bags = [_bags(rng, batch, specs[names[t]][0], max_ids, weighted) for t in feature_tables]
    feats = [_formats(b, weighted, layout) for b in bags]
    _enqueue(kind, feats, [combiner] * 3, feature_tables)
    acts = raw.RecvTPUEmbeddingActivations(num_outputs=3, config=cfg)

    grads = [rng.normal(size=a.shape).astype(np.float32) for a in acts]
    per_table: dict[str, tuple[list[int], list[np.ndarray]]] = {n: ([], []) for n in names}
    for f, t in enumerate(feature_tables):
        want, scales = _lookup(state[names[t]][0], bags[f], combiner)
        np.testing.assert_allclose(acts[f].numpy(), want, rtol=1e-5, atol=1e-6)
        ids = [i for bag in bags[f] for i, _ in bag]
        per_table[names[t]][0].extend(ids)
        per_table[names[t]][1].extend(s * grads[f][b] for b, s in scales)
    raw.SendTPUEmbeddingGradients(inputs=grads, learning_rates=[], config=cfg)

    for n, (v, d, p) in specs.items():
        ids, rows = per_table[n]
        want = reference.adam_update(*state[n], np.array(ids), np.array(rows), p)
        got = _retrieve_all(n, v, d, 2, mod)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sequence_feature_truncates_and_trains() -> None:
    rng = np.random.default_rng(3)
    p = _params(0.1)
    cfg = _config([("s", 6, 2, p)], [(0, [2, 3])])
    full = _random_state(rng, 6, 2)
    _load_all(cfg, "s", full, 1, False)
    # (sample, position): position 3 lies past max_sequence_length 3.
    index = np.array([[0, 0], [0, 1], [0, 3], [1, 2]], np.int64)
    ids = np.array([1, 4, 5, 1], np.int64)
    raw.EnqueueTPUEmbeddingSparseTensorBatch(
        sample_indices=[index],
        embedding_indices=[ids],
        aggregation_weights=[np.zeros((0,), np.float32)],
        mode_override="train",
        device_ordinal=0,
        combiners=["sum"],
        table_ids=[0],
        max_sequence_lengths=[3],
    )
    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    want = np.zeros((2, 3, 2), np.float32)
    want[0, 0], want[0, 1], want[1, 2] = full[0][1], full[0][4], full[0][1]
    np.testing.assert_array_equal(act.numpy(), want)
    grad = rng.normal(size=(2, 3, 2)).astype(np.float32)
    raw.SendTPUEmbeddingGradients(inputs=[grad], learning_rates=[], config=cfg)
    ref = reference.adam_update(
        *full, np.array([1, 4, 1]), np.stack([grad[0, 0], grad[0, 1], grad[1, 2]]), p
    )
    for w, g in zip(ref, _retrieve_all("s", 6, 2, 1, False), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_dynamic_learning_rate_by_tag() -> None:
    rng = np.random.default_rng(4)
    p0, p1 = _params(dynamic_tag=1), _params(dynamic_tag=0)
    cfg = _config([("x", 5, 2, p0), ("y", 5, 2, p1)], [(0, [1]), (1, [1])])
    state = {"x": _random_state(rng, 5, 2), "y": _random_state(rng, 5, 2)}
    for i, (n, full) in enumerate(state.items()):
        _load_all(cfg if i == 0 else b"", n, full, 1, False)
    _enqueue(
        "arbitrary",
        [_formats([[(2, 1.0)]], False, "dense"), _formats([[(3, 1.0)]], False, "dense")],
        [],
        [0, 1],
    )
    raw.RecvTPUEmbeddingActivations(num_outputs=2, config=cfg)
    g = np.ones((1, 2), np.float32)
    raw.SendTPUEmbeddingGradients(inputs=[g, g], learning_rates=[0.5, 0.01], config=cfg)
    for n, row, lr in (("x", 2, 0.01), ("y", 3, 0.5)):
        want = reference.adam_update(*state[n], np.array([row]), g, p0, learning_rate=lr)
        np.testing.assert_allclose(_retrieve_all(n, 5, 2, 1, False)[0], want[0], rtol=1e-6)


def test_two_cores_make_one_update_per_step() -> None:
    rng = np.random.default_rng(5)
    p = _params(0.1)
    cfg = _config([("t", 8, 2, p)], [(0, [2])], cores_per_host=2)
    full = _random_state(rng, 8, 2)
    _load_all(cfg, "t", full, 1, False)
    ids = [np.array([1, 5], np.int64), np.array([5, 6], np.int64)]
    grads = [rng.normal(size=(2, 2)).astype(np.float32) for _ in range(2)]
    config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
    with tf.Graph().as_default():
        enq = [
            _enqueue(
                "arbitrary",
                [(np.zeros((0,), np.int64), ids[c], np.zeros((0,), np.float32))],
                [],
                [0],
                ordinal=c,
            )
            for c in range(2)
        ]
        sends = []
        for c in range(2):
            with tf.device(f"/device:CPU:{c}"):
                (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
                with tf.control_dependencies([act]):
                    sends.append(
                        raw.SendTPUEmbeddingGradients(
                            inputs=[tf.constant(grads[c])], learning_rates=[], config=cfg
                        )
                    )
        with tf.compat.v1.Session(config=config) as sess:
            sess.run(enq)
            sess.run(sends)
    want = reference.adam_update(*full, np.concatenate(ids), np.concatenate(grads), p)
    for w, g in zip(want, _retrieve_all("t", 8, 2, 1, False), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


class _TwoCores:
    """A two-core graph: per core an enqueue of 2 ids and a Recv -> Send step."""

    def __init__(self, cfg: bytes) -> None:
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.ids = [tf.compat.v1.placeholder(tf.int64, [2]) for _ in range(2)]
            self.grads = [tf.compat.v1.placeholder(tf.float32, [2, 2]) for _ in range(2)]
            self.enqueue, self.step = [], []
            for c in range(2):
                empty = (tf.zeros([0], tf.int64), self.ids[c], tf.zeros([0], tf.float32))
                self.enqueue.append(_enqueue("arbitrary", [empty], [], [0], ordinal=c))
                with tf.device(f"/device:CPU:{c}"):
                    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
                    with tf.control_dependencies([act]):
                        self.step.append(
                            raw.SendTPUEmbeddingGradients(
                                inputs=[self.grads[c]], learning_rates=[], config=cfg
                            )
                        )
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        self.sess = tf.compat.v1.Session(graph=self.graph, config=config)

    def run(self, ops, feed: dict | None = None) -> None:
        self.sess.run(ops, feed)


def _two_core_table(seed: int):
    """An 8 x 2 table "t" loaded with random state, and a two-core graph on it."""
    rng = np.random.default_rng(seed)
    p = _params(0.1)
    cfg = _config([("t", 8, 2, p)], [(0, [2])], cores_per_host=2)
    state = _random_state(rng, 8, 2)
    _load_all(cfg, "t", state, 1, False)
    return rng, p, state, _TwoCores(cfg)


def _assert_retrieved(want) -> None:
    for w, have in zip(want, _retrieve_all("t", 8, 2, 1, False), strict=True):
        np.testing.assert_allclose(have, w, rtol=1e-6, atol=1e-7)


def test_step_closes_when_a_core_stops_training() -> None:
    rng, p, state, g = _two_core_table(9)
    ids = [np.array([1, 5], np.int64), np.array([5, 6], np.int64)]
    grads = [rng.normal(size=(2, 2)).astype(np.float32) for _ in range(3)]
    feed = {g.ids[0]: ids[0], g.ids[1]: ids[1], g.grads[0]: grads[0], g.grads[1]: grads[1]}
    g.run(g.enqueue, feed)
    g.run(g.step, feed)
    want = reference.adam_update(*state, np.concatenate(ids), np.concatenate(grads[:2]), p)
    # Core 1 drops out: core 0's step alone is the whole step, applied at once
    # (before, it waited for core 1 and Retrieve returned the table without it).
    g.run(g.enqueue[0], {g.ids[0]: ids[1]})
    g.run(g.step[0], {g.grads[0]: grads[2]})
    want = reference.adam_update(*want, ids[1], grads[2], p)
    assert engine.info()["queued_batches"] == 0
    _assert_retrieved(want)
    g.sess.close()


def test_retrieve_and_load_apply_the_open_step() -> None:
    rng, p, state, g = _two_core_table(10)
    ids = [np.array([1, 5], np.int64), np.array([2, 6], np.int64)]
    grads = [rng.normal(size=(2, 2)).astype(np.float32) for _ in range(2)]
    g.run(g.enqueue, {g.ids[0]: ids[0], g.ids[1]: ids[1]})
    # Core 1 holds its batch, so core 0's Send leaves the step open ...
    g.run(g.step[0], {g.grads[0]: grads[0]})
    # ... and Retrieve closes it: its gradients are part of the table.
    want = reference.adam_update(*state, ids[0], grads[0], p)
    _assert_retrieved(want)
    # Core 1's gradients open the next step; a load closes it before writing.
    g.run(g.step[1], {g.grads[1]: grads[1]})
    want = reference.adam_update(*want, ids[1], grads[1], p)
    _assert_retrieved(want)
    g.run(g.enqueue, {g.ids[0]: ids[0], g.ids[1]: ids[1]})
    g.run(g.step[0], {g.grads[0]: grads[0]})
    fresh = _random_state(rng, 8, 2)
    _load_all(b"", "t", fresh, 1, False)
    for w, have in zip(fresh, _retrieve_all("t", 8, 2, 1, False), strict=True):
        np.testing.assert_array_equal(have, w)  # the open step did not land on the load
    g.sess.close()


def test_recv_fails_when_the_engine_is_reset_while_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = _config([("t", 4, 1, _params())], [(0, [1])])
    big = _config([("t", 4, 256, _params())], [(0, [64])])
    _load_all(small, "t", _random_state(np.random.default_rng(11), 4, 1), 1, False)
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "20000")
    result: list[object] = []

    def recv() -> None:
        try:
            result.append(raw.RecvTPUEmbeddingActivations(num_outputs=1, config=small))
        except tf.errors.OpError as e:
            result.append(e)

    thread = threading.Thread(target=recv)
    thread.start()
    time.sleep(1.0)  # Recv waits for core 0's batch
    # A new, larger configuration with a batch for the same core: Recv's
    # outputs were sized for the old one.
    raw.ConfigureTPUEmbedding(config=big)
    _load_all(b"", "t", _random_state(np.random.default_rng(12), 4, 256), 1, False)
    _enqueue("arbitrary", _ids([1] * 64), [], [0])
    thread.join()
    assert len(result) == 1 and isinstance(result[0], tf.errors.OpError), result
    assert isinstance(result[0], tf.errors.AbortedError | tf.errors.FailedPreconditionError)
    # The batch stays queued for a Recv of the new configuration.
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "1")
    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=big)
    assert act.shape == (64, 256)


# --------------------------------------------------------------------------
# Bad input: a clear error, and the engine exactly as before.


def _snapshot() -> tuple[str, list]:
    tables = engine.tables()
    state = []
    for t in tables:
        for s in t["shards"]:
            if s["loaded"]:
                got = raw.RetrieveTPUEmbeddingADAMParameters(
                    num_shards=t["num_shards"], shard_id=s["shard"], table_name=t["name"]
                )
                state.append([x.numpy() for x in got])
    return str(engine.info()), state


def _assert_unchanged(before: tuple[str, list]) -> None:
    after = _snapshot()
    assert after[0] == before[0]
    for b, a in zip(before[1], after[1], strict=True):
        for x, y in zip(b, a, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture
def loaded() -> bytes:
    cfg = _config(
        [("a", 10, 4, _params()), ("b", 6, 2, _params())], [(0, [2]), (1, [2])], num_hosts=2
    )
    rng = np.random.default_rng(6)
    _load_all(cfg, "a", _random_state(rng, 10, 4), 2, False)
    _load_all(b"", "b", _random_state(rng, 6, 2), 2, False)
    return cfg


def test_retrieve_before_configure() -> None:
    with pytest.raises(tf.errors.FailedPreconditionError, match="not configured"):
        raw.RetrieveTPUEmbeddingADAMParameters(num_shards=1, shard_id=0, table_name="a")


def test_retrieve_before_load() -> None:
    cfg = _config([("a", 10, 4, _params())], [(0, [2])], num_hosts=2)
    raw.ConfigureTPUEmbedding(config=cfg)
    before = _snapshot()
    with pytest.raises(
        tf.errors.FailedPreconditionError, match=r"table 'a' shard 1 \(5 x 4\) was never loaded"
    ):
        raw.RetrieveTPUEmbeddingADAMParameters(num_shards=2, shard_id=1, table_name="a")
    _assert_unchanged(before)


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
    before = _snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.RetrieveTPUEmbeddingADAMParameters(**args)
    z = np.zeros((5, 4), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.LoadTPUEmbeddingADAMParameters(parameters=z, momenta=z, velocities=z, **args)
    _assert_unchanged(before)


@pytest.mark.parametrize(
    "shapes,bad",
    [
        ([(4, 4), (5, 4), (5, 4)], r"parameters is \[4, 4\]"),
        ([(5, 4), (5, 3), (5, 4)], r"momenta is \[5, 3\]"),
        ([(5, 4), (5, 4), (5,)], r"velocities is \[5\]"),
    ],
)
def test_load_shape_mismatch(loaded: bytes, shapes, bad: str) -> None:
    before = _snapshot()
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
    _assert_unchanged(before)


def test_contradicting_config(loaded: bytes) -> None:
    before = _snapshot()
    other = _config([("a", 11, 4, _params())], [(0, [2])], num_hosts=2)
    with pytest.raises(tf.errors.FailedPreconditionError, match="config differs"):
        raw.RetrieveTPUEmbeddingADAMParameters(
            num_shards=2, shard_id=0, table_name="a", config=other
        )
    with pytest.raises(tf.errors.FailedPreconditionError, match="config differs"):
        raw.RecvTPUEmbeddingActivations(num_outputs=1, config=other)
    raw.RetrieveTPUEmbeddingADAMParameters(
        num_shards=2, shard_id=0, table_name="a", config=loaded
    )  # identical: fine
    _assert_unchanged(before)


def test_non_adam_table() -> None:
    cfg = _config([("ada", 4, 2, _params())], [(0, [1])], optimizer="adagrad")
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="table 'ada' uses optimizer 'adagrad'; the engine supports only Adam",
    ):
        raw.ConfigureTPUEmbedding(config=cfg)
    assert not engine.info()["configured"]


def _ids(*features):
    return [_formats([[(i, 1.0)] for i in f], False, "dense") for f in features]


@pytest.mark.parametrize(
    "feats,pattern",
    [
        (
            _ids([0, 10], [1, 2]),
            r"feature 0 \(table 'a'\): embedding_indices\[1\] = 10 is "
            r"outside the vocabulary \[0, 10\)",
        ),
        (_ids([0, 1], [-1, 2]), r"feature 1 \(table 'b'\): embedding_indices\[0\] = -1"),
        (_ids([0, 1, 2], [1, 2]), "3 embedding_indices without sample indices"),
        (_ids([0, 1]), "enqueue has 1 features; the configuration has 2"),
    ],
)
def test_bad_enqueue(loaded: bytes, feats, pattern: str) -> None:
    before = _snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        _enqueue("arbitrary", feats, [], [0, 1])
    _assert_unchanged(before)
    with pytest.raises(tf.errors.FailedPreconditionError, match="nothing was enqueued"):
        raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)


def test_bad_enqueue_details(loaded: bytes) -> None:
    before = _snapshot()
    idx = np.array([[0, 0], [2, 0]], np.int64)
    feats = [(idx, np.array([1, 2], np.int64), np.zeros((0,), np.float32)), _ids([1, 2])[0]]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sample index 2 at 1 is outside"):
        _enqueue("arbitrary", feats, [], [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="table_ids entry 0 but"):
        _enqueue("sparse", _ids([0, 1], [1, 2]), [], [0, 0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="combiner 'max'"):
        _enqueue("arbitrary", _ids([0, 1], [1, 2]), ["sum", "max"], [0, 1])
    splits = (np.array([0, 1, 3], np.int64), np.array([1, 2], np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="row splits of size 3"):
        _enqueue("ragged", [splits, _ids([1, 2])[0]], [], [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="core 1 of task 0 is outside"):
        _enqueue("arbitrary", _ids([0, 1], [1, 2]), [], [0, 1], ordinal=1)
    _assert_unchanged(before)


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
    cfg = _config([("r", 10, 2, _params())], [(0, [3])])
    _load_all(cfg, "r", _random_state(np.random.default_rng(8), 10, 2), 1, False)
    before = _snapshot()
    feat = (np.array(splits, np.int64), np.arange(5, dtype=np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_FEATURE_R + pattern):
        _enqueue(kind, [feat], [], [0])
    _assert_unchanged(before)
    # Good splits still work.
    _enqueue(kind, [(np.array([0, 2, 3, 5], np.int64), feat[1], feat[2])], [], [0])
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
    cfg = _config([("r", 10, 2, _params())], [(0, shape)])
    raw.ConfigureTPUEmbedding(config=cfg)
    before = _snapshot()
    feat = (np.array(index, np.int64), np.array([1, 2], np.int64), np.zeros((0,), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=_FEATURE_R + pattern):
        _enqueue("sparse", [feat], [], [0])
    _assert_unchanged(before)


def test_bad_weights_length(loaded: bytes) -> None:
    before = _snapshot()
    ids, index = np.array([1, 2], np.int64), np.array([0, 1, 2], np.int64)
    feats = [(index, ids, np.ones((3,), np.float32)), _ids([1, 2])[0]]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="aggregation_weights has 3 values for 2 embedding_indices",
    ):
        _enqueue("arbitrary", feats, [], [0, 1])
    _assert_unchanged(before)


def test_ids_in_dummy_padding_are_outside_the_vocabulary() -> None:
    # vocab 2 < 3 hosts: the third shard holds a dummy row that id 2 must not reach.
    cfg = _config([("tiny", 2, 2, _params())], [(0, [1])], num_hosts=3)
    raw.ConfigureTPUEmbedding(config=cfg)
    before = _snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"feature 0 \(table 'tiny'\): embedding_indices\[0\] = 2 is outside the "
        r"vocabulary \[0, 2\)",
    ):
        _enqueue("arbitrary", _ids([2]), [], [0])
    _assert_unchanged(before)
    _enqueue("arbitrary", _ids([1]), [], [0])


def _set_lr_none(o) -> None:
    o.learning_rate.Clear()


def _set(path: str, value: float):
    def apply(o) -> None:
        *parents, leaf = path.split(".")
        for name in parents:
            o = getattr(o, name)
        setattr(o, leaf, value)

    return apply


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (_set_lr_none, "learning_rate sets neither constant nor dynamic"),
        (_set("learning_rate.dynamic.tag", -1), "dynamic learning rate tag -1 is negative"),
        (_set("learning_rate.constant", float("inf")),
         "learning_rate constant inf must be positive and finite"),
        (_set("learning_rate.constant", 0.0), "learning_rate constant 0 must be positive"),
        (_set("learning_rate.constant", -0.5), "learning_rate constant -0.5 must be positive"),
        (_set("adam.epsilon", 1e-23), r"Adam epsilon 1e-23 vanishes in float32 \(epsilon\^2"),
        (_set("adam.beta1", 1.0), r"Adam beta1 1 is outside \[0, 1\)"),
        (_set("adam.beta2", -0.1), r"Adam beta2 -0.1 is outside \[0, 1\)"),
        (_set("adam.beta1", float("nan")), r"Adam beta1 nan is outside \[0, 1\)"),
        (_set("adam.epsilon", 0.0), "Adam epsilon 0 must be positive and finite"),
        (_set("adam.epsilon", float("inf")), "Adam epsilon inf must be positive and finite"),
        (_set("weight_decay_factor", -1.0), "weight_decay_factor -1 must be non-negative"),
        (_set("clipping_limits.lower.value", 2.0), None),  # with upper 1 below
        (_set("gradient_clipping_limits.upper.value", float("nan")), "gradient_clipping_limits"),
    ],
)
def test_invalid_table_parameters(mutate, pattern: str | None) -> None:
    serialized = _config([("t", 4, 2, _params())], [(0, [1])])
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(serialized)
    o = cfg.table_descriptor[0].optimization_parameters
    mutate(o)
    if pattern is None:
        o.clipping_limits.upper.value = 1.0
        pattern = r"clipping_limits \[2, 1\] is not an interval"
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"table 't': {pattern}"):
        raw.ConfigureTPUEmbedding(config=cfg.SerializeToString())
    assert not engine.info()["configured"]


def test_vanishing_epsilon_outside_the_square_root() -> None:
    serialized = _config([("t", 4, 2, _params(sum_inside_sqrt=False, epsilon=1e-39))], [(0, [1])])
    # A subnormal epsilon: TF's threads treat it as 0 (denormals-are-zero), so
    # the message may come from the positivity check instead.
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"table 't': Adam epsilon \S+ (vanishes in float32|must be positive and finite)",
    ):
        raw.ConfigureTPUEmbedding(config=serialized)
    assert not engine.info()["configured"]


def _with_system(**fields) -> bytes:
    """A valid one-table configuration with `fields` of the proto set (or, for
    `input_shape`, its feature's shape; `extra_tables`, copies of its table)."""
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(
        _config([("t", 4, fields.pop("dim", 2), _params())], [(0, [2])])
    )
    if "input_shape" in fields:
        cfg.feature_descriptor[0].ClearField("input_shape")
        cfg.feature_descriptor[0].input_shape.extend(fields.pop("input_shape"))
    for i in range(fields.pop("extra_tables", 0)):
        cfg.table_descriptor.add().CopyFrom(cfg.table_descriptor[0])
        cfg.table_descriptor[-1].name = f"t{i}"
    if "num_features" in fields:
        cfg.ClearField("feature_descriptor")
        cfg.table_descriptor[0].num_features = fields.pop("num_features")
        cfg.batch_size_per_tensor_core = 2
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg.SerializeToString()


_BIG = 2**31 - 1
_BAD_SYSTEMS = [
    (dict(num_hosts=-3), r"num_hosts -3 is outside \[1, 4096\]"),
    (dict(num_hosts=_BIG, num_tensor_cores=_BIG), rf"num_hosts {_BIG} is outside"),
    (dict(num_tensor_cores=0), r"num_tensor_cores 0 must be num_hosts \(1\) times"),
    (dict(num_hosts=2, num_tensor_cores=3), "num_tensor_cores 3 must be num_hosts"),
    (dict(num_tensor_cores=_BIG), f"num_tensor_cores {_BIG} must be"),
    (dict(sharding_strategy=7), "sharding_strategy 7 is neither DIV_DEFAULT"),
    (dict(mode=9), "mode 9 is not a known mode"),
    (dict(input_shape=[_BIG, 64]), r"input_shape \[2147483647, 64\] must be .* at most 16777216"),
    (dict(input_shape=[2**24], dim=2**7), "at most 16777216 slots and 1073741824 activation"),
    (dict(num_features=_BIG), f"the configuration has {_BIG} features; at most 65536"),
    (dict(num_hosts=4096, num_tensor_cores=4096, extra_tables=299),
     r"300 tables x num_hosts 4096 = 1228800 shards; at most 1048576"),
]


def _in_fresh_process(calls: list[tuple[str, dict]]) -> list[str]:
    """Runs raw ops in a child process; returns "ErrorClass: message" (or "ok") per call.

    For inputs that once killed the process: a regression fails the test,
    not the whole suite.
    """
    script = """
import base64, json, sys
import tensorflow as tf
import tpu_embed_adam  # registers the kernels
for name, kwargs in json.load(sys.stdin):
    kwargs = {k: base64.b64decode(v) if k == "config" else v for k, v in kwargs.items()}
    try:
        getattr(tf.raw_ops, name)(**kwargs)
        print("ok")
    except tf.errors.OpError as e:
        print(f"{type(e).__name__}: {e.message}".replace(chr(10), " "))
"""
    encoded = [
        (name, {k: base64.b64encode(v).decode() if k == "config" else v for k, v in kw.items()})
        for name, kw in calls
    ]
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(encoded), capture_output=True,
        text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-len(calls):]


def test_configuration_limits_are_errors_not_crashes() -> None:
    z = [[0.0, 0.0]] * 4
    calls = []
    for fields, _ in _BAD_SYSTEMS:
        config = _with_system(**fields)
        calls.append(("ConfigureTPUEmbedding", {"config": config}))
        calls.append(("LoadTPUEmbeddingADAMParameters", dict(
            parameters=z, momenta=z, velocities=z, num_shards=1, shard_id=0, table_name="t",
            config=config)))
    calls.append(("ConfigureTPUEmbedding", {"config": _with_system()}))
    lines = _in_fresh_process(calls)
    for i, (_, pattern) in enumerate(_BAD_SYSTEMS):
        for line in lines[2 * i : 2 * i + 2]:
            assert line.startswith("InvalidArgumentError: "), line
            assert re.search(pattern, line), (pattern, line)
    assert lines[-1] == "ok"


@pytest.mark.parametrize("fields,pattern", _BAD_SYSTEMS[:7], ids=lambda x: str(x)[:30])
def test_bad_system_fields_leave_the_engine_as_it_was(loaded: bytes, fields, pattern) -> None:
    before = _snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.ConfigureTPUEmbedding(config=_with_system(**fields))
    _assert_unchanged(before)


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
    before = _snapshot()
    data = [np.ones((5, 4), np.float32) for _ in range(3)]
    data[tensor][3, 1] = value
    kwargs = dict(parameters=data[0], momenta=data[1], velocities=data[2], num_shards=2,
                  table_name="a")
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"table 'a' shard 1: {pattern}"):
        raw.LoadTPUEmbeddingADAMParameters(shard_id=1, **kwargs)
    _assert_unchanged(before)
    # A load that waited for the configuration is refused when it arrives.
    engine.reset()
    raw.LoadTPUEmbeddingADAMParameters(shard_id=1, **kwargs)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"before the configuration: .*{pattern}"
    ):
        raw.LoadTPUEmbeddingADAMParameters(shard_id=0, config=loaded, **kwargs)
    assert not engine.info()["configured"]


def test_bad_enqueue_values(loaded: bytes) -> None:
    before = _snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="device_ordinal -5 must be a core"
    ):
        _enqueue("arbitrary", _ids([0, 1], [1, 2]), [], [0, 1], ordinal=-5)
    three = (np.array([[0, 0, 0], [1, 0, 0]], np.int64), np.array([1, 2], np.int64),
             np.zeros((0,), np.float32))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"feature 0 \(table 'a'\): sample indices have 3 columns; input_shape \[2\] takes",
    ):
        _enqueue("arbitrary", [three, _ids([1, 2])[0]], [], [0, 1])
    for bad in (np.nan, np.inf):
        weighted = (np.array([0, 1, 2], np.int64), np.array([1, 2], np.int64),
                    np.array([1.0, bad], np.float32))
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=rf"feature 0 \(table 'a'\): aggregation_weights\[1\] = {bad} is not finite",
        ):
            _enqueue("ragged", [weighted, _ids([1, 2])[0]], ["mean", "sum"], [0, 1])
    _assert_unchanged(before)
    assert engine.info()["queued_batches"] == 0


def test_enqueue_limits() -> None:
    wide = _with_system(dim=2**30, input_shape=[1])
    raw.ConfigureTPUEmbedding(config=wide)
    with pytest.raises(
        tf.errors.ResourceExhaustedError, match="reach 3221225472 gradient elements"
    ):
        _enqueue("arbitrary", [(np.zeros((3, 2), np.int64), np.array([0, 1, 2], np.int64),
                                np.zeros((0,), np.float32))], [], [0])
    engine.reset()
    raw.ConfigureTPUEmbedding(config=_config([("a", 10, 4, _params())], [(0, [2])]))
    for _ in range(1024):
        _enqueue("arbitrary", _ids([0, 1]), [], [0])
    with pytest.raises(tf.errors.ResourceExhaustedError, match="already has 1024 batches"):
        _enqueue("arbitrary", _ids([0, 1]), [], [0])
    assert engine.info()["queued_batches"] == 1024


@pytest.mark.parametrize("value", ["abc", "1e9", "9.3e12", "0", "-5", "", " 5", "99999999999"])
def test_recv_timeout_is_parsed_strictly(
    loaded: bytes, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", value)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"TPU_EMBED_ADAM_RECV_TIMEOUT_MS='{value}' must be a whole number of "
        r"milliseconds in \[1, 86400000\]",
    ):
        raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "5")
    with pytest.raises(tf.errors.FailedPreconditionError, match="nothing was enqueued"):
        raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)


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


def test_send_before_enqueue(loaded: bytes) -> None:
    before = _snapshot()
    g = [np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32)]
    with pytest.raises(tf.errors.FailedPreconditionError, match="no batch awaits gradients"):
        raw.SendTPUEmbeddingGradients(inputs=g, learning_rates=[], config=loaded)
    _assert_unchanged(before)


def test_gradient_shape_mismatch_keeps_batch(loaded: bytes) -> None:
    _enqueue("arbitrary", _ids([0, 9], [1, 5]), [], [0, 1])
    raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)
    before = _snapshot()
    bad = [np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"gradient 0 \(table 'a'\) has shape \[2, 3\]; its "
        r"activation has shape \[2, 4\]",
    ):
        raw.SendTPUEmbeddingGradients(inputs=bad, learning_rates=[], config=loaded)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Send has 1 gradients"):
        raw.SendTPUEmbeddingGradients(inputs=bad[1:], learning_rates=[], config=loaded)
    _assert_unchanged(before)
    good = [np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)]
    raw.SendTPUEmbeddingGradients(inputs=good, learning_rates=[], config=loaded)
    after = _snapshot()[1]
    assert not np.array_equal(after[0][0], before[1][0][0])  # row 0 moved
    with pytest.raises(tf.errors.FailedPreconditionError, match="no batch awaits"):
        raw.SendTPUEmbeddingGradients(inputs=good, learning_rates=[], config=loaded)


def test_missing_dynamic_learning_rate() -> None:
    cfg = _config([("d", 4, 2, _params(dynamic_tag=0))], [(0, [1])])
    _load_all(cfg, "d", _random_state(np.random.default_rng(7), 4, 2), 1, False)
    _enqueue("arbitrary", _ids([1]), [], [0])
    raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    before = _snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="table 'd' uses dynamic learning rate tag 0 but Send got 0",
    ):
        raw.SendTPUEmbeddingGradients(
            inputs=[np.ones((1, 2), np.float32)], learning_rates=[], config=cfg
        )
    _assert_unchanged(before)


# --------------------------------------------------------------------------
# Concurrency.


def test_concurrent_session_runs_never_tear_rows() -> None:
    rows, dim, cores = 64, 16, 4
    p = _params(0.01)
    cfg = _config([("c", rows, dim, p)], [(0, [8])], cores_per_host=cores)
    raw.ConfigureTPUEmbedding(config=cfg)
    errors: list[BaseException] = []
    with tf.Graph().as_default():
        value = tf.compat.v1.placeholder(tf.float32, [])
        filled = tf.fill([rows, dim], value)
        load = raw.LoadTPUEmbeddingADAMParameters(
            parameters=filled,
            momenta=filled,
            velocities=tf.abs(filled) + 1.0,
            num_shards=1,
            shard_id=0,
            table_name="c",
        )
        retrieve = raw.RetrieveTPUEmbeddingADAMParameters(num_shards=1, shard_id=0, table_name="c")
        ids = tf.compat.v1.placeholder(tf.int64, [8])
        steps = []
        for c in range(cores):
            enq = _enqueue(
                "arbitrary",
                [(tf.zeros([0], tf.int64), ids, tf.zeros([0], tf.float32))],
                [],
                [0],
                ordinal=c,
            )
            with tf.device(f"/device:CPU:{c}"), tf.control_dependencies([enq]):
                (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
                steps.append(
                    raw.SendTPUEmbeddingGradients(
                        inputs=[act * 0.0 + 1.0], learning_rates=[], config=cfg
                    )
                )
        config = tf.compat.v1.ConfigProto(device_count={"CPU": cores})
        with tf.compat.v1.Session(config=config) as sess:
            sess.run(load, {value: 1.0})

            def loader(k: int) -> None:
                for i in range(30):
                    sess.run(load, {value: float(k * 100 + i)})

            def reader() -> None:
                for _ in range(60):
                    w, m, _ = sess.run(retrieve)
                    # Loads write whole shards: a torn read mixes two values.
                    if np.unique(w).size != 1 or np.unique(m).size != 1:
                        raise AssertionError("torn shard read")

            def trainer(c: int) -> None:
                rng = np.random.default_rng(c)
                for _ in range(20):
                    sess.run(steps[c], {ids: rng.integers(0, rows, 8)})

            def guard(fn, *args):
                def run() -> None:
                    try:
                        fn(*args)
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errors.append(e)

                return run

            threads = [threading.Thread(target=guard(loader, k)) for k in range(2)]
            threads += [threading.Thread(target=guard(reader)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            sess.run(load, {value: 0.5})
            trainers = [threading.Thread(target=guard(trainer, c)) for c in range(cores)]
            for t in trainers:
                t.start()
            for t in trainers:
                t.join()
            assert not errors, errors
            w, m, v = sess.run(retrieve)
    assert np.isfinite(w).all() and np.isfinite(m).all() and (v > 0).all()
    assert engine.info()["queued_batches"] == 0


def test_concurrent_lookups_and_updates_never_tear_rows() -> None:
    # Every element of a row starts equal and gets the same gradient (no
    # clipping), so each row stays uniform; a lookup that overlaps an update
    # of its row would mix two steps' values within one activation row.
    rows, dim, batch = 16, 64, 8
    trainers, readers = 2, 2
    p = _params(0.05)
    cfg = _config([("u", rows, dim, p)], [(0, [batch])], cores_per_host=trainers + readers)
    w0 = np.repeat(np.linspace(-1, 1, rows, dtype=np.float32)[:, None], dim, axis=1)
    _load_all(cfg, "u", [w0, np.zeros_like(w0), np.full_like(w0, 0.5)], 1, False)
    errors: list[BaseException] = []
    with tf.Graph().as_default():
        ids = tf.compat.v1.placeholder(tf.int64, [batch])
        empty = (tf.zeros([0], tf.int64), ids, tf.zeros([0], tf.float32))
        steps, lookups = [], []
        for c in range(trainers + readers):
            training = c < trainers
            enq = raw.EnqueueTPUEmbeddingArbitraryTensorBatch(
                sample_indices_or_row_splits=[empty[0]],
                embedding_indices=[ids],
                aggregation_weights=[empty[2]],
                mode_override="training" if training else "inference",
                device_ordinal=c,
                combiners=["sum"],
            )
            with tf.device(f"/device:CPU:{c}"), tf.control_dependencies([enq]):
                (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
                if training:
                    steps.append(
                        raw.SendTPUEmbeddingGradients(
                            inputs=[act * 0.0 + 1.0], learning_rates=[], config=cfg
                        )
                    )
                else:
                    lookups.append(act)
        config = tf.compat.v1.ConfigProto(
            device_count={"CPU": trainers + readers}, inter_op_parallelism_threads=8
        )
        with tf.compat.v1.Session(config=config) as sess:

            def trainer(c: int) -> None:
                rng = np.random.default_rng(c)
                for _ in range(40):
                    sess.run(steps[c], {ids: rng.integers(0, rows, batch)})

            def reader(c: int) -> None:
                rng = np.random.default_rng(100 + c)
                for _ in range(80):
                    act = sess.run(lookups[c], {ids: rng.integers(0, rows, batch)})
                    spread = act.max(axis=1) - act.min(axis=1)
                    if (spread > 1e-6 * (1 + np.abs(act).max(axis=1))).any():
                        raise AssertionError(f"torn activation row: spread {spread.max()}")

            def guard(fn, c: int):
                def run() -> None:
                    try:
                        fn(c)
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errors.append(e)

                return run

            threads = [threading.Thread(target=guard(trainer, c)) for c in range(trainers)]
            threads += [threading.Thread(target=guard(reader, c)) for c in range(readers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert not errors, errors
    w, m, v = _retrieve_all("u", rows, dim, 1, False)
    assert not np.array_equal(w, w0)  # the trainers did update rows
    assert (np.ptp(w, axis=1) <= 1e-6 * (1 + np.abs(w).max(axis=1))).all()
    assert engine.info()["queued_batches"] == 0
