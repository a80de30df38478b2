r"""End to end: a recommender's examples/s, TPUEstimator on the engine against what CPU users run.

For each table size in `--sizes` (user table rows; the item table has a
tenth) and batch in `--batches`, every variant of `recommender_variants.py`
trains the same model on the same batches for `--warmup` + `--steps` steps,
each in its own subprocess (so that its peak resident memory is its own),
and reports examples/s over the timed steps and the process's peak RSS.
`--rounds` rounds run every variant once each, in an order that rotates per
round, so that load from elsewhere on the machine falls on all alike; the
ratios (engine examples/s / variant's) are taken within each round, and the
report gives their median and range.

`--breakdown` adds `--trace_steps` traced steps after the timed ones of the
engine and the hand-written variant: op time per part of the step (input,
enqueue, Recv, TF's lookup and gradient ops, Send with the update, the
table update of LazyAdam), the executor's span, and the step's wall time
outside it (Session.run and the Estimator's hooks and loop).

The run prints its conditions (cores, memory, huge pages, load average
before and after each run, copy bandwidth); compare ratios, not examples/s,
across runs.

  python benchmarks/bench_estimator.py                         # 1e5, 1e6 rows; batch 256, 8192
  python benchmarks/bench_estimator.py --large --png=estimator.png   # and 1e7 (about 18 GB)
  python benchmarks/bench_estimator.py --quick                 # a smoke run
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import conditions  # noqa: E402  (benchmarks/, beside this script)
import ratio_plot  # noqa: E402
from absl import app, flags, logging  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000"], "User table rows (items: a tenth).")
_LARGE = flags.DEFINE_bool(
    "large", False, "Add 1e7 user rows (the engine variant holds about 18 GB at that size)."
)
_BATCHES = flags.DEFINE_list("batches", ["256", "8192"], "Examples per step.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per variant.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 10,
    "Untimed steps first: graph building, first touches, and the engine's first loop end "
    "(its first copy into the table variables turns them copy-on-write, once).",
)
_LOOP = flags.DEFINE_integer(
    "iterations_per_loop", 10,
    "TPUConfig.iterations_per_loop: the engine's train op copies the rows trained into the "
    "table variables after each loop (a TPU program often runs 100 or more steps per loop).",
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Runs of every variant per cell, alternated.")
_VARIANTS = flags.DEFINE_list(
    "variants",
    [
        "engine",
        "gather_lazyadam",
        "gather_apply_adam",
        "feature_column_lazyadam",
        "tf_tpu_estimator",
        "keras",
        "tf2_embedding",
    ],
    "Variants to run (recommender_variants.VARIANTS); `engine` is the base of every ratio.",
)
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False,
    "Trace steps of engine, gather_lazyadam and gather_apply_adam: time per part of the step.",
)
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 10, "Traced steps with --breakdown.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "10k rows, batch 128, 3 steps (2 traced), one round: a smoke run."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the data and the initializers.")
_JSON = flags.DEFINE_string("json", "", "Write the results to this JSON file.")
_PNG = flags.DEFINE_string("png", "", "Write the ratio rows as a PNG to this file.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Limit on one variant's run, in seconds.")
# Internal: run one variant in this process and print its result.
_WORKER = flags.DEFINE_string("worker", "", "Internal: the variant this subprocess runs.")
_ROWS = flags.DEFINE_integer("rows", 0, "Internal: the worker's user table rows.")
_BATCH = flags.DEFINE_integer("batch", 0, "Internal: the worker's batch.")

_RESULT = "BENCH_ESTIMATOR_RESULT "
# Peak RSS per byte of tables and slots, measured here at 1e6 and 1e7 rows
# (TF keeps the zero constant that initialised each Adam slot, which a
# slot's first sparse write copies; the engine holds its own copy; dense
# Adam makes temporaries of the tables' size), and TF's own resident set.
_PEAK_PER_TABLE_BYTE = {
    "engine": 2.6,
    "gather_lazyadam": 1.4,
    "gather_apply_adam": 1.4,
    "feature_column_lazyadam": 1.4,
    "tf_tpu_estimator": 2.1,
    "keras": 1.6,
    "tf2_embedding": 1.4,
}
_PEAK_BASE_GIB = 1.5
_MEMORY_MARGIN_GIB = 0.25
_MEMORY_WAIT_S = 60.0
_BASE = "engine"
_TRACED = ("engine", "gather_lazyadam", "gather_apply_adam")
# Issue 19: at least this many times the hand-written form at batch 8192, 1e7 rows.
_TARGET_VS_HANDWRITTEN = 2.0
_LABELS = {
    "engine": "TPUEstimator, engine",
    "gather_lazyadam": "(a) tf.gather + LazyAdam",
    "gather_apply_adam": "tf.gather + our apply_adam",
    "feature_column_lazyadam": "(b) embedding_column + LazyAdam",
    "tf_tpu_estimator": "(c) TF's TPUEstimator(use_tpu=False)",
    "keras": "(d) Keras Embedding + Adam",
    "tf2_embedding": "(e) tpu_embed_adam.TPUEmbedding (TF2)",
}


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec,
    # so a child would report its parent's peak when that is higher.
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker() -> None:
    """Runs one variant on one cell and prints its result as one JSON line."""
    import recommender_variants
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    traced = _BREAKDOWN.value and _WORKER.value in _TRACED
    cell = recommender_variants.Cell(
        rows=_ROWS.value,
        batch=_BATCH.value,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        iterations_per_loop=_LOOP.value,
        trace_steps=_TRACE_STEPS.value if traced else 0,
        seed=_SEED.value,
    )
    try:
        result = recommender_variants.run(_WORKER.value, cell)
    except ImportError as e:
        result = {"skipped": f"{type(e).__name__}: {e}"}
    result["peak_rss_mb"] = _peak_rss_mb()
    result["table_mb"] = cell.table_bytes / 2**20
    print(_RESULT + json.dumps(result), flush=True)


def _expected_peak_gib(variant: str, rows: int) -> float:
    """A variant's peak RSS at `rows`, from this box's runs: a multiple of its tables, and TF."""
    table_gib = 3 * (rows + rows // 10) * 64 * 4 / 2**30
    return _PEAK_PER_TABLE_BYTE.get(variant, 3.0) * table_gib + _PEAK_BASE_GIB


def _run_worker(variant: str, rows: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Runs `variant` in a subprocess; its result with the load average around it.

    A variant whose expected peak memory exceeds what is available is not
    started (its result says so): at 1e7 rows some need about all of this
    box's 23 GiB, and running out would take other processes down with it.
    """
    needed = _expected_peak_gib(variant, rows)
    available = conditions.memory_gib()[1]
    # What the last variant's process held comes back over some seconds
    # after it exits (measured: 21 GiB available just after, 23 at rest).
    deadline = time.monotonic() + _MEMORY_WAIT_S
    while needed > available - _MEMORY_MARGIN_GIB and time.monotonic() < deadline:
        time.sleep(1.0)
        available = conditions.memory_gib()[1]
    if needed > available - _MEMORY_MARGIN_GIB:
        return {
            "skipped": f"needs about {needed:.0f} GiB, {available:.0f} GiB available",
            "load_before": conditions.load_average(),
            "load_after": conditions.load_average(),
        }
    command = [
        sys.executable, __file__, f"--worker={variant}", f"--rows={rows}", f"--batch={batch}",
        f"--steps={steps}", f"--warmup={warmup}", f"--seed={_SEED.value}",
        f"--iterations_per_loop={_LOOP.value}",
        f"--trace_steps={_TRACE_STEPS.value}", f"--breakdown={_BREAKDOWN.value}",
    ]
    load_before = conditions.load_average()
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT.value)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{variant} at {rows} rows, batch {batch} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(_RESULT) :])
    result.update(
        load_before=load_before,
        load_after=conditions.load_average(),
        wall_s=time.perf_counter() - start,
    )
    return result


