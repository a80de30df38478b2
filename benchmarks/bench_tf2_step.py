r"""A TF2 `TPUEmbedding` training step on CPU against the same update by hand, and what runs today.

For each table size in `--rows` (same `--dim`, `--ids` ids per step), the
median wall time of one training step in a `tf.function` (lookup, a loss of
the activations, their gradient, the update), after `--warmup` steps, for
each path in `--path`:

* `tf2`: `tpu_embed_adam.TPUEmbedding`, TF's docstring step: `enqueue`,
  `dequeue` under a tape, `apply_gradients`;
* `gather`: the same update by hand, `tf.gather` of the table, the tape's
  `IndexedSlices` gradient, `apply_adam` (the fused kernel): the baseline;
* `keras`: a `tf.keras.layers.Embedding` and `tf.keras.optimizers.Adam`,
  what a TF2 user runs on CPU today (Keras Adam, not TPU Adam: its sparse
  update decays every row's first moment, so its cost follows the table);
* `tfrs`: TF Recommenders' `TPUEmbedding` layer on CPU (TF's serving
  lookup) with Keras Adam, if `tensorflow_recommenders` is installed.

Each time is divided by `gather`'s on the same table, in the same run (the
target: `tf2` within 1.3x), and by the path's own time on the smallest
table (a lazy step's cost follows the ids, not the table).

  python benchmarks/bench_tf2_step.py                    # 1e5, 1e6, 1e7 rows x 32
  python benchmarks/bench_tf2_step.py --quick --png=/tmp/tf2_step.png
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging as py_logging
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import ratio_plot  # noqa: E402  (benchmarks/, beside this script)
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tpu_embed_adam  # noqa: E402

_PATH_NAMES = ["tf2", "gather", "keras", "tfrs"]
_ROWS = flags.DEFINE_list("rows", ["100000", "1000000", "10000000"], "Table sizes (rows).")
_DIM = flags.DEFINE_integer("dim", 32, "Embedding dimension (1e7 x 32 x 4 B x 3 = 3.8 GB).")
_IDS = flags.DEFINE_integer("ids", 16_384, "Ids per step.")
_ZIPF = flags.DEFINE_float("zipf", 0.0, "Power-law exponent of the ids; 0 draws them uniformly.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per table and path.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, huge pages).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Rounds of --steps per path and table (tf2 and gather alternate each round)."
)
_PATHS = flags.DEFINE_multi_enum("path", _PATH_NAMES, _PATH_NAMES, "Paths to time.")
_QUICK = flags.DEFINE_bool("quick", False, "Tables of 1e4 and 1e5 rows, 3 steps: a smoke run.")
_JSON = flags.DEFINE_string("json", "", "Write the results to this JSON file.")
_PNG = flags.DEFINE_string("png", "", "Write the ratio rows as a PNG to this file.")

_LR = 0.01
E = tf.tpu.experimental.embedding


@dataclasses.dataclass
class Row:
    """One path on one table size."""

    path: str
    rows: int
    ms: float
    x_gather: float = 1.0
    x_smallest: float = 1.0


def _batches(rows: int, count: int) -> list[tf.Tensor]:
    rng = np.random.default_rng(0)
    if _ZIPF.value > 0:
        draw = lambda: (rng.zipf(_ZIPF.value, _IDS.value) - 1) % rows  # noqa: E731
    else:
        draw = lambda: rng.integers(0, rows, _IDS.value)  # noqa: E731
    return [tf.constant(draw().astype(np.int64)) for _ in range(count)]


def _initializer() -> tf.keras.initializers.Initializer:
    return tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=0)


def _loss(activations: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(activations * activations)


def tf2_step(rows: int) -> Callable[[tf.Tensor], None]:
    """TF's docstring step on `tpu_embed_adam.TPUEmbedding`."""
    table = E.TableConfig(rows, _DIM.value, name="table", initializer=_initializer())
    embedding = tpu_embed_adam.TPUEmbedding(
        {"ids": E.FeatureConfig(table, name="ids")}, E.Adam(_LR)
    )

    @tf.function
    def step(ids: tf.Tensor) -> None:
        embedding.enqueue({"ids": ids}, training=True)
        with tf.GradientTape() as tape:
            activations = embedding.dequeue()
            tape.watch(activations)
            loss = _loss(activations["ids"])
        embedding.apply_gradients(tape.gradient(loss, activations))

    return step


