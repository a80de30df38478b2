"""Training steps through TF's raw ops (enqueue, Recv, Send): every step against
a numpy lookup and `reference.adam_update`; several cores, dynamic learning
rates, Send errors, and concurrent session runs that never tear rows.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from harness_raw_ops import (
    ENQUEUE_CASES,
    adam_params,
    assert_engine_unchanged,
    bag_formats,
    dense_ids,
    embedding_config,
    engine_snapshot,
    enqueue,
    load_all,
    numpy_lookup,
    random_bags,
    random_slots,
    raw,
    retrieve_all,
)

from tpu_embed_adam import engine, reference


@pytest.mark.parametrize("kind,layout", ENQUEUE_CASES)
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_step_matches_numpy_lookup_and_reference(kind: str, layout: str, combiner: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind}{layout}{combiner}".encode()))
    mod = layout == "splits"
    weighted = layout != "dense"
    p_a, p_b = adam_params(0.05), adam_params(0.02, lazy_adam=False, sum_inside_sqrt=False)
    specs = {"a": (11, 4, p_a), "b": (7, 3, p_b)}
    batch = 4
    # Features in table order: two share table "a".
    feature_tables = [0, 0, 1]
    cfg = embedding_config(
        [(n, v, d, p) for n, (v, d, p) in specs.items()],
        [(t, [batch]) for t in feature_tables],
        num_hosts=2,
        mod=mod,
    )
    state = {n: random_slots(rng, v, d) for n, (v, d, _) in specs.items()}
    for i, (n, full) in enumerate(state.items()):
        load_all(cfg if i == 0 else b"", n, full, 2, mod)

    names = list(specs)
    max_ids = 1 if layout == "dense" else 3
    bags = [random_bags(rng, batch, specs[names[t]][0], max_ids, weighted) for t in feature_tables]
    feats = [bag_formats(b, weighted, layout) for b in bags]
    enqueue(kind, feats, [combiner] * 3, feature_tables)
    acts = raw.RecvTPUEmbeddingActivations(num_outputs=3, config=cfg)

    grads = [rng.normal(size=a.shape).astype(np.float32) for a in acts]
    per_table: dict[str, tuple[list[int], list[np.ndarray]]] = {n: ([], []) for n in names}
    for f, t in enumerate(feature_tables):
        want, scales = numpy_lookup(state[names[t]][0], bags[f], combiner)
        np.testing.assert_allclose(acts[f].numpy(), want, rtol=1e-5, atol=1e-6)
        ids = [i for bag in bags[f] for i, _ in bag]
        per_table[names[t]][0].extend(ids)
        per_table[names[t]][1].extend(s * grads[f][b] for b, s in scales)
    raw.SendTPUEmbeddingGradients(inputs=grads, learning_rates=[], config=cfg)

    for n, (v, d, p) in specs.items():
        ids, rows = per_table[n]
        want = reference.adam_update(*state[n], np.array(ids), np.array(rows), p)
        got = retrieve_all(n, v, d, 2, mod)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_activations_are_the_same_floats_whatever_the_order_of_samples() -> None:
    """Each slot sums its ids in their order, wherever its samples sit in the enqueue."""
    rng = np.random.default_rng(13)
    batch, vocab, dim = 4096, 50, 8
    cfg = embedding_config([("t", vocab, dim, adam_params())], [(0, [batch])])
    state = random_slots(rng, vocab, dim)
    load_all(cfg, "t", state, 1, False)
    # Empty samples too: their slots must come back zero.
    bags = []
    for k in rng.integers(0, 4, batch):
        pairs = zip(rng.integers(0, vocab, k), rng.uniform(0.5, 2, k), strict=True)
        bags.append([(int(i), float(w)) for i, w in pairs])
    index, ids, weights = bag_formats(bags, True, "indices")
    # Samples in reverse order, each sample's ids still in their order.
    order = np.argsort(-index[:, 0], kind="stable")
    acts = []
    for rows in (np.arange(len(ids)), order):
        enqueue("sparse", [(index[rows], ids[rows], weights[rows])], ["sum"], [0])
        acts.append(raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)[0].numpy())
    want, _ = numpy_lookup(state[0], bags, "sum")
    np.testing.assert_allclose(acts[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(acts[1], acts[0])


def test_sequence_feature_truncates_and_trains() -> None:
    rng = np.random.default_rng(3)
    p = adam_params(0.1)
    cfg = embedding_config([("s", 6, 2, p)], [(0, [2, 3])])
    full = random_slots(rng, 6, 2)
    load_all(cfg, "s", full, 1, False)
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
    for w, g in zip(ref, retrieve_all("s", 6, 2, 1, False), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_dynamic_learning_rate_by_tag() -> None:
    rng = np.random.default_rng(4)
    p0, p1 = adam_params(dynamic_tag=1), adam_params(dynamic_tag=0)
    cfg = embedding_config([("x", 5, 2, p0), ("y", 5, 2, p1)], [(0, [1]), (1, [1])])
    state = {"x": random_slots(rng, 5, 2), "y": random_slots(rng, 5, 2)}
    for i, (n, full) in enumerate(state.items()):
        load_all(cfg if i == 0 else b"", n, full, 1, False)
    enqueue(
        "arbitrary",
        [bag_formats([[(2, 1.0)]], False, "dense"), bag_formats([[(3, 1.0)]], False, "dense")],
        [],
        [0, 1],
    )
    raw.RecvTPUEmbeddingActivations(num_outputs=2, config=cfg)
    g = np.ones((1, 2), np.float32)
    raw.SendTPUEmbeddingGradients(inputs=[g, g], learning_rates=[0.5, 0.01], config=cfg)
    for n, row, lr in (("x", 2, 0.01), ("y", 3, 0.5)):
        want = reference.adam_update(*state[n], np.array([row]), g, p0, learning_rate=lr)
        np.testing.assert_allclose(retrieve_all(n, 5, 2, 1, False)[0], want[0], rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.05])
def test_a_bad_dynamic_learning_rate_is_refused_naming_its_table(bad: float) -> None:
    rng = np.random.default_rng(9)
    cfg = embedding_config([("x", 5, 2, adam_params(dynamic_tag=0))], [(0, [1])])
    load_all(cfg, "x", random_slots(rng, 5, 2), 1, False)
    enqueue("arbitrary", [bag_formats([[(2, 1.0)]], False, "dense")], [], [0])
    raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    before = engine_snapshot()
    g = np.ones((1, 2), np.float32)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"Argument `learning_rates\[0\]` \(table 'x'\) must be finite and >= 0; received: ",
    ):
        raw.SendTPUEmbeddingGradients(inputs=[g], learning_rates=[bad], config=cfg)
    assert_engine_unchanged(before)
    # Nothing was taken either: the same batch still trains, at a rate of 0
    # (a warm-up schedule's first step), which leaves the weights as they are.
    raw.SendTPUEmbeddingGradients(inputs=[g], learning_rates=[0.0], config=cfg)
    np.testing.assert_array_equal(retrieve_all("x", 5, 2, 1, False)[0], before[1][0][0])


def test_two_cores_make_one_update_per_step() -> None:
    rng = np.random.default_rng(5)
    p = adam_params(0.1)
    cfg = embedding_config([("t", 8, 2, p)], [(0, [2])], cores_per_host=2)
    full = random_slots(rng, 8, 2)
    load_all(cfg, "t", full, 1, False)
    ids = [np.array([1, 5], np.int64), np.array([5, 6], np.int64)]
    grads = [rng.normal(size=(2, 2)).astype(np.float32) for _ in range(2)]
    config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
    with tf.Graph().as_default():
        enq = [
            enqueue(
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
    for w, g in zip(want, retrieve_all("t", 8, 2, 1, False), strict=True):
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
                self.enqueue.append(enqueue("arbitrary", [empty], [], [0], ordinal=c))
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
    p = adam_params(0.1)
    cfg = embedding_config([("t", 8, 2, p)], [(0, [2])], cores_per_host=2)
    state = random_slots(rng, 8, 2)
    load_all(cfg, "t", state, 1, False)
    return rng, p, state, _TwoCores(cfg)


def _assert_retrieved(want) -> None:
    for w, have in zip(want, retrieve_all("t", 8, 2, 1, False), strict=True):
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


def test_two_cores_sum_in_core_order_whatever_order_they_send_in() -> None:
    rng, p, state, g = _two_core_table(12)
    ids = [np.array([5, 5], np.int64), np.array([5, 6], np.int64)]
    # Magnitudes that differ by orders make float32 sums depend on their order.
    grads = [(rng.normal(size=(2, 2)) * [[1e3], [1e-3]]).astype(np.float32) for _ in range(2)]
    feed = {g.ids[0]: ids[0], g.ids[1]: ids[1], g.grads[0]: grads[0], g.grads[1]: grads[1]}
    results = []
    for order in ((1, 0), (0, 1)):
        load_all(b"", "t", state, 1, False)
        g.run(g.enqueue, feed)
        for c in order:
            g.run(g.step[c], feed)
        results.append(retrieve_all("t", 8, 2, 1, False))
    # Each core's sum per row (from zero, in its order), then the cores' sums in
    # core order: the rows the multi-process owner gets (docs/engine.md, "Numerics").
    core0 = np.float32(0) + grads[0][0] + grads[0][1]
    want = reference.adam_update(
        *state, np.array([5, 5, 6]), np.stack([core0, grads[1][0], grads[1][1]]), p
    )
    for got in results:
        for w, have in zip(want, got, strict=True):
            np.testing.assert_array_equal(have, w)
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
    fresh = random_slots(rng, 8, 2)
    load_all(b"", "t", fresh, 1, False)
    for w, have in zip(fresh, retrieve_all("t", 8, 2, 1, False), strict=True):
        np.testing.assert_array_equal(have, w)  # the open step did not land on the load
    g.sess.close()


def _await_waiting_ops(n: int, deadline_s: float = 30.0) -> None:
    """Returns once `n` ops wait for a batch in the engine (its own count)."""
    end = time.monotonic() + deadline_s
    while engine.info()["waiting"] != n:
        assert time.monotonic() < end, engine.info()
        time.sleep(0.01)


def test_a_reset_wakes_a_waiting_recv_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = embedding_config([("t", 4, 1, adam_params())], [(0, [1])])
    load_all(cfg, "t", random_slots(np.random.default_rng(13), 4, 1), 1, False)
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "60000")
    result: list[object] = []

    def recv() -> None:
        try:
            raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
        except tf.errors.OpError as e:
            result.append(e)

    thread = threading.Thread(target=recv)
    thread.start()
    _await_waiting_ops(1)
    start = time.monotonic()
    engine.reset()
    thread.join()
    assert time.monotonic() - start < 10
    assert len(result) == 1 and isinstance(result[0], tf.errors.AbortedError), result
    assert engine.info()["waiting"] == 0


def test_a_sessions_timeout_ends_a_waiting_recv(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = embedding_config([("t", 4, 1, adam_params())], [(0, [1])])
    load_all(cfg, "t", random_slots(np.random.default_rng(14), 4, 1), 1, False)
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "60000")
    with tf.Graph().as_default():
        (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
        with tf.compat.v1.Session() as sess:
            start = time.monotonic()
            with pytest.raises(tf.errors.DeadlineExceededError):
                sess.run(act, options=tf.compat.v1.RunOptions(timeout_in_ms=500))
            # The op's cancellation ended the engine's wait, not its 60 s.
            assert time.monotonic() - start < 10
    _await_waiting_ops(0)


def test_recv_fails_when_the_engine_is_reset_while_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = embedding_config([("t", 4, 1, adam_params())], [(0, [1])])
    big = embedding_config([("t", 4, 256, adam_params())], [(0, [64])])
    load_all(small, "t", random_slots(np.random.default_rng(11), 4, 1), 1, False)
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "20000")
    result: list[object] = []

    def recv() -> None:
        try:
            result.append(raw.RecvTPUEmbeddingActivations(num_outputs=1, config=small))
        except tf.errors.OpError as e:
            result.append(e)

    thread = threading.Thread(target=recv)
    thread.start()
    _await_waiting_ops(1)  # Recv waits for core 0's batch
    # A new, larger configuration with a batch for the same core: Recv's
    # outputs were sized for the old one.
    start = time.monotonic()
    raw.ConfigureTPUEmbedding(config=big)
    thread.join()
    # The reconfiguration woke it at once, not its 20 s timeout.
    assert time.monotonic() - start < 10
    assert len(result) == 1 and isinstance(result[0], tf.errors.AbortedError), result
    load_all(b"", "t", random_slots(np.random.default_rng(12), 4, 256), 1, False)
    enqueue("arbitrary", dense_ids([1] * 64), [], [0])
    # The batch stays queued for a Recv of the new configuration.
    monkeypatch.setenv("TPU_EMBED_ADAM_RECV_TIMEOUT_MS", "1")
    (act,) = raw.RecvTPUEmbeddingActivations(num_outputs=1, config=big)
    assert act.shape == (64, 256)


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


def test_send_before_enqueue(loaded: bytes) -> None:
    before = engine_snapshot()
    g = [np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32)]
    with pytest.raises(tf.errors.FailedPreconditionError, match="no batch awaits gradients"):
        raw.SendTPUEmbeddingGradients(inputs=g, learning_rates=[], config=loaded)
    assert_engine_unchanged(before)


def test_gradient_shape_mismatch_keeps_batch(loaded: bytes) -> None:
    enqueue("arbitrary", dense_ids([0, 9], [1, 5]), [], [0, 1])
    raw.RecvTPUEmbeddingActivations(num_outputs=2, config=loaded)
    before = engine_snapshot()
    bad = [np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"gradient 0 \(table 'a'\) has shape \[2, 3\]; its "
        r"activation has shape \[2, 4\]",
    ):
        raw.SendTPUEmbeddingGradients(inputs=bad, learning_rates=[], config=loaded)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Send has 1 gradients"):
        raw.SendTPUEmbeddingGradients(inputs=bad[1:], learning_rates=[], config=loaded)
    assert_engine_unchanged(before)
    good = [np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)]
    raw.SendTPUEmbeddingGradients(inputs=good, learning_rates=[], config=loaded)
    after = engine_snapshot()[1]
    assert not np.array_equal(after[0][0], before[1][0][0])  # row 0 moved
    with pytest.raises(tf.errors.FailedPreconditionError, match="no batch awaits"):
        raw.SendTPUEmbeddingGradients(inputs=good, learning_rates=[], config=loaded)


def test_missing_dynamic_learning_rate() -> None:
    cfg = embedding_config([("d", 4, 2, adam_params(dynamic_tag=0))], [(0, [1])])
    load_all(cfg, "d", random_slots(np.random.default_rng(7), 4, 2), 1, False)
    enqueue("arbitrary", dense_ids([1]), [], [0])
    raw.RecvTPUEmbeddingActivations(num_outputs=1, config=cfg)
    before = engine_snapshot()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="table 'd' uses dynamic learning rate tag 0 but Send got 0",
    ):
        raw.SendTPUEmbeddingGradients(
            inputs=[np.ones((1, 2), np.float32)], learning_rates=[], config=cfg
        )
    assert_engine_unchanged(before)


def test_concurrent_session_runs_never_tear_rows() -> None:
    rows, dim, cores = 64, 16, 4
    p = adam_params(0.01)
    cfg = embedding_config([("c", rows, dim, p)], [(0, [8])], cores_per_host=cores)
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
            enq = enqueue(
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
    p = adam_params(0.05)
    cfg = embedding_config([("u", rows, dim, p)], [(0, [batch])], cores_per_host=trainers + readers)
    w0 = np.repeat(np.linspace(-1, 1, rows, dtype=np.float32)[:, None], dim, axis=1)
    load_all(cfg, "u", [w0, np.zeros_like(w0), np.full_like(w0, 0.5)], 1, False)
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
    w, m, v = retrieve_all("u", rows, dim, 1, False)
    assert not np.array_equal(w, w0)  # the trainers did update rows
    assert (np.ptp(w, axis=1) <= 1e-6 * (1 + np.abs(w).max(axis=1))).all()
    assert engine.info()["queued_batches"] == 0