def run_cell(
    rows: int, batch: int, variants: list[str], rounds: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Every variant `rounds` times, alternated; per variant its runs and ratios to the engine."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            result = _run_worker(variant, rows, batch, steps, warmup)
            runs[variant].append(result)
            logging.info(
                "rows %d batch %d round %d %-24s %s", rows, batch, r, variant,
                result.get("skipped")
                or f"{result['examples_per_s']:.0f} examples/s, peak RSS "
                f"{result['peak_rss_mb']:.0f} MB, load {result['load_before']:.2f}"
                f"-{result['load_after']:.2f}",
            )
    cell: dict[str, Any] = {"rows": rows, "batch": batch, "variants": {}}
    base = runs.get(_BASE)
    for variant, results in runs.items():
        done = [r for r in results if "examples_per_s" in r]
        entry: dict[str, Any] = {"runs": results}
        if not done:
            entry["skipped"] = results[0].get("skipped", "no result")
        else:
            eps = [r["examples_per_s"] for r in done]
            entry.update(
                examples_per_s=statistics.median(eps),
                examples_per_s_range=[min(eps), max(eps)],
                peak_rss_mb=max(r["peak_rss_mb"] for r in done),
                table_mb=done[0]["table_mb"],
            )
            if base and variant != _BASE and all("examples_per_s" in b for b in base):
                # The engine's run and this variant's of the same round.
                ratios = [
                    b["examples_per_s"] / r["examples_per_s"]
                    for b, r in zip(base, results, strict=True)
                    if "examples_per_s" in r
                ]
                entry.update(
                    engine_ratio=statistics.median(ratios),
                    engine_ratio_range=[min(ratios), max(ratios)],
                )
        cell["variants"][variant] = entry
    return cell


def format_report(results: dict[str, Any]) -> str:
    """The results as text: conditions, then one table per cell, then the breakdowns."""
    lines = [f"conditions: {conditions.format_conditions(results['conditions'])}"]
    lines.append(
        f"{results['steps']} timed steps after {results['warmup']} warm-up steps, "
        f"{results['rounds']} alternated rounds; ratio = engine examples/s / variant's "
        "(median of the rounds, range)"
    )
    for cell in results["cells"]:
        loads = [
            load
            for entry in cell["variants"].values()
            for run in entry["runs"]
            for load in (run["load_before"], run["load_after"])
        ]
        lines.append("")
        lines.append(
            f"{cell['rows']:,} user rows + {cell['rows'] // 10:,} item rows x 64, "
            f"batch {cell['batch']} (load {min(loads):.2f}-{max(loads):.2f})"
        )
        lines.append(
            f"  {'variant':<40} {'examples/s':>11} {'peak RSS MB':>12} {'engine x':>8}  range"
        )
        for variant, entry in cell["variants"].items():
            label = _LABELS.get(variant, variant)
            if "skipped" in entry:
                lines.append(f"  {label:<40} skipped: {entry['skipped']}")
                continue
            ratio = ""
            if "engine_ratio" in entry:
                low, high = entry["engine_ratio_range"]
                ratio = f"{entry['engine_ratio']:>8.2f}  {low:.2f}-{high:.2f}"
            lines.append(
                f"  {label:<40} {entry['examples_per_s']:>11.0f} {entry['peak_rss_mb']:>12.0f} "
                f"{ratio}"
            )
        for variant, entry in cell["variants"].items():
            breakdowns = [r["breakdown"] for r in entry["runs"] if r.get("breakdown")]
            if not breakdowns:
                continue
            b = breakdowns[0]
            done = [r for r in entry["runs"] if "step_ms" in r]
            step_ms = statistics.median(r["step_ms"] for r in done)
            run_ms = statistics.median(r["session_run_ms"] for r in done)
            outside_ms = statistics.median(r["outside_session_run_ms"] for r in done)
            lines.append(
                f"  {_LABELS.get(variant, variant)}: step {step_ms:.1f} ms (median); per step "
                f"{run_ms:.1f} ms in Session.run and {outside_ms:.1f} ms outside it (the "
                f"Estimator's loop and hooks); traced: executor span {b['executor_span_ms']:.1f} "
                "ms, op time per part summed over threads:"
            )
            for part, ms in sorted(b["parts_ms"].items(), key=lambda kv: -kv[1]):
                lines.append(f"      {part:<28} {ms:8.2f} ms")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """One panel per cell: engine examples/s over each variant's (log axis)."""
    panels = []
    for cell in results["cells"]:
        rated = [(v, e) for v, e in cell["variants"].items() if "engine_ratio" in e]
        if not rated:
            continue
        panels.append(
            ratio_plot.Panel(
                f"{cell['rows']:,} rows, batch {cell['batch']}",
                [_LABELS.get(v, v) for v, _ in rated],
                [e["engine_ratio"] for _, e in rated],
                "engine examples/s / variant's (log)",
                line=1.0,
                line_label="parity",
                log=True,
            )
        )
    if not panels:
        logging.warning("no ratios to plot")
        return
    c = results["conditions"]
    ratio_plot.write_png(
        panels, path,
        f"Recommender training on CPU, {c['cpus']} CPUs, median of {results['rounds']} rounds",
    )


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        _worker()
        return
    if _QUICK.value:
        sizes, batches, steps, warmup, rounds = [10_000], [128], 3, 2, 1
        flags.FLAGS.trace_steps = 2
    else:
        sizes = [int(float(s)) for s in _SIZES.value] + ([10_000_000] if _LARGE.value else [])
        batches = [int(b) for b in _BATCHES.value]
        steps, warmup, rounds = _STEPS.value, _WARMUP.value, _ROUNDS.value
    variants = list(_VARIANTS.value)
    if _BASE not in variants:
        raise app.UsageError(f"--variants must include {_BASE!r}, the base of every ratio")
    before = conditions.describe()
    logging.info("conditions: %s", conditions.format_conditions(before))
    cells = [
        run_cell(rows, batch, variants, rounds, steps, warmup)
        for rows in sizes
        for batch in batches
    ]
    results = {
        "conditions": before,
        "conditions_after": conditions.describe(),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "quick": _QUICK.value,
        "cells": cells,
    }
    print(format_report(results))
    print(f"conditions after: {conditions.format_conditions(results['conditions_after'])}")
    if _JSON.value:
        pathlib.Path(_JSON.value).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {_JSON.value}")
    if _PNG.value:
        plot(results, _PNG.value)
        print(f"wrote {_PNG.value}")


if __name__ == "__main__":
    app.run(main)
