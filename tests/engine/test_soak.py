"""Soak: training, retrieving and saving run concurrently for a fixed time (slow).

Threads on one `Session` of TF's v1 `TPUEmbedding` graph (one core, data fixed
per step index, as `train_child.py`):

- trainer: `train_step` (enqueue, then Recv -> loss -> gradients -> Send),
  counting completed steps;
- retriever: `retrieve_ops()` and a read of TF's variables;
- saver: `retrieve_ops()` and `Saver.save`;
- inspector: `tpu_embed_adam.engine.info()`;
- monitor: the process's RSS once a second.

(The retriever and the saver share TF's variables, so each holds a lock
across its retrieve and read/save; both still run against live training.)

Invariant ("no torn rows"): in every snapshot (each retrieve, and the saved
checkpoints the Saver keeps) each table's w, m and v are the state after some
whole step k, with k inside the window of steps completed while it ran: not
a mix of two steps within a row, nor between a table's rows or slots. Tables
may come from two adjacent steps: `retrieve_ops()` is one op per table, run
in parallel, and a step may land between them (counted and printed).
After the soak, a single-threaded replay of the same steps from the same
initial tables hashes each table after each step in any window; each
snapshot's table hashes must be among its window's. Every row is also
finite, and every `v` >= 0. Memory: the RSS growth from the first quarter
(after warm-up) to the last must stay bounded.

`SOAK_SECONDS` (default 60) sets the length.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import train_child

from tpu_embed_adam import engine

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
RSS_GROWTH_LIMIT_MB = 64.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _digest(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """One hash per table, over its w, m and v."""
    out = {}
    for table in sorted({name.split("/")[0] for name in arrays}):
        h = hashlib.sha256()
        for k in "wmv":
            h.update(np.ascontiguousarray(arrays[f"{table}/{k}"], np.float32).tobytes())
        out[table] = h.hexdigest()
    return out


def _flatten(state) -> dict[str, np.ndarray]:
    return {f"{t}/{k}": getattr(s, k) for t, s in state.items() for k in "wmv"}


def _check_rows(arrays: dict[str, np.ndarray], where: str) -> None:
    for name, a in arrays.items():
        assert np.isfinite(a).all(), f"{where}: non-finite values in {name}"
        if name.endswith("/v"):
            assert (a >= 0).all(), f"{where}: negative velocity in {name}"


@pytest.mark.slow
def test_soak_train_retrieve_save_concurrently(tmp_path):
    engine.reset()
    graph = train_child.make_graph()
    stop = threading.Event()
    errors: list[BaseException] = []
    completed = [0]  # steps whose train_step returned
    var_lock = threading.Lock()  # TF's variables: one retrieve+read/save at a time
    snapshots: list[tuple[int, int, dict[str, str], str]] = []  # (lo, hi, digests, what)
    checkpoints: list[tuple[int, int, str]] = []
    rss: list[tuple[float, float]] = []
    counts = {"retrieves": 0, "saves": 0, "infos": 0}

    def guarded(fn):
        def run():
            try:
                while not stop.is_set():
                    fn()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                stop.set()
        return run

    def train():
        step = completed[0] + 1
        graph.train_step(*train_child.step_data(graph, step), step)
        completed[0] = step

    def retrieve():
        with var_lock:
            lo = completed[0]
            graph.session.run(graph.retrieve_ops)
            hi = completed[0] + 1  # a Send may have closed step hi before train_step returned
            arrays = _flatten(graph.read())
        _check_rows(arrays, f"retrieve in steps [{lo}, {hi}]")
        snapshots.append((lo, hi, _digest(arrays), "retrieve"))
        counts["retrieves"] += 1

    def save():
        with var_lock:
            lo = completed[0]
            graph.session.run(graph.retrieve_ops)
            hi = completed[0] + 1
            with graph.graph.as_default():
                path = graph.saver.save(graph.session, str(tmp_path / "ckpt"),
                                        global_step=counts["saves"])
        checkpoints.append((lo, hi, path))
        counts["saves"] += 1
        time.sleep(0.2)

    def inspect():
        info = engine.info()
        assert info["configured"], info
        counts["infos"] += 1
        time.sleep(0.05)

    def monitor():
        rss.append((time.perf_counter(), _rss_mb()))
        time.sleep(1.0)

    try:
        graph.run_init()
        graph.load()
        threads = [threading.Thread(target=guarded(f), name=f.__name__)
                   for f in (train, retrieve, save, inspect, monitor)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        stop.wait(SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.perf_counter() - start
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        # Saved checkpoints: read back as snapshots (the last few the Saver keeps).
        for lo, hi, path in checkpoints[-4:]:  # Saver keeps the last 5
            reader = tf.train.load_checkpoint(path)
            arrays = {f"{t}/{k}": reader.get_tensor(n)
                      for t in graph.tables
                      for k, n in (("w", t), ("m", f"{t}/Adam/m"), ("v", f"{t}/Adam/v"))}
            _check_rows(arrays, f"checkpoint {path}")
            snapshots.append((lo, hi, _digest(arrays), f"checkpoint {path}"))
    finally:
        stop.set()
        graph.close()
        engine.reset()

    steps = completed[0]
    # Replay single-threaded; hash the state after every step some window holds.
    wanted = set()
    for lo, hi, _, _ in snapshots:
        wanted.update(range(lo, hi + 1))
    replay = train_child.make_graph()
    digests: dict[int, dict[str, str]] = {}
    try:
        replay.run_init()
        replay.load()
        if 0 in wanted:
            digests[0] = _digest(_flatten(replay.retrieve()))
        for step in range(1, max(wanted) + 1):
            replay.train_step(*train_child.step_data(replay, step), step)
            if step in wanted:
                digests[step] = _digest(_flatten(replay.retrieve()))
    finally:
        replay.close()
        engine.reset()
    # Per table, w, m and v come from one Retrieve op: they must be one step's.
    # Across tables, `retrieve_ops()` is one op per table, run in parallel in one
    # Session.run: a step may land between two tables' ops (counted, not refused;
    # TF's flow retrieves between steps).
    torn, mixed = [], 0
    for lo, hi, d, what in snapshots:
        window = [k for k in range(lo, hi + 1) if k in digests]
        steps_of = {t: {k for k in window if digests[k][t] == h} for t, h in d.items()}
        torn += [(lo, hi, t, what) for t, ks in steps_of.items() if not ks]
        mixed += bool(all(steps_of.values()) and not set.intersection(*steps_of.values()))
    assert not torn, f"{len(torn)} table snapshots match no step: {torn[:5]}"

    quarter = max(len(rss) // 4, 1)
    warm = [r for _, r in rss[quarter:2 * quarter]] or [rss[0][1]]
    last = [r for _, r in rss[-quarter:]]
    growth = float(np.median(last) - np.median(warm))
    print(f"\nsoak {elapsed:.0f} s: {steps} steps, {counts['retrieves']} retrieves, "
          f"{counts['saves']} saves, {counts['infos']} info calls, {len(snapshots)} snapshots "
          f"checked ({mixed} with tables from two adjacent steps); "
          f"RSS MB start {rss[0][1]:.0f}, after warm-up {np.median(warm):.0f}, "
          f"end {np.median(last):.0f}, max {max(r for _, r in rss):.0f}, growth {growth:+.1f}")
    assert steps > 10 and counts["retrieves"] > 5 and counts["saves"] > 2
    assert growth < RSS_GROWTH_LIMIT_MB, rss
