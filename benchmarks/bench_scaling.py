r"""A lazy step's cost grows with the ids in the batch, not with the table.

For each table size in `--rows` (same `--dim`, same number of ids per step),
the median wall time of one step after `--warmup` steps, and the process's
memory beside the tables, for each path in `--path`:

* `lazy`: `apply_adam` (fused kernel, lazy Adam) on `tf.Variable`s;
* `non_lazy`: the same with `lazy_adam=False`, which steps every row: the
  contrast, whose cost grows with the table;
* `engine`: a training step through TF's TPU embedding ops on the software
  engine (enqueue, then Recv -> loss -> gradients -> Send), as
  `bench_engine_step.py` runs it.

Memory: resident set size (`VmRSS`) after the steps minus the bytes of the
tables (table, m and v; for `engine` TF's three variables plus what the
engine holds, `engine.info()["bytes"]`), and the peak (`VmHWM`, reset before
the timed steps) minus the resident size before them: what a step allocates.
The ratio rows divide each time by the smallest table's time on the same
path, in the same run.

  python benchmarks/bench_scaling.py                     # 1e5, 1e6, 1e7 rows x 32
  python benchmarks/bench_scaling.py --quick --png=/tmp/scaling.png
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import engine_graph  # noqa: E402  (benchmarks/, beside this script)
import numpy as np  # noqa: E402
import ratio_plot  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from tpu_embed_adam import apply_adam, engine  # noqa: E402
from tpu_embed_adam.params import AdamParameters  # noqa: E402

_ROWS = flags.DEFINE_list("rows", ["100000", "1000000", "10000000"], "Table sizes (rows).")
_DIM = flags.DEFINE_integer("dim", 32, "Embedding dimension (1e7 x 32 x 4 B x 3 = 3.8 GB).")
_IDS = flags.DEFINE_integer("ids", 16_384, "Ids per step.")
_ZIPF = flags.DEFINE_float("zipf", 0.0, "Power-law exponent of the ids; 0 draws them uniformly.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per table and path.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, huge pages).")
_PATHS = flags.DEFINE_multi_enum(
    "path", ["lazy", "non_lazy", "engine"], ["lazy", "non_lazy", "engine"], "Paths to time."
)
_QUICK = flags.DEFINE_bool("quick", False, "Tables of 1e4 and 1e5 rows, 3 steps: a smoke run.")
_JSON = flags.DEFINE_string("json", "", "Write the results to this JSON file.")
_PNG = flags.DEFINE_string("png", "", "Write the ratio rows as a PNG to this file.")

_LR = 0.01
_MB = 2**20


@dataclasses.dataclass
class Row:
    """One path on one table size."""

    path: str
    rows: int
    ms: float
    distinct: int
    table_mb: float
    beside_mb: float
    step_peak_mb: float
    x_smallest: float = 1.0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    # Linux: writing 5 resets VmHWM to the current resident size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _ids(rng: np.random.Generator, rows: int) -> np.ndarray:
    if _ZIPF.value > 0:
        return ((rng.zipf(_ZIPF.value, _IDS.value) - 1) % rows).astype(np.int64)
    return rng.integers(0, rows, _IDS.value).astype(np.int64)


def _measure(
    path: str, rows: int, step: Callable[[np.ndarray], object], table_bytes: Callable[[], int]
) -> Row:
    """Times `step` on fresh batches; reads memory around the timed steps."""
    rng = np.random.default_rng(0)
    batches = [_ids(rng, rows) for _ in range(_WARMUP.value + _STEPS.value)]
    for ids in batches[: _WARMUP.value]:
        step(ids)
    before_kb = _status_kb("VmRSS")
    _reset_peak()
    times = []
    for ids in batches[_WARMUP.value :]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    peak_kb, after_kb = _status_kb("VmHWM"), _status_kb("VmRSS")
    tables = table_bytes()
    return Row(
        path=path,
        rows=rows,
        ms=1e3 * statistics.median(times),
        distinct=int(np.median([np.unique(b).size for b in batches])),
        table_mb=tables / _MB,
        beside_mb=(after_kb * 1024 - tables) / _MB,
        step_peak_mb=(peak_kb - before_kb) / 1024,
    )


def bench_direct(rows: int, lazy: bool) -> Row:
    """`apply_adam` (fused kernel) on three variables of `rows` x `--dim`."""
    shape = (rows, _DIM.value)
    w = tf.Variable(tf.random.uniform(shape, -0.05, 0.05, seed=0))
    m, v = tf.Variable(tf.zeros(shape)), tf.Variable(tf.zeros(shape))
    params = AdamParameters(_LR, lazy_adam=lazy)
    grads = tf.constant(np.random.default_rng(1).standard_normal(
        (_IDS.value, _DIM.value), dtype=np.float32))

    @tf.function
    def update(ids: tf.Tensor) -> None:
        apply_adam(w, m, v, ids, grads, params)

    return _measure("lazy" if lazy else "non_lazy", rows, lambda ids: update(tf.constant(ids)),
                    lambda: 3 * 4 * rows * _DIM.value)


def bench_engine(rows: int) -> Row:
    """A training step through TF's TPU embedding ops on a `rows` x `--dim` table."""
    engine.reset()
    graph = engine_graph.EngineGraph(rows, _DIM.value, _IDS.value, _LR)
    try:
        graph.load()
        return _measure("engine", rows, graph.step,
                        lambda: 3 * 4 * rows * _DIM.value + engine.info()["bytes"])
    finally:
        graph.close()
        engine.reset()


