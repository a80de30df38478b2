r"""Wall time of one training step of a big table: TF's TPU embedding ops vs `apply_adam`.

Engine path: TF's own v1 `TPUEmbedding` graph (1 host, 1 core, one table, one
feature with one id per sample) on CPU through the engine. One step is two
`Session.run`s, as on a TPU host: the enqueue (ids in), then Recv ->
loss -> gradients -> Send (the lookup, the backward pass into the hidden
accumulator and one sparse Adam update per shard). `recv_alone` and
`send_alone` split the second run in two (activations fetched, then fed
back), to show where its time goes.

Direct path: the same lookup (`tf.gather`), the same gradient, and the update
by `tpu_embed_adam.apply_adam` (`--implementation`, default the fused kernel)
on `tf.Variable`s, in one `Session.run`.

Both report the median over `--iters` timed steps after `--warmup` steps, for
each `--zipf` exponent (0 draws ids uniformly; the default runs uniform ids,
then zipf 1.2), and a last table of the ratio engine step / `apply_adam` step
per distribution (measured in the same run: compare ratios, not milliseconds,
on a shared machine).

  python benchmarks/bench_engine_step.py --rows=1000000 --dim=64 --ids=16384 --png=step.png

`--png` draws the ratio rows (matplotlib, `requirements-bench.txt`).
"""

from __future__ import annotations

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
from tensorflow.python.tpu import tpu_embedding  # noqa: E402

from tpu_embed_adam import apply_adam  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Table rows.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dimension.")
_IDS = flags.DEFINE_integer("ids", 16_384, "Ids per step (one per sample).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_ZIPF = flags.DEFINE_multi_float(
    "zipf", [0.0, 1.2],
    "Power-law exponents of the ids, one run each; 0 draws them uniformly.")
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation", "fused", ["auto", "fused", "tf"], "`apply_adam` implementation (direct path)."
)
_PATHS = flags.DEFINE_multi_enum(
    "path", ["engine", "direct"], ["engine", "direct"], "Paths to time."
)

_PNG = flags.DEFINE_string(
    "png", "", "Write the ratio rows (engine step / apply_adam step) as a PNG to this file."
)

_LR = 0.01
# Issue 11: an engine step costs at most 1.25 `apply_adam` steps.
_ENGINE_TARGET = 1.25


def _ids(rng: np.random.Generator, zipf: float) -> np.ndarray:
    if zipf > 0:
        return ((rng.zipf(zipf, _IDS.value) - 1) % _ROWS.value).astype(np.int64)
    return rng.integers(0, _ROWS.value, _IDS.value).astype(np.int64)


def _time(step: Callable[[], object]) -> float:
    """Median seconds of one call of `step`."""
    for _ in range(_WARMUP.value):
        step()
    times = []
    for _ in range(_ITERS.value):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _initializer() -> Callable[..., tf.Tensor]:
    return tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=0)


def bench_engine(rng: np.random.Generator, zipf: float) -> dict[str, float]:
    """Times enqueue, Recv..Send, and the whole step through TF's TPU embedding ops."""
    graph = engine_graph.EngineGraph(_ROWS.value, _DIM.value, _IDS.value, _LR)
    try:
        load_s = graph.load()
        batches = iter([_ids(rng, zipf) for _ in range(_WARMUP.value + 2 * _ITERS.value)])
        for _ in range(_WARMUP.value):
            graph.step(next(batches))
        enqueue_s, recv_send_s = zip(
            *(graph.step(next(batches)) for _ in range(_ITERS.value)), strict=True)
        totals = [a + b for a, b in zip(enqueue_s, recv_send_s, strict=True)]
        recv_s, send_s = zip(
            *(graph.split_step(next(batches)) for _ in range(_ITERS.value)), strict=True)
        retrieve_s = graph.retrieve()
    finally:
        graph.close()
    return {
        "step": statistics.median(totals),
        "enqueue": statistics.median(enqueue_s),
        "recv_send": statistics.median(recv_send_s),
        "recv_alone": statistics.median(recv_s),
        "send_alone": statistics.median(send_s),
        "load": load_s,
        "retrieve": retrieve_s,
    }


def bench_direct(rng: np.random.Generator, zipf: float) -> dict[str, float]:
    """Times gather -> loss -> gradient -> `apply_adam` on variables, one Session.run."""
    params = tpu_embedding.AdamParameters(_LR)
    graph = tf.Graph()
    with graph.as_default():
        init = _initializer()
        w = tf.compat.v1.get_variable("w", (_ROWS.value, _DIM.value), initializer=init)
        m = tf.compat.v1.get_variable("m", (_ROWS.value, _DIM.value),
                                      initializer=tf.compat.v1.zeros_initializer())
        v = tf.compat.v1.get_variable("v", (_ROWS.value, _DIM.value),
                                      initializer=tf.compat.v1.zeros_initializer())
        ids = tf.compat.v1.placeholder(tf.int64, [_IDS.value])
        acts = tf.gather(w, ids)
        loss = tf.reduce_sum(tf.square(acts))
        (grad,) = tf.compat.v1.gradients(loss, [acts])
        update = apply_adam(w, m, v, ids, grad, params, implementation=_IMPLEMENTATION.value)
        initializer = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(initializer)
        batches = iter([_ids(rng, zipf) for _ in range(_WARMUP.value + _ITERS.value)])
        return {"step": _time(lambda: sess.run(update, {ids: next(batches)}))}


def _label(zipf: float) -> str:
    return f"zipf {zipf}" if zipf > 0 else "uniform"


def main(argv: list[str]) -> None:
    del argv
    steps: dict[tuple[str, float], float] = {}
    for zipf in _ZIPF.value:
        logging.info("table %d x %d, %d ids per step (%s), median of %d steps",
                     _ROWS.value, _DIM.value, _IDS.value, _label(zipf), _ITERS.value)
        for path in _PATHS.value:
            rng = np.random.default_rng(0)
            times = bench_engine(rng, zipf) if path == "engine" else bench_direct(rng, zipf)
            steps[path, zipf] = times["step"]
            logging.info("%-6s %s", path,
                         "  ".join(f"{k} {1e3 * s:.1f} ms" for k, s in times.items()))
    if set(_PATHS.value) != {"engine", "direct"}:
        return
    logging.info("%-12s %12s %16s %8s", "ids", "engine step", "apply_adam step", "ratio")
    ratios = []
    for zipf in _ZIPF.value:
        engine, direct = steps["engine", zipf], steps["direct", zipf]
        ratios.append(engine / direct)
        logging.info("%-12s %9.2f ms %13.2f ms %7.2fx", _label(zipf), 1e3 * engine,
                     1e3 * direct, engine / direct)
    if _PNG.value:
        panel = ratio_plot.Panel(
            f"{_ROWS.value:,} x {_DIM.value}, {_IDS.value:,} ids",
            [_label(z) for z in _ZIPF.value], ratios, "engine step / apply_adam step",
            line=_ENGINE_TARGET, line_label="target",
        )
        ratio_plot.write_png([panel], _PNG.value,
                             f"TPU embedding step on CPU, median of {_ITERS.value} steps")
        logging.info("wrote %s", _PNG.value)


if __name__ == "__main__":
    app.run(main)
