"""One recommender, written each way a CPU user would train it; `bench_estimator.py` times them.

The model: three features, `user` (one id, a table of `rows` rows), `item`
(one id) and `history` (four ids, mean-combined) sharing an item table of
`rows // 10` rows, all 64 wide; the three embeddings, concatenated in the
order feature columns give them (history, item, user), go through Dense
64 -> 32 -> 1 to a logistic loss on a click label. Ids are
power-law (truncated zipf), scattered over the table; every variant gets
the same batches (numpy, generated once from the seed) through tf.data.

Variants (each `run_*` builds, trains `warmup + steps` steps and times the
last `steps`):

* `engine`: `tpu_embed_adam.estimator.TPUEstimator(use_tpu=False)` with an
  `EmbeddingConfigSpec` of TPU embedding columns and TPU Adam: the tables
  train in the software TPU embedding engine.
* `gather_lazyadam`: an Estimator whose tables are variables read by
  `tf.gather` (`embedding_lookup_sparse` for the history), trained by
  TF-Addons `LazyAdam`: the best hand-written CPU form.
* `gather_apply_adam`: the same Estimator, its tables updated by
  `tpu_embed_adam.apply_adam` (the fused kernel, lazy TPU Adam) called
  directly on the gradients of `tf.gather`: what the engine's step costs
  beside the update it shares (issue 19's 1.25x).
* `feature_column_lazyadam`: the same Estimator with TF1 feature columns
  (`embedding_column`, `shared_embedding_columns`) and `LazyAdam`.
* `tf_tpu_estimator`: the engine variant's program with TF's own
  `TPUEstimator(use_tpu=False)`, without this package: TF looks the rows up
  on CPU and the model_fn's Adam trains the tables (dense updates).
* `keras`: a TF2 Keras model (`Embedding` layers, `model.fit`, Keras Adam).
* `tf2_embedding`: `tpu_embed_adam.TPUEmbedding`, TF2's mid-level API on
  CPU, in TF's docstring loop (`enqueue`, `dequeue`, `apply_gradients` in a
  `tf.function` over `tf.range`).

Dense layers train with Adam in every variant. No variant saves a
checkpoint: at 1e7 rows one would write gigabytes, which no step pays.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import tensorflow as tf
from tensorflow.python.client import session as session_lib

DIM = 64
HISTORY = 4
ZIPF = 1.1
EMBEDDING_LR = 0.01
DENSE_LR = 0.001
# Power-law rank r becomes row (r * _SCATTER) % rows, a bijection for any
# rows it does not divide (it is prime): the hot rows land all over the
# table, as in real id spaces, instead of in its first pages.
_SCATTER = 2_654_435_761


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: table size, batch and step counts.

    Attributes:
      rows: rows of the user table; the item table has rows // 10.
      batch: examples per step.
      steps: timed steps.
      warmup: untimed steps before them.
      iterations_per_loop: the TPUEstimator variants' loop: the engine's
        train op copies the rows trained into the table variables after
        every loop, as a TPU retrieves the tables.
      trace_steps: steps after the timed ones run with TF's tracing (for the
        step breakdown); 0 for none.
      seed: seeds the data and the initializers.
    """

    rows: int
    batch: int
    steps: int
    warmup: int
    iterations_per_loop: int = 10
    trace_steps: int = 0
    seed: int = 0

    @property
    def item_rows(self) -> int:
        return max(self.rows // 10, 1)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.trace_steps

    @property
    def table_bytes(self) -> int:
        """Bytes of both tables with their two Adam slots."""
        return 3 * (self.rows + self.item_rows) * DIM * 4


def _power_law_ids(rng: np.random.Generator, rows: int, shape: tuple[int, ...]) -> np.ndarray:
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -ZIPF
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    del weights
    ranks = np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), rows - 1)
    return ((ranks.astype(np.int64) * _SCATTER) % rows).astype(np.int64)