def run(sizes: list[int]) -> list[Row]:
    """Every path on every table size; fills each row's ratio to its path's smallest table."""
    results = []
    for path in _PATHS.value:
        rows_of_path = []
        for rows in sizes:
            row = bench_engine(rows) if path == "engine" else bench_direct(rows, path == "lazy")
            gc.collect()  # the variables' cycles through their tf.function: free them now
            rows_of_path.append(row)
            logging.info("%s %d rows: %.2f ms", path, rows, row.ms)
        for row in rows_of_path:
            row.x_smallest = row.ms / rows_of_path[0].ms
        results += rows_of_path
    return results


def format_table(results: list[Row]) -> str:
    lines = [
        f"{_IDS.value} ids per step ({f'zipf {_ZIPF.value:g}' if _ZIPF.value else 'uniform'}), "
        f"dim {_DIM.value}, median of {_STEPS.value} steps on {os.cpu_count()} CPUs",
        f"{'path':<9} {'rows':>11} {'ms/step':>9} {'x smallest':>10} {'distinct':>8} "
        f"{'tables MB':>10} {'beside MB':>10} {'step peak MB':>12}",
    ]
    for r in results:
        lines.append(
            f"{r.path:<9} {r.rows:>11,} {r.ms:>9.2f} {r.x_smallest:>10.2f} {r.distinct:>8} "
            f"{r.table_mb:>10.0f} {r.beside_mb:>10.0f} {r.step_peak_mb:>12.1f}"
        )
    return "\n".join(lines)


def plot(results: list[Row], path: str) -> None:
    panels = []
    for name in dict.fromkeys(r.path for r in results):
        rows = [r for r in results if r.path == name]
        panels.append(ratio_plot.Panel(
            name, [f"{r.rows:.0e} rows" for r in rows], [r.x_smallest for r in rows],
            "time / smallest table's time (log)", line_label="flat", log=True,
        ))
    ratio_plot.write_png(
        panels, path, f"step time vs table size: {_IDS.value} ids, dim {_DIM.value}")


def main(argv: list[str]) -> None:
    del argv
    if _QUICK.value:
        sizes = [10_000, 100_000]
        flags.FLAGS.steps = 3
    else:
        sizes = [int(float(r)) for r in _ROWS.value]
    results = run(sizes)
    print(format_table(results))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
            f.write("\n")
        print(f"wrote {_JSON.value}")
    if _PNG.value:
        plot(results, _PNG.value)
        print(f"wrote {_PNG.value}")


if __name__ == "__main__":
    app.run(main)