def gather_step(rows: int) -> Callable[[tf.Tensor], None]:
    """`tf.gather` and `apply_adam` on three variables: the same update by hand."""
    table = tf.Variable(_initializer()([rows, _DIM.value]))
    m, v = (tf.Variable(tf.zeros([rows, _DIM.value])) for _ in range(2))
    params = tpu_embed_adam.AdamParameters(_LR, epsilon=1e-7)

    @tf.function
    def step(ids: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = _loss(tf.gather(table, ids))
        tpu_embed_adam.apply_adam(table, m, v, None, tape.gradient(loss, table), params)

    return step


def _keras_step(layer: tf.keras.layers.Layer, features: Callable) -> Callable[[tf.Tensor], None]:
    optimizer = tf.keras.optimizers.Adam(_LR)

    @tf.function
    def step(ids: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            loss = _loss(features(layer, ids))
        variables = layer.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    return step


def keras_step(rows: int) -> Callable[[tf.Tensor], None]:
    """A Keras `Embedding` layer and Keras Adam."""
    layer = tf.keras.layers.Embedding(rows, _DIM.value, embeddings_initializer=_initializer())
    return _keras_step(layer, lambda layer, ids: layer(ids))


def tfrs_step(rows: int) -> Callable[[tf.Tensor], None]:
    """TF Recommenders' `TPUEmbedding` layer on CPU (TF's serving lookup) and Keras Adam."""
    import tensorflow_recommenders as tfrs

    table = E.TableConfig(rows, _DIM.value, name="table", initializer=_initializer())
    layer = tfrs.layers.embedding.TPUEmbedding(
        {"ids": E.FeatureConfig(table, name="ids")}, E.Adam(_LR)
    )
    return _keras_step(layer, lambda layer, ids: layer({"ids": ids})["ids"])


_STEPS_OF = {"tf2": tf2_step, "gather": gather_step, "keras": keras_step, "tfrs": tfrs_step}


def _time(step: Callable[[tf.Tensor], None], batches: list[tf.Tensor]) -> list[float]:
    for ids in batches[: _WARMUP.value]:
        step(ids)
    times = []
    for ids in batches[_WARMUP.value :]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    return times


def _groups(paths: list[str]) -> list[list[str]]:
    """Paths timed together: tf2 and gather interleaved (their ratio is the target), the rest alone.

    Alone, a path's tables are freed before the next is built: at 1e7 rows
    each path holds 3.8 GB, and Keras Adam doubles it.
    """
    together = [p for p in paths if p in ("tf2", "gather")]
    return ([together] if together else []) + [[p] for p in paths if p not in together]


def run(sizes: list[int], paths: list[str]) -> list[Row]:
    """Every path on every table size, `--rounds` rounds per group; fills the ratios."""
    results = []
    for rows in sizes:
        batches = _batches(rows, _WARMUP.value + _STEPS.value)
        for group in _groups(paths):
            steps = {path: _STEPS_OF[path](rows) for path in group}
            times: dict[str, list[float]] = {path: [] for path in group}
            for _ in range(_ROUNDS.value):
                for path in group:
                    times[path] += _time(steps[path], batches)
            for path in group:
                row = Row(path, rows, 1e3 * statistics.median(times[path]))
                logging.info("%s %d rows: %.2f ms", path, rows, row.ms)
                results.append(row)
            del steps
            gc.collect()  # the variables' cycles through their tf.function: free them now
    for row in results:
        same_size = {r.path: r for r in results if r.rows == row.rows}
        if "gather" in same_size:
            row.x_gather = row.ms / same_size["gather"].ms
        row.x_smallest = row.ms / next(r for r in results if r.path == row.path).ms
    return results


def format_table(results: list[Row]) -> str:
    lines = [
        f"{_IDS.value} ids per step ({f'zipf {_ZIPF.value:g}' if _ZIPF.value else 'uniform'}), "
        f"dim {_DIM.value}, median of {_ROUNDS.value} x {_STEPS.value} steps on "
        f"{os.cpu_count()} CPUs",
        f"{'path':<7} {'rows':>11} {'ms/step':>9} {'x gather':>9} {'x smallest':>10}",
    ]
    for r in results:
        lines.append(
            f"{r.path:<7} {r.rows:>11,} {r.ms:>9.2f} {r.x_gather:>9.2f} {r.x_smallest:>10.2f}"
        )
    return "\n".join(lines)


def plot(results: list[Row], path: str) -> None:
    panels = []
    for rows in dict.fromkeys(r.rows for r in results):
        of_size = [r for r in results if r.rows == rows]
        panels.append(
            ratio_plot.Panel(
                f"{rows:.0e} rows",
                [r.path for r in of_size],
                [r.x_gather for r in of_size],
                "time / gather + apply_adam (log)",
                line=1.3,
                line_label="tf2 target 1.3x",
                log=True,
            )
        )
    ratio_plot.write_png(
        panels, path, f"TF2 training step on CPU: {_IDS.value} ids, dim {_DIM.value}"
    )


def main(argv: list[str]) -> None:
    del argv
    py_logging.getLogger("absl").setLevel(py_logging.ERROR)  # TF's per-config name warnings
    if _QUICK.value:
        sizes = [10_000, 100_000]
        flags.FLAGS.steps = 3
        flags.FLAGS.rounds = 1
    else:
        sizes = [int(float(r)) for r in _ROWS.value]
    paths = list(dict.fromkeys(_PATHS.value))
    if "tfrs" in paths and importlib.util.find_spec("tensorflow_recommenders") is None:
        print("tfrs: skipped (pip install --no-deps tensorflow-recommenders==0.7.3)")
        paths.remove("tfrs")
    results = run(sizes, paths)
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