def make_data(cell: Cell) -> dict[str, np.ndarray]:
    """Every step's batch: `user`, `item` [steps, batch], `history` [steps, batch, 4], `label`.

    Batched here, once, so that the input pipeline only slices out a step's
    batch: its cost is small and the same for every variant.
    """
    rng = np.random.default_rng(cell.seed)
    steps, batch = cell.total_steps, cell.batch
    return {
        "user": _power_law_ids(rng, cell.rows, (steps, batch)),
        "item": _power_law_ids(rng, cell.item_rows, (steps, batch)),
        "history": _power_law_ids(rng, cell.item_rows, (steps, batch, HISTORY)),
        "label": (rng.random((steps, batch, 1)) < 0.3).astype(np.float32),
    }


def _sparse_rows(ids: tf.Tensor) -> tf.sparse.SparseTensor:
    """[batch, k] ids as the SparseTensor a categorical column reads (every position set)."""
    shape = tf.shape(ids, out_type=tf.int64)
    rows = tf.repeat(tf.range(shape[0]), shape[1])
    cols = tf.tile(tf.range(shape[1]), [shape[0]])
    return tf.sparse.SparseTensor(
        tf.stack([rows, cols], axis=1), tf.reshape(ids, [-1]), shape
    )


def _dataset(data: dict[str, np.ndarray]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(data)


def estimator_input_fn(data: dict[str, np.ndarray]) -> Callable[[Any], Any]:
    """The Estimator variants' input_fn: SparseTensor features, as TPU columns take them."""

    def to_features(example: dict[str, tf.Tensor]) -> tuple[dict[str, Any], tf.Tensor]:
        features = {
            "user": _sparse_rows(example["user"][:, None]),
            "item": _sparse_rows(example["item"][:, None]),
            "history": _sparse_rows(example["history"]),
        }
        return features, example["label"]

    def input_fn(params: Any) -> tf.data.Dataset:
        del params  # every variant's batch is the cell's
        return _dataset(data).map(to_features).prefetch(2)

    return input_fn


def _initializer(seed: int) -> Any:
    return tf.compat.v1.random_uniform_initializer(-0.05, 0.05, seed=seed)


def _tower(x: tf.Tensor) -> tf.Tensor:
    """The dense part shared by every variant: logits [batch, 1] of embeddings [batch, 192]."""
    for width in (64, 32):
        x = tf.keras.layers.Dense(width, activation="relu")(x)
    return tf.keras.layers.Dense(1)(x)


def _loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


class StepTimer(tf.compat.v1.train.SessionRunHook):
    """Wall times of steps `warmup + 1 .. warmup + steps`, each from the previous step's end.

    Args:
      warmup: untimed steps first (at least 1: the first timed step starts
        when the last of them ends).
      steps: timed steps.
    """

    def __init__(self, warmup: int, steps: int):
        if warmup < 1:
            raise ValueError(f"warmup is {warmup}; at least 1 step must come before the timed ones")
        self._warmup, self._steps = warmup, steps
        # ends[i]: when step i + 1 ended.
        self.ends: list[float] = []

    def after_run(self, run_context: Any, run_values: Any) -> None:
        del run_context, run_values
        if len(self.ends) < self._warmup + self._steps:
            self.ends.append(time.perf_counter())

    def window(self) -> tuple[float, float]:
        """When the timed steps started and ended (perf_counter seconds)."""
        return self.ends[self._warmup - 1], self.ends[self._warmup + self._steps - 1]

    def result(self, batch: int) -> dict[str, float]:
        """examples/s over the timed steps and their median step time (ms)."""
        timed = self.ends[self._warmup - 1 : self._warmup + self._steps]
        if len(timed) != self._steps + 1:
            raise RuntimeError(f"only {len(self.ends)} steps ran")
        steps = np.diff(timed)
        return {
            "examples_per_s": batch * len(steps) / (timed[-1] - timed[0]),
            "step_ms": 1e3 * float(np.median(steps)),
        }


# Op types and name prefixes of each part of a step, for the breakdown;
# the first rule that matches a node names its part.
_PARTS_BY_TYPE = {
    "IteratorGetNext": "input",
    "EnqueueTPUEmbeddingSparseTensorBatch": "enqueue",
    "EnqueueTPUEmbeddingRaggedTensorBatch": "enqueue",
    "EnqueueTPUEmbeddingArbitraryTensorBatch": "enqueue",
    "RecvTPUEmbeddingActivations": "Recv (lookup)",
    "SendTPUEmbeddingGradients": "Send (gradients, update)",
    "TpuEmbedAdamRetrieveTouched": "loop-end retrieve",
}
_PARTS_BY_PREFIX = (
    ("LazyAdam/", "table update (LazyAdam)"),
    ("apply_adam/", "table update (apply_adam)"),
    ("gradients/", "TF gradient ops"),
    ("Adam/", "dense Adam"),
    ("Adam", "dense Adam"),
    ("tpu_embed_adam_refresh_tables", "loop-end retrieve"),
)


def part_of(name: str, op_type: str) -> str:
    """The part of the step that the node `name` of type `op_type` belongs to."""
    if op_type in _PARTS_BY_TYPE:
        return _PARTS_BY_TYPE[op_type]
    for prefix, part in _PARTS_BY_PREFIX:
        if name.startswith(prefix):
            return part
    if "embedding_lookup" in name or op_type in ("GatherV2", "ResourceGather"):
        return "TF lookup ops"
    return "TF forward ops"


class StepTracer(tf.compat.v1.train.SessionRunHook):
    """Traces the steps after `skip` with TF's step stats; sums op time per part of the step."""

    def __init__(self, skip: int):
        self._skip, self._runs = skip, 0
        self.parts: dict[str, list[float]] = {}
        self.spans: list[float] = []
        self._types: dict[str, str] = {}

    def begin(self) -> None:
        graph = tf.compat.v1.get_default_graph()
        self._types = {op.name: op.type for op in graph.get_operations()}

    def before_run(self, run_context: Any) -> Any:
        del run_context
        if self._runs < self._skip:
            return None
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        return tf.compat.v1.train.SessionRunArgs(fetches=None, options=options)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        del run_context
        self._runs += 1
        if self._runs <= self._skip:
            return
        totals: dict[str, float] = {}
        starts, ends = [], []
        for device in run_values.run_metadata.step_stats.dev_stats:
            for node in device.node_stats:
                start, length = node.all_start_micros, node.all_end_rel_micros
                starts.append(start)
                ends.append(start + length)
                name = node.node_name.split(":")[0]
                part = part_of(name, self._types.get(name, ""))
                totals[part] = totals.get(part, 0.0) + length / 1e3
        if not starts:
            return
        self.spans.append((max(ends) - min(starts)) / 1e3)
        for part, ms in totals.items():
            self.parts.setdefault(part, []).append(ms)

    def result(self) -> dict[str, Any]:
        """Median ms per traced step of each part (op time, summed over threads) and the span."""
        steps = len(self.spans)
        if not steps:
            return {}
        return {
            "traced_steps": steps,
            "executor_span_ms": float(np.median(self.spans)),
            # A part absent from a step took 0 ms there.
            "parts_ms": {
                part: float(np.median(ms + [0.0] * (steps - len(ms))))
                for part, ms in sorted(self.parts.items())
            },
        }


def _estimator_result(
    estimator: Any, cell: Cell, data: dict[str, np.ndarray]
) -> dict[str, Any]:
    timer = StepTimer(cell.warmup, cell.steps)
    hooks: list[Any] = [timer]
    tracer = None
    if cell.trace_steps:
        tracer = StepTracer(cell.warmup + cell.steps)
        hooks.append(tracer)
    # Every Session.run's wall time: what the step's wall time holds besides
    # them is the Estimator's loop and hooks, measured without tracing.
    runs: list[tuple[float, float]] = []
    run = session_lib.BaseSession.run

    def timed_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            runs.append((start, time.perf_counter()))

    with mock.patch.object(session_lib.BaseSession, "run", timed_run):
        estimator.train(estimator_input_fn(data), max_steps=cell.total_steps, hooks=hooks)
    result: dict[str, Any] = timer.result(cell.batch)
    first, last = timer.window()
    in_runs = sum(end - start for start, end in runs if first <= start and end <= last)
    result["session_run_ms"] = 1e3 * in_runs / cell.steps
    result["outside_session_run_ms"] = 1e3 * (last - first - in_runs) / cell.steps
    if tracer is not None:
        result["breakdown"] = tracer.result()
    return result


def _run_config(model_dir: str, seed: int, tpu: bool, iterations_per_loop: int) -> Any:
    # No checkpoints: at 1e7 rows each would write gigabytes.
    common = dict(
        model_dir=model_dir,
        save_checkpoints_steps=None,
        save_checkpoints_secs=None,
        tf_random_seed=seed,
    )
    if tpu:
        return tf.compat.v1.estimator.tpu.RunConfig(
            tpu_config=tf.compat.v1.estimator.tpu.TPUConfig(
                iterations_per_loop=iterations_per_loop
            ),
            **common,
        )
    return tf.compat.v1.estimator.RunConfig(**common)


def _tpu_columns(cell: Cell) -> list[Any]:
    fc = tf.compat.v1.feature_column
    tpu = tf.compat.v1.tpu.experimental
    init = _initializer(cell.seed)
    user = tpu.embedding_column(
        fc.categorical_column_with_identity("user", cell.rows), DIM, combiner="mean",
        initializer=init,
    )
    item, history = tpu.shared_embedding_columns(
        [
            fc.categorical_column_with_identity("item", cell.item_rows),
            fc.categorical_column_with_identity("history", cell.item_rows),
        ],
        DIM,
        combiner="mean",
        initializer=init,
    )
    return [user, item, history]


def _embeddings(user: tf.Tensor, item: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
    """The embeddings as the columns' layers concatenate them: by feature name."""
    return tf.concat([history, item, user], axis=1)


def _tpu_model_fn(columns: list[Any]) -> Callable[..., Any]:
    def model_fn(features: Any, labels: Any, mode: Any, params: Any) -> Any:
        del mode, params
        # TF1 DenseFeatures: it records the variable scope TPU columns need.
        net = tf.compat.v1.keras.layers.DenseFeatures(columns)(features)
        loss = _loss(labels, _tower(net))
        train_op = tf.compat.v1.train.AdamOptimizer(DENSE_LR).minimize(
            loss, tf.compat.v1.train.get_global_step()
        )
        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
            tf.estimator.ModeKeys.TRAIN, loss=loss, train_op=train_op
        )

    return model_fn


def run_engine(cell: Cell, data: dict[str, np.ndarray], model_dir: str) -> dict[str, Any]:
    """TPUEstimator on the software TPU embedding engine."""
    import tpu_embed_adam
    from tpu_embed_adam.estimator import TPUEstimator

    columns = _tpu_columns(cell)
    estimator = TPUEstimator(
        model_fn=_tpu_model_fn(columns),
        config=_run_config(
            model_dir, cell.seed, tpu=True, iterations_per_loop=cell.iterations_per_loop
        ),
        use_tpu=False,
        train_batch_size=cell.batch,
        embedding_config_spec=tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
            feature_columns=columns,
            optimization_parameters=tpu_embed_adam.AdamParameters(EMBEDDING_LR),
        ),
    )
    return _estimator_result(estimator, cell, data)


