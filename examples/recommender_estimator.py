r"""A small click-through recommender trained with TPUEstimator on CPU.

The model is a TPU program: `tf.compat.v1.tpu.experimental` embedding columns
in an `EmbeddingConfigSpec` whose optimizer is TPU Adam, a small DNN over the
columns, and a `TPUEstimatorSpec` with `eval_metrics`. With
`tpu_embed_adam.estimator.TPUEstimator(use_tpu=False)` the embedding tables
live in the software TPU embedding engine and train with the spec's TPU sparse
Adam, exactly as on a TPU; the DNN trains with the model_fn's own optimizer.
The checkpoint holds each table with its `Adam/m` and `Adam/v` slots under the
names TPUEstimator uses on a TPU.

TF's own class gets the same behaviour after `tpu_embed_adam.install()`, which
also makes TF's `AdamParameters` alias resolve to ours (`--tf_class` runs it
that way)::

    tpu_embed_adam.install()
    estimator = tf.compat.v1.estimator.tpu.TPUEstimator(..., use_tpu=False,
        embedding_config_spec=spec)  # spec's tf.compat.v1.tpu.experimental.AdamParameters apply

Features: `user` (one id), `item` (the impression, one id) and `history` (the
items the user interacted with before, several ids, mean-combined). `item` and
`history` share one table (`shared_embedding_columns`). Ids follow power laws
(truncated zipf) and are generated on the fly by tf.data from a synthetic
ground truth: each user and item has a hidden preference vector, the user
clicks an item with probability sigmoid(affinity), and a user's history is
drawn from the popular items they like most. Evaluation uses held-out
impressions from a separate random stream.

  python examples/recommender_estimator.py --steps=1500 --batch_size=256
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tpu_embed_adam  # noqa: E402
from tpu_embed_adam.estimator import TPUEstimator  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Train and eval batch size.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoint directory (default: a temp dir).")
_LOG_EVERY = flags.DEFINE_integer(
    "log_every", 250, "Log the mean loss and steps/s of every this many steps (and of step 1)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the synthetic task, the data and the model.")
_EVAL_STEPS = flags.DEFINE_integer("eval_steps", 40, "Held-out evaluation batches.")
_USERS = flags.DEFINE_integer("users", 5_000, "Rows of the user table.")
_ITEMS = flags.DEFINE_integer("items", 2_000, "Rows of the item table (shared by history).")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding dimension.")
_HISTORY = flags.DEFINE_integer("history", 10, "Most items in a user's history feature.")
_ZIPF = flags.DEFINE_float("zipf", 1.1, "Power-law exponent of user and item popularity.")
_EMBEDDING_LR = flags.DEFINE_float("embedding_learning_rate", 0.02, "TPU Adam learning rate.")
_DENSE_LR = flags.DEFINE_float("dense_learning_rate", 0.003, "The DNN's Adam learning rate.")
_TF_CLASS = flags.DEFINE_bool(
    "tf_class", False,
    "Use TF's own TPUEstimator and AdamParameters after tpu_embed_adam.install().",
)

_RANK = 8  # of the hidden preference vectors
_POOL = 32  # items a user's history draws from
_CANDIDATES = 256  # popular items a user's pool is chosen from


class GroundTruth:
    """The hidden task: preference vectors, popularity, and each user's liked items."""

    def __init__(self, users: int, items: int, zipf: float, seed: int):
        rng = np.random.default_rng(seed)
        scale = _RANK**-0.25  # affinities <p_u, q_i> have unit variance
        self.user_vectors = rng.normal(0.0, scale, (users, _RANK)).astype(np.float32)
        self.item_vectors = rng.normal(0.0, scale, (items, _RANK)).astype(np.float32)
        self.user_cdf = _zipf_cdf(users, zipf)
        self.item_cdf = _zipf_cdf(items, zipf)
        # Each user's pool: the most liked of some popular items they came across.
        seen = np.searchsorted(self.item_cdf, rng.random((users, _CANDIDATES)), side="right")
        affinity = np.einsum("uk,uck->uc", self.user_vectors, self.item_vectors[seen])
        top = np.argsort(-affinity, axis=1)[:, :_POOL]
        self.pools = np.take_along_axis(seen, top, axis=1).astype(np.int64)


