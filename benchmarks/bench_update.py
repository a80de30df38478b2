r"""One sparse Adam step, side by side: the fused op, the TF-ops path and peers.

On the same table and ids, per case and mode (lazy, non-lazy), the median
wall time of one step over `--steps` steps after `--warmup` steps of the
implementations below, all alive at once and timed round-robin (one step of
each in turn), so that load from elsewhere on the machine is shared fairly:

* `fused`: the `TpuEmbedAdamApply` kernel (`ops/fused.py`), in `tf.function`;
  `fused_loop` (lazy): the same, `--loop_steps` steps per call in a `tf.range`
  loop, so that Python's call of the function (about 1 ms) is spread thin;
* `tf_path`: the pure-TF path (`ops/tf_path.py`) in `tf.function`, and
  `tf_path_xla` with `jit_compile=True`;
* `numpy_reference`: `reference.adam_update`, timed on its own
  (`--reference_steps` steps: it is slow and copies the table);
* `lazy_adam_tfa` (lazy): TF-Addons `LazyAdam`, and `sparse_adam_torch` (lazy):
  `torch.optim.SparseAdam`, when installed (`requirements-bench.txt`);
* `dense_adam_tf1` (non-lazy): `tf.compat.v1.train.AdamOptimizer` on the
  dense gradient (precomputed outside the timed step).

A copy-bandwidth probe (numpy copies on every core) runs in the same process,
before and after the cases; the higher of the two is the reference.
Effective GB/s = (N + 6 x distinct rows) x D x 4 B / time: the gradients read
once, and table, m and v each read and written once per distinct row.

The random-row probe (`random_row_probe.cc`, built here with g++ -O3 -mavx)
is the limit of the lazy update's access pattern: for the same ids, in the
same process right after the case's steps, it reads and writes back each
distinct row of three tables of the case's shape and reads every gradient
row, with no arithmetic, on as many threads as the kernel's pool (one per
core), prefetching rows 0, 4, 8 or 16 ahead; the fastest counts. Each lazy
case reports the fused kernel as a fraction of it (probe time / kernel time;
issue 19's goal: at least 0.85).

No timed step reads a variable densely: after a sparse update TF keeps the
variable in copy-on-read mode, and a dense read would copy the whole table.

  make bench                                  # installs the peers, full run
  python benchmarks/bench_update.py --quick   # small smoke run
  python benchmarks/bench_update.py --png=/tmp/ratios.png

The PNG shows the ratio rows: each peer's time over the fused kernel's per
case and mode, the random-row probe's time over the kernel's (per call and
in the loop), and the fused lazy update's bandwidth over the copy probe's.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import conditions  # noqa: E402  (benchmarks/, beside this script)
import numpy as np  # noqa: E402
import ratio_plot  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from tpu_embed_adam import (
    _library,  # noqa: E402
    reference,  # noqa: E402
)
from tpu_embed_adam.ops.fused import fused_apply_adam  # noqa: E402
from tpu_embed_adam.params import AdamParameters  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Small tables and few steps: a smoke run.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per implementation (>= 10 for reports).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, slot creation).")
_REFERENCE_STEPS = flags.DEFINE_integer("reference_steps", 3, "Timed steps of the numpy reference.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", str(pathlib.Path(__file__).resolve().parent / "results"),
    "The JSON (and, without --png, the PNG) go here.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the ids and gradients.")
_XLA_MAX_ELEMENTS = flags.DEFINE_integer(
    "xla_max_elements",
    0,
    "Largest table (rows x dim) for tf_path_xla; 0: no limit (on 1M x 128 it needs about "
    "as much memory as tf_path).",
)
_SCHEDULE = flags.DEFINE_enum(
    "schedule",
    "sequential",
    ["sequential", "interleaved"],
    "sequential: each implementation's steps back to back, as in a training loop "
    "(caches and TLBs warm with its own table); interleaved: one step of each in "
    "turn, so load bursts from elsewhere hit all alike (every step starts cold).",
)
_ONLY = flags.DEFINE_list(
    "only", [], "Run only these implementations (e.g. tf_path_xla,fused); empty: all."
)

_PNG = flags.DEFINE_string(
    "png", "", "PNG of the ratio rows (matplotlib); empty: bench_update[_quick].png in --out_dir."
)
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 10, "Steps per call of fused_loop.")
_PROBE_REPEATS = flags.DEFINE_integer("probe_repeats", 10, "Timed passes of the random-row probe.")

LEARNING_RATE = 0.01
# Issue 11: the fused lazy update at >= 65% of the copy probe's bandwidth.
LAZY_PROBE_TARGET = 0.65
# Issue 19: the fused lazy update at >= 85% of the random-row probe's speed.
RANDOM_ROW_TARGET = 0.85
_PROBE_SOURCE = pathlib.Path(__file__).resolve().parent / "random_row_probe.cc"
_PROBE_PREFETCH = (0, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: int
    dim: int
    ids: int


FULL_CASES = (Case("1M x 128", 1_000_000, 128, 65_536), Case("100k x 64", 100_000, 64, 8_192))
QUICK_CASES = (Case("20k x 32", 20_000, 32, 2_048), Case("5k x 16", 5_000, 16, 512))


@dataclasses.dataclass
class Problem:
    case: Case
    lazy: bool
    params: AdamParameters
    table: np.ndarray
    ids: np.ndarray
    grads: np.ndarray

    @property
    def distinct(self) -> int:
        return int(np.unique(self.ids).size)

    @property
    def mode(self) -> str:
        return "lazy" if self.lazy else "non-lazy"


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


def _in_function(fn: Callable[[], Any], jit_compile: bool = False) -> Callable[[], None]:
    """`fn` traced once with `tf.function`; its result (an op in graphs) dropped."""

    def body() -> None:
        fn()

    return tf.function(body, jit_compile=jit_compile)


def _variables(p: Problem) -> tuple[tf.Variable, tf.Variable, tf.Variable]:
    zeros = tf.zeros_like(p.table)
    return tf.Variable(p.table), tf.Variable(zeros), tf.Variable(zeros)


def _fused(p: Problem) -> Callable[[], Any]:
    if _library.load_library() is None:
        raise Skip(f"kernel library not loaded: {_library.load_error()}")
    var, m, v = _variables(p)
    ids, grads = tf.constant(p.ids), tf.constant(p.grads)
    return _in_function(lambda: fused_apply_adam(var, m, v, ids, grads, p.params))


def _fused_loop(p: Problem) -> Callable[[], Any]:
    if not p.lazy:
        raise Skip("lazy only (the random-row probe's peer)")
    if _library.load_library() is None:
        raise Skip(f"kernel library not loaded: {_library.load_error()}")
    var, m, v = _variables(p)
    ids, grads = tf.constant(p.ids), tf.constant(p.grads)

    @tf.function
    def steps() -> None:
        for _ in tf.range(_LOOP_STEPS.value):
            fused_apply_adam(var, m, v, ids, grads, p.params)

    return steps


def _tf_path(p: Problem, jit_compile: bool) -> Callable[[], Any]:
    try:
        from tpu_embed_adam.ops.tf_path import tf_apply_adam
    except ImportError as e:
        raise Skip(f"tpu_embed_adam.ops.tf_path: {e}") from e
    if jit_compile and 0 < _XLA_MAX_ELEMENTS.value < p.table.size:
        raise Skip(f"table over --xla_max_elements={_XLA_MAX_ELEMENTS.value} (memory)")
    var, m, v = _variables(p)
    ids, grads = tf.constant(p.ids), tf.constant(p.grads)
    return _in_function(
        lambda: tf_apply_adam(var, m, v, ids, grads, p.params), jit_compile=jit_compile
    )


def _numpy_reference(p: Problem) -> Callable[[], Any]:
    m = np.zeros_like(p.table)
    return lambda: reference.adam_update(p.table, m, m, p.ids, p.grads, p.params)


def _lazy_adam_tfa(p: Problem) -> Callable[[], Any]:
    if not p.lazy:
        raise Skip("lazy only")
    try:
        import tensorflow_addons as tfa
    except ImportError as e:
        raise Skip("tensorflow-addons not installed (pip install -r requirements-bench.txt)") from e
    var = tf.Variable(p.table)
    optimizer = tfa.optimizers.LazyAdam(LEARNING_RATE, epsilon=p.params.epsilon)
    slices = tf.IndexedSlices(
        tf.constant(p.grads), tf.constant(p.ids), tf.constant(p.table.shape, tf.int64)
    )
    return _in_function(lambda: optimizer.apply_gradients([(slices, var)]))


def _sparse_adam_torch(p: Problem) -> Callable[[], Any]:
    if not p.lazy:
        raise Skip("lazy only")
    try:
        import torch
    except ImportError as e:
        raise Skip("torch not installed (pip install -r requirements-bench.txt)") from e
    torch.set_num_threads(os.cpu_count() or 1)
    param = torch.nn.Parameter(torch.from_numpy(p.table.copy()))
    optimizer = torch.optim.SparseAdam([param], lr=LEARNING_RATE, eps=p.params.epsilon)
    grad = torch.sparse_coo_tensor(
        torch.from_numpy(p.ids)[None], torch.from_numpy(p.grads), p.table.shape
    )

    def step() -> None:
        param.grad = grad
        optimizer.step()

    return step


def _dense_adam_tf1(p: Problem) -> Callable[[], Any]:
    if p.lazy:
        raise Skip("non-lazy only")
    var = tf.Variable(p.table)
    optimizer = tf.compat.v1.train.AdamOptimizer(LEARNING_RATE, epsilon=p.params.epsilon)
    dense = tf.math.unsorted_segment_sum(p.grads, p.ids, p.case.rows)
    # Slots are created eagerly here, not inside the traced function.
    optimizer.apply_gradients([(dense, var)])
    return _in_function(lambda: optimizer.apply_gradients([(dense, var)]))


IMPLEMENTATIONS: dict[str, Callable[[Problem], Callable[[], Any]]] = {
    "fused": _fused,
    "fused_loop": _fused_loop,
    "tf_path": lambda p: _tf_path(p, jit_compile=False),
    "tf_path_xla": lambda p: _tf_path(p, jit_compile=True),
    "numpy_reference": _numpy_reference,
    "lazy_adam_tfa": _lazy_adam_tfa,
    "sparse_adam_torch": _sparse_adam_torch,
    "dense_adam_tf1": _dense_adam_tf1,
}


def _probe_library(out_dir: pathlib.Path) -> ctypes.CDLL:
    """random_row_probe.cc, compiled into `out_dir` unless up to date there.

    Raises:
      Skip: no g++, or the build failed.
    """
    library = out_dir / "random_row_probe.so"
    if not library.exists() or library.stat().st_mtime < _PROBE_SOURCE.stat().st_mtime:
        command = ["g++", "-O3", "-mavx", "-shared", "-fPIC", "-pthread", str(_PROBE_SOURCE),
                   "-o", str(library)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise Skip("g++ not found: the random-row probe is C++") from e
        except subprocess.CalledProcessError as e:
            raise Skip(f"building the random-row probe failed: {e.stderr[-500:]}") from e
    probe = ctypes.CDLL(str(library))
    probe.probe_create.restype = ctypes.c_void_p
    probe.probe_create.argtypes = [ctypes.c_int64, ctypes.c_int64]
    probe.probe_destroy.argtypes = [ctypes.c_void_p]
    probe.probe_run.restype = ctypes.c_double
    probe.probe_run.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    return probe


def random_row_probe(p: Problem, out_dir: pathlib.Path) -> dict[str, Any]:
    """The random-row probe on `p`'s ids and gradients; its fastest time and all of them.

    Raises:
      Skip: the probe cannot be built or its tables allocated.
    """
    probe = _probe_library(out_dir)
    # The kernel's distinct rows, in the order they first occur.
    _, first = np.unique(p.ids, return_index=True)
    rows = np.ascontiguousarray(p.ids[np.sort(first)], np.int64)
    grads = np.ascontiguousarray(p.grads, np.float32)
    handle = probe.probe_create(p.case.rows, p.case.dim)
    if not handle:
        raise Skip(f"no memory for the probe's three {p.case.rows} x {p.case.dim} tables")
    try:
        threads = os.cpu_count() or 1
        seconds = {
            ahead: probe.probe_run(
                handle, rows.ctypes.data, rows.size, grads.ctypes.data, grads.shape[0],
                threads, ahead, _PROBE_REPEATS.value,
            )
            for ahead in _PROBE_PREFETCH
        }
    finally:
        probe.probe_destroy(handle)
    best = min(seconds, key=seconds.__getitem__)
    return {
        "seconds": seconds[best],
        "prefetch": best,
        "threads": threads,
        "ms_by_prefetch": {str(k): 1e3 * v for k, v in seconds.items()},
    }


def _median_seconds(step: Callable[[], Any], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _problem(case: Case, lazy: bool, rng: np.random.Generator) -> Problem:
    ids = ((rng.zipf(1.2, case.ids) - 1) % case.rows).astype(np.int64)
    return Problem(
        case=case,
        lazy=lazy,
        params=AdamParameters(LEARNING_RATE, lazy_adam=lazy),
        table=rng.standard_normal((case.rows, case.dim), dtype=np.float32),
        ids=ids,
        grads=rng.standard_normal((case.ids, case.dim), dtype=np.float32),
    )


def _interleaved_medians(
    steps: dict[str, Callable[[], Any]], count: int, warmup: int
) -> dict[str, float]:
    """Median seconds per step of each function, timed round-robin.

    One step of each in turn, the order rotating every round, so that a burst
    of load from elsewhere on the machine hits every implementation alike
    instead of whichever happened to be running.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(
    cases: tuple[Case, ...], steps: int, warmup: int, reference_steps: int, out_dir: pathlib.Path
) -> dict[str, Any]:
    """Runs every implementation on every case and mode; returns the results."""
    before = conditions.describe(probe=False)
    probe = conditions.copy_bandwidth()
    logging.info("copy bandwidth probe: %.1f GB/s", probe)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(_SEED.value)
    for case in cases:
        for lazy in (True, False):
            p = _problem(case, lazy, rng)
            useful_bytes = (case.ids + 6 * p.distinct) * case.dim * 4
            stream_bytes = (6 * case.rows + case.ids) * case.dim * 4
            skipped: dict[str, str] = {}
            made: dict[str, Callable[[], Any]] = {}
            for name, make in IMPLEMENTATIONS.items():
                if _ONLY.value and name not in _ONLY.value:
                    skipped[name] = "not in --only"
                    continue
                try:
                    made[name] = make(p)
                except Skip as e:
                    skipped[name] = str(e)
            # The reference is slow and copies the table: timed on its own.
            reference = made.pop("numpy_reference", None)
            if _SCHEDULE.value == "interleaved":
                seconds = _interleaved_medians(made, steps, warmup)
            else:
                seconds = {name: _median_seconds(f, steps, warmup) for name, f in made.items()}
            counts = dict.fromkeys(made, steps)
            if "fused_loop" in seconds:
                seconds["fused_loop"] /= _LOOP_STEPS.value
                counts["fused_loop"] = steps * _LOOP_STEPS.value
            if reference is not None:
                seconds["numpy_reference"] = _median_seconds(reference, reference_steps, 1)
                counts["numpy_reference"] = reference_steps
            # Frees every implementation's copy of the table and slots.
            del made, reference
            gc.collect()
            probe_extra: dict[str, Any] = {}
            if lazy:
                try:
                    probed = random_row_probe(p, out_dir)
                    seconds["random_row_probe"] = probed.pop("seconds")
                    counts["random_row_probe"] = _PROBE_REPEATS.value
                    probe_extra = probed
                except Skip as e:
                    skipped["random_row_probe"] = str(e)
            else:
                skipped["random_row_probe"] = "lazy only"
            fused_ms = 1e3 * seconds["fused"] if "fused" in seconds else None
            for name in (*IMPLEMENTATIONS, "random_row_probe"):
                row: dict[str, Any] = {"case": case.name, "mode": p.mode, "impl": name}
                if name in skipped:
                    row["skipped"] = skipped[name]
                    rows.append(row)
                    continue
                ms = 1e3 * seconds[name]
                row.update(
                    ms=ms,
                    steps=counts[name],
                    distinct=p.distinct,
                    gb_per_s=useful_bytes / seconds[name] / 1e9,
                    stream_bytes=None if lazy else stream_bytes,
                    x_fused=ms / fused_ms if fused_ms else None,
                )
                if name == "random_row_probe":
                    row.update(probe_extra)
                    # The kernel as a fraction of the probe: per call, and in a loop.
                    for impl in ("fused", "fused_loop"):
                        if impl in seconds:
                            row[f"{impl}_of_probe"] = seconds[name] / seconds[impl]
                rows.append(row)
                logging.info("%s %s %s: %.2f ms", case.name, p.mode, name, ms)
    probe_after = conditions.copy_bandwidth()
    logging.info("copy bandwidth probe after the cases: %.1f GB/s", probe_after)
    best = max(probe, probe_after)
    for row in rows:
        if "ms" in row:
            row["pct_probe"] = 100 * row["gb_per_s"] / best
            stream_bytes = row.pop("stream_bytes")
            row["stream_floor_ms"] = stream_bytes and 1e3 * stream_bytes / (best * 1e9)
    return {
        "conditions": before,
        "load_after": conditions.load_average(),
        "schedule": _SCHEDULE.value,
        "probe_gb_per_s": best,
        "probe_runs_gb_per_s": [probe, probe_after],
        "cpus": os.cpu_count(),
        "results": rows,
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"conditions: {conditions.format_conditions(results['conditions'])}; load after "
        f"{results['load_after']:.2f}",
        f"copy bandwidth probe: {results['probe_gb_per_s']:.1f} GB/s on {results['cpus']} CPUs; "
        f"{results['schedule']} schedule",
        f"{'case':<10} {'mode':<9} {'implementation':<18} {'ms/step':>9} {'steps':>5} "
        f"{'x fused':>8} {'GB/s':>7} {'% probe':>8}",
    ]
    for r in results["results"]:
        head = f"{r['case']:<10} {r['mode']:<9} {r['impl']:<18}"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        ratio = f"{r['x_fused']:.2f}" if r.get("x_fused") else "-"
        lines.append(
            f"{head} {r['ms']:>9.2f} {r['steps']:>5} {ratio:>8} {r['gb_per_s']:>7.1f} "
            f"{r['pct_probe']:>7.0f}%"
        )
    floors = {
        (r["case"], r["mode"]): r["stream_floor_ms"]
        for r in results["results"]
        if r.get("stream_floor_ms")
    }
    for (case, mode), ms in floors.items():
        lines.append(
            f"{case} {mode}: one streaming pass over table, m, v at probe speed {ms:.1f} ms"
        )
    for r in results["results"]:
        if r["impl"] != "random_row_probe" or "ms" not in r:
            continue
        fractions = ", ".join(
            f"{impl} {100 * r[f'{impl}_of_probe']:.0f}%"
            for impl in ("fused", "fused_loop")
            if f"{impl}_of_probe" in r
        )
        lines.append(
            f"{r['case']} lazy: random-row probe {r['ms']:.2f} ms ({r['threads']} threads, "
            f"prefetch {r['prefetch']}; {r['pct_probe']:.0f}% of the copy probe); kernel as a "
            f"fraction of it: {fractions} (target {100 * RANDOM_ROW_TARGET:.0f}%)"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: pathlib.Path) -> bool:
    """Writes the ratio rows as a PNG: each peer over the fused kernel, fused over the probe.

    Returns False (with a warning) when matplotlib is not installed.
    """
    panels = []
    probe_rows = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results["results"]:
        if "ms" not in r:
            continue
        if r["impl"] == "fused":
            probe_rows.append(r)
        elif r["impl"] != "random_row_probe":
            groups.setdefault(f"{r['case']} {r['mode']}", []).append(r)
    for title, rows in groups.items():
        panels.append(
            ratio_plot.Panel(
                title, [r["impl"] for r in rows], [r["x_fused"] for r in rows],
                "time / fused kernel (log)", line_label="fused", log=True,
            )
        )
    random_rows = [r for r in results["results"] if "fused_of_probe" in r]
    if random_rows:
        panels.append(
            ratio_plot.Panel(
                "fused, lazy: random-row probe time / kernel time",
                [f"{r['case']} {impl}" for r in random_rows for impl in ("fused", "fused_loop")
                 if f"{impl}_of_probe" in r],
                [r[f"{impl}_of_probe"] for r in random_rows for impl in ("fused", "fused_loop")
                 if f"{impl}_of_probe" in r],
                "probe time / kernel time", line=RANDOM_ROW_TARGET, line_label="target",
            )
        )
    lazy = [r for r in probe_rows if r["mode"] == "lazy"]
    if lazy:
        panels.append(
            ratio_plot.Panel(
                "fused, lazy: bandwidth / copy probe", [r["case"] for r in lazy],
                [r["pct_probe"] / 100 for r in lazy], "effective GB/s / probe GB/s",
                line=LAZY_PROBE_TARGET, line_label="target",
            )
        )
    try:
        ratio_plot.write_png(
            panels, str(path),
            f"sparse Adam step, {results['schedule']} schedule, {results['cpus']} CPUs, "
            f"probe {results['probe_gb_per_s']:.1f} GB/s",
        )
    except ImportError:
        logging.warning("matplotlib not installed (pip install -r requirements-bench.txt): no PNG")
        return False
    return True


def main(argv: list[str]) -> None:
    del argv
    cases = QUICK_CASES if _QUICK.value else FULL_CASES
    steps = 3 if _QUICK.value else _STEPS.value
    reference_steps = 1 if _QUICK.value else _REFERENCE_STEPS.value
    out_dir = pathlib.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(cases, steps, 1 if _QUICK.value else _WARMUP.value, reference_steps, out_dir)
    results["quick"] = _QUICK.value
    table = format_table(results)
    print(table)
    stem = "bench_update_quick" if _QUICK.value else "bench_update"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_dir / stem}.json")
    png = pathlib.Path(_PNG.value) if _PNG.value else out_dir / f"{stem}.png"
    if plot(results, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    app.run(main)