def run_tf_tpu_estimator(cell: Cell, data: dict[str, np.ndarray], model_dir: str) -> dict[str, Any]:
    """TF's own TPUEstimator(use_tpu=False): CPU lookups, the model_fn's Adam on the tables."""
    columns = _tpu_columns(cell)
    estimator = tf.compat.v1.estimator.tpu.TPUEstimator(
        model_fn=_tpu_model_fn(columns),
        config=_run_config(
            model_dir, cell.seed, tpu=True, iterations_per_loop=cell.iterations_per_loop
        ),
        use_tpu=False,
        train_batch_size=cell.batch,
        embedding_config_spec=tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
            feature_columns=columns,
            optimization_parameters=tf.compat.v1.tpu.experimental.AdamParameters(EMBEDDING_LR),
        ),
    )
    return _estimator_result(estimator, cell, data)


def _lazy_adam_spec(loss: tf.Tensor, tables: list[tf.Variable]) -> Any:
    """Train op: LazyAdam on the tables, Adam on every other trainable variable."""
    import tensorflow_addons as tfa

    table_names = {t.name for t in tables}
    dense = [v for v in tf.compat.v1.trainable_variables() if v.name not in table_names]
    gradients = tf.compat.v1.gradients(loss, tables + dense)
    table_update = tfa.optimizers.LazyAdam(EMBEDDING_LR).apply_gradients(
        zip(gradients[: len(tables)], tables, strict=True)
    )
    dense_update = tf.compat.v1.train.AdamOptimizer(DENSE_LR).apply_gradients(
        zip(gradients[len(tables) :], dense, strict=True), tf.compat.v1.train.get_global_step()
    )
    return tf.estimator.EstimatorSpec(
        tf.estimator.ModeKeys.TRAIN, loss=loss, train_op=tf.group(table_update, dense_update)
    )