def _zipf_cdf(n: int, s: float) -> np.ndarray:
    """CDF over ids 0..n-1 with P(id) proportional to (id + 1)^-s."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights) / weights.sum()
    cdf[-1] = 1.0
    return cdf.astype(np.float32)


def _one_id_per_row(ids: tf.Tensor) -> tf.sparse.SparseTensor:
    """[batch] ids as the [batch, 1] SparseTensor a categorical column reads."""
    rows = tf.range(tf.shape(ids, out_type=tf.int64)[0])
    indices = tf.stack([rows, tf.zeros_like(rows)], axis=1)
    return tf.sparse.SparseTensor(indices, ids, tf.stack([tf.size(ids, tf.int64), 1]))


def make_input_fn(truth: GroundTruth, batch_size: int, history: int, seed: int, stream: int,
                  batches: int | None = None):
    """An input_fn of (features, click) batches; `stream` 0 trains, 1 is held out."""

    def make_batch(example_ids: tf.Tensor):
        # Stateless: batch k of a stream is the same whenever it is generated.
        key = tf.stack([tf.constant(seed * 2 + stream, tf.int64), example_ids[0]])
        u = tf.random.stateless_uniform([batch_size, 4 + history], seed=key)
        users = tf.searchsorted(truth.user_cdf, u[:, 0], side="right", out_type=tf.int64)
        items = tf.searchsorted(truth.item_cdf, u[:, 1], side="right", out_type=tf.int64)
        users = tf.minimum(users, len(truth.user_cdf) - 1)
        items = tf.minimum(items, len(truth.item_cdf) - 1)
        affinity = tf.reduce_sum(
            tf.gather(truth.user_vectors, users) * tf.gather(truth.item_vectors, items), axis=1
        )
        click = tf.cast(u[:, 2] < tf.sigmoid(3.0 * affinity), tf.float32)
        # History: 1..history picks from the user's pool.
        lengths = 1 + tf.cast(u[:, 3] * history, tf.int64)
        slots = tf.cast(u[:, 4:] * _POOL, tf.int64)
        picks = tf.gather(truth.pools, users, batch_dims=0)  # [batch, pool]
        picks = tf.gather(picks, tf.minimum(slots, _POOL - 1), batch_dims=1)
        keep = tf.range(history, dtype=tf.int64)[None, :] < lengths[:, None]
        hist = tf.ragged.boolean_mask(picks, keep).to_sparse()
        hist = tf.sparse.SparseTensor(
            hist.indices, hist.values, tf.constant([batch_size, history], tf.int64)
        )
        features = {"user": _one_id_per_row(users), "item": _one_id_per_row(items),
                    "history": hist}
        return features, click[:, None]

    def input_fn(params):
        del params  # the estimator's batch size is batch_size
        dataset = tf.data.Dataset.range(batches * batch_size if batches else 2**62)
        dataset = dataset.batch(batch_size, drop_remainder=True)
        return dataset.map(make_batch, num_parallel_calls=2).prefetch(4)

    return input_fn


def feature_columns(users: int, items: int, dim: int):
    """user, and item/history sharing one table; TPU embedding columns."""
    fc = tf.compat.v1.feature_column
    tpu = tf.compat.v1.tpu.experimental
    user = tpu.embedding_column(fc.categorical_column_with_identity("user", users), dim)
    item, history = tpu.shared_embedding_columns(
        [fc.categorical_column_with_identity("item", items),
         fc.categorical_column_with_identity("history", items)],
        dim, combiner="mean",
    )
    return [user, item, history]


class LogLossAndRate(tf.compat.v1.train.SessionRunHook):
    """Logs the mean training loss and steps/s of every `every` steps (and of step 1)."""

    def __init__(self, loss: tf.Tensor, every: int, last: int):
        self._loss, self._every, self._last = loss, every, last
        self._step = tf.compat.v1.train.get_global_step()

    def begin(self) -> None:
        self._window, self._first = [], None
        self._start = time.perf_counter()

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs((self._loss, self._step))

    def after_run(self, run_context, run_values) -> None:
        loss, step = run_values.results
        step += 1  # the global step read before this step's increment
        self._window.append(loss)
        if step == 1 or step % self._every == 0 or step == self._last:
            now = time.perf_counter()
            mean = float(np.mean(self._window))
            self._first = mean if self._first is None else self._first
            logging.info("step %d  loss %.4f  %.1f steps/s", step, mean,
                         len(self._window) / (now - self._start))
            if step == self._last:
                logging.info("loss %.4f -> %.4f over %d steps", self._first, mean, step)
            self._window, self._start = [], now


def make_model_fn(columns, log_every: int, steps: int, dense_learning_rate: float):
    """A DNN over the embedding columns and their products; logistic loss on clicks."""
    ordered = sorted(columns, key=lambda c: c.name)  # DenseFeatures' output order
    names = [c.categorical_column.key for c in ordered]
    dims = [int(c.variable_shape[-1]) for c in ordered]

    def model_fn(features, labels, mode, params):
        del params
        # TF1 DenseFeatures: it records the variable scope TPU columns need.
        net = tf.compat.v1.keras.layers.DenseFeatures(columns)(features)
        emb = dict(zip(names, tf.split(net, dims, axis=1), strict=True))
        x = tf.concat([net, emb["user"] * emb["item"], emb["history"] * emb["item"]], axis=1)
        for width in (64, 32):
            x = tf.keras.layers.Dense(width, activation="relu")(x)
        logits = tf.keras.layers.Dense(1)(x)
        probabilities = tf.sigmoid(logits)
        if mode == tf.estimator.ModeKeys.PREDICT:
            return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
                mode, predictions={"click_probability": probabilities}
            )
        loss = tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        )
        if mode == tf.estimator.ModeKeys.EVAL:
            return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
                mode, loss=loss, eval_metrics=(metric_fn, [labels, probabilities])
            )
        # The optimizer trains the DNN; the engine trains the tables with TPU Adam.
        optimizer = tf.compat.v1.train.AdamOptimizer(dense_learning_rate)
        train_op = optimizer.minimize(loss, tf.compat.v1.train.get_global_step())
        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
            mode, loss=loss, train_op=train_op,
            training_hooks=[LogLossAndRate(loss, log_every, steps)],
        )

    return model_fn


def metric_fn(labels, probabilities):
    return {
        "auc": tf.compat.v1.metrics.auc(labels, probabilities),
        "accuracy": tf.compat.v1.metrics.accuracy(labels, tf.cast(probabilities > 0.5, tf.float32)),
    }


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    tf.get_logger().setLevel("ERROR")  # the Estimator's INFO lines and deprecation notes
    tf.compat.v1.set_random_seed(_SEED.value)
    model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix="recommender_estimator_")
    batch_size, steps = _BATCH_SIZE.value, _STEPS.value
    truth = GroundTruth(_USERS.value, _ITEMS.value, _ZIPF.value, _SEED.value)
    columns = feature_columns(_USERS.value, _ITEMS.value, _DIM.value)

    if _TF_CLASS.value:
        tpu_embed_adam.install()  # TF's TPUEstimator and AdamParameters: ours
        estimator_class = tf.compat.v1.estimator.tpu.TPUEstimator
        adam = tf.compat.v1.tpu.experimental.AdamParameters
    else:
        estimator_class, adam = TPUEstimator, tpu_embed_adam.AdamParameters
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=columns, optimization_parameters=adam(_EMBEDDING_LR.value)
    )
    estimator = estimator_class(
        model_fn=make_model_fn(columns, _LOG_EVERY.value, steps, _DENSE_LR.value),
        config=tf.compat.v1.estimator.tpu.RunConfig(
            model_dir=model_dir, save_checkpoints_steps=steps, save_summary_steps=steps,
            log_step_count_steps=None, tf_random_seed=_SEED.value,
        ),
        use_tpu=False,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        embedding_config_spec=spec,
    )
    logging.info("training %d steps of %d examples; model_dir %s (%s)", steps, batch_size,
                 model_dir, type(estimator).__module__ + "." + type(estimator).__name__)
    estimator.train(
        make_input_fn(truth, batch_size, _HISTORY.value, _SEED.value, stream=0), max_steps=steps
    )
    metrics = estimator.evaluate(
        make_input_fn(truth, batch_size, _HISTORY.value, _SEED.value, stream=1,
                      batches=_EVAL_STEPS.value),
        steps=_EVAL_STEPS.value,
    )
    print(f"eval on {_EVAL_STEPS.value * batch_size} held-out examples: "
          f"auc {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  "
          f"loss {metrics['loss']:.4f}  (global step {metrics['global_step']})")
    print(f"checkpoint {tf.train.latest_checkpoint(model_dir)}: embedding tables")
    for name, shape in tf.train.list_variables(model_dir):
        # (Skips the dummy variables through which TPUEstimator takes the gradients.)
        if "embedding" in name and not name.startswith("tpu_embedding_dummy"):
            print(f"  {name}  {shape}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