def _gather_model_fn(
    cell: Cell, train_op: Callable[[tf.Tensor, list[tf.Variable]], Any]
) -> Callable[..., Any]:
    """The model with tables as variables read by tf.gather; `train_op(loss, tables)` its spec."""

    def model_fn(features: Any, labels: Any, mode: Any) -> Any:
        del mode
        init = _initializer(cell.seed)
        users = tf.compat.v1.get_variable("users", [cell.rows, DIM], initializer=init)
        items = tf.compat.v1.get_variable("items", [cell.item_rows, DIM], initializer=init)
        # One id per sample, in sample order: the SparseTensor's values.
        user = tf.gather(users, features["user"].values)
        item = tf.gather(items, features["item"].values)
        history = tf.nn.embedding_lookup_sparse(items, features["history"], None, combiner="mean")
        logits = _tower(_embeddings(user, item, history))
        return train_op(_loss(labels, logits), [users, items])

    return model_fn


def _run_gather(
    cell: Cell, data: dict[str, np.ndarray], model_dir: str,
    train_op: Callable[[tf.Tensor, list[tf.Variable]], Any],
) -> dict[str, Any]:
    estimator = tf.estimator.Estimator(
        _gather_model_fn(cell, train_op),
        config=_run_config(model_dir, cell.seed, tpu=False, iterations_per_loop=1),
    )
    return _estimator_result(estimator, cell, data)


def run_gather_lazyadam(
    cell: Cell, data: dict[str, np.ndarray], model_dir: str
) -> dict[str, Any]:
    """Estimator; tables as variables read by tf.gather, trained by TF-Addons LazyAdam."""
    return _run_gather(cell, data, model_dir, _lazy_adam_spec)


def _apply_adam_spec(loss: tf.Tensor, tables: list[tf.Variable]) -> Any:
    """Train op: `apply_adam` (fused, lazy) on each table, Adam on every other variable."""
    import tpu_embed_adam

    params = tpu_embed_adam.AdamParameters(EMBEDDING_LR)
    table_names = {t.name for t in tables}
    dense = [v for v in tf.compat.v1.trainable_variables() if v.name not in table_names]
    gradients = tf.compat.v1.gradients(loss, tables + dense)
    table_updates = []
    with tf.name_scope("apply_adam"):
        for table, gradient in zip(tables, gradients[: len(tables)], strict=True):
            m, v = (
                tf.compat.v1.get_variable(
                    f"{table.op.name}/{slot}", table.shape, trainable=False,
                    initializer=tf.zeros_initializer(),
                )
                for slot in ("m", "v")
            )
            table_updates.append(tpu_embed_adam.apply_adam(table, m, v, None, gradient, params))
    dense_update = tf.compat.v1.train.AdamOptimizer(DENSE_LR).apply_gradients(
        zip(gradients[len(tables) :], dense, strict=True), tf.compat.v1.train.get_global_step()
    )
    return tf.estimator.EstimatorSpec(
        tf.estimator.ModeKeys.TRAIN, loss=loss, train_op=tf.group(*table_updates, dense_update)
    )


def run_gather_apply_adam(
    cell: Cell, data: dict[str, np.ndarray], model_dir: str
) -> dict[str, Any]:
    """Estimator; tables as variables read by tf.gather, trained by `apply_adam` directly."""
    return _run_gather(cell, data, model_dir, _apply_adam_spec)


def run_feature_column_lazyadam(
    cell: Cell, data: dict[str, np.ndarray], model_dir: str
) -> dict[str, Any]:
    """Estimator with TF1 embedding columns (input_layer), tables trained by LazyAdam."""
    fc = tf.compat.v1.feature_column

    def model_fn(features: Any, labels: Any, mode: Any) -> Any:
        del mode
        init = _initializer(cell.seed)
        user = fc.embedding_column(
            fc.categorical_column_with_identity("user", cell.rows), DIM, initializer=init
        )
        item, history = fc.shared_embedding_columns(
            [
                fc.categorical_column_with_identity("item", cell.item_rows),
                fc.categorical_column_with_identity("history", cell.item_rows),
            ],
            DIM,
            initializer=init,
        )
        net = fc.input_layer(features, [user, item, history])
        loss = _loss(labels, _tower(net))
        tables = [v for v in tf.compat.v1.trainable_variables() if "embedding_weights" in v.name]
        return _lazy_adam_spec(loss, tables)

    estimator = tf.estimator.Estimator(
        model_fn, config=_run_config(model_dir, cell.seed, tpu=False, iterations_per_loop=1)
    )
    return _estimator_result(estimator, cell, data)


def _keras_dataset(data: dict[str, np.ndarray]) -> tf.data.Dataset:
    def split(example: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        return {k: example[k] for k in ("user", "item", "history")}, example["label"]

    return _dataset(data).map(split).prefetch(2)


class _BatchTimer(tf.keras.callbacks.Callback):
    def __init__(self, timer: StepTimer):
        super().__init__()
        self._timer = timer

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        del batch, logs
        self._timer.after_run(None, None)


def run_keras(cell: Cell, data: dict[str, np.ndarray], model_dir: str) -> dict[str, Any]:
    """TF2 Keras: Embedding layers, model.fit, Keras Adam on every variable."""
    del model_dir
    tf.keras.utils.set_random_seed(cell.seed)
    init = tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=cell.seed)
    inputs = {
        "user": tf.keras.Input((), dtype=tf.int64, name="user"),
        "item": tf.keras.Input((), dtype=tf.int64, name="item"),
        "history": tf.keras.Input((HISTORY,), dtype=tf.int64, name="history"),
    }
    users = tf.keras.layers.Embedding(cell.rows, DIM, embeddings_initializer=init)
    items = tf.keras.layers.Embedding(cell.item_rows, DIM, embeddings_initializer=init)
    history = tf.reduce_mean(items(inputs["history"]), axis=1)
    logits = _tower(_embeddings(users(inputs["user"]), items(inputs["item"]), history))
    model = tf.keras.Model(inputs, logits)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(DENSE_LR),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
    )
    timer = StepTimer(cell.warmup, cell.steps)
    model.fit(
        _keras_dataset(data),
        epochs=1,
        steps_per_epoch=cell.warmup + cell.steps,
        callbacks=[_BatchTimer(timer)],
        verbose=0,
    )
    return timer.result(cell.batch)


def run_tf2_embedding(cell: Cell, data: dict[str, np.ndarray], model_dir: str) -> dict[str, Any]:
    """`tpu_embed_adam.TPUEmbedding` in TF's docstring training loop.

    Raises:
      ImportError: the package has no TF2 TPUEmbedding (the caller skips).
    """
    del model_dir
    from tpu_embed_adam import TPUEmbedding

    tf.keras.utils.set_random_seed(cell.seed)
    emb = tf.tpu.experimental.embedding
    init = tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=cell.seed)
    users = emb.TableConfig(cell.rows, DIM, initializer=init, combiner="mean", name="users")
    items = emb.TableConfig(cell.item_rows, DIM, initializer=init, combiner="mean", name="items")
    feature_config = {
        "user": emb.FeatureConfig(users, name="user"),
        "item": emb.FeatureConfig(items, name="item"),
        "history": emb.FeatureConfig(items, name="history"),
    }
    embedding = TPUEmbedding(feature_config=feature_config, optimizer=emb.Adam(EMBEDDING_LR))
    inputs = {name: tf.keras.Input((DIM,), name=name) for name in ("user", "item", "history")}
    model = tf.keras.Model(
        inputs, _tower(_embeddings(inputs["user"], inputs["item"], inputs["history"]))
    )
    optimizer = tf.keras.optimizers.Adam(DENSE_LR)

    def to_features(example: dict[str, tf.Tensor]) -> tuple[dict[str, Any], tf.Tensor]:
        features = {
            "user": example["user"],
            "item": example["item"],
            "history": _sparse_rows(example["history"]),
        }
        return features, example["label"]

    iterator = iter(_dataset(data).map(to_features).prefetch(2))

    @tf.function
    def training_loop(num_steps: tf.Tensor) -> None:
        def step(labels: tf.Tensor) -> None:
            with tf.GradientTape() as tape:
                activations = embedding.dequeue()
                tape.watch(activations)
                loss = _loss(labels, model(activations))
            embedding_gradients, dense_gradients = tape.gradient(
                loss, (activations, model.trainable_variables)
            )
            embedding.apply_gradients(embedding_gradients)
            optimizer.apply_gradients(
                zip(dense_gradients, model.trainable_variables, strict=True)
            )

        for _ in tf.range(num_steps):
            features, labels = next(iterator)
            embedding.enqueue(features, training=True)
            step(labels)

    training_loop(tf.constant(cell.warmup))
    start = time.perf_counter()
    training_loop(tf.constant(cell.steps))
    seconds = time.perf_counter() - start
    # One call runs every timed step, as TF's docstring loop does; no per-step time.
    return {
        "examples_per_s": cell.batch * cell.steps / seconds,
        "step_ms": 1e3 * seconds / cell.steps,
    }


VARIANTS: dict[str, Callable[[Cell, dict[str, np.ndarray], str], dict[str, Any]]] = {
    "engine": run_engine,
    "gather_lazyadam": run_gather_lazyadam,
    "gather_apply_adam": run_gather_apply_adam,
    "feature_column_lazyadam": run_feature_column_lazyadam,
    "tf_tpu_estimator": run_tf_tpu_estimator,
    "keras": run_keras,
    "tf2_embedding": run_tf2_embedding,
}


def run(variant: str, cell: Cell) -> dict[str, Any]:
    """Builds and times `variant` on `cell` in this process; its result dict."""
    data = make_data(cell)
    with tempfile.TemporaryDirectory(prefix=f"bench_estimator_{variant}_") as model_dir:
        return VARIANTS[variant](cell, data, model_dir)
