r"""A TF2 custom training loop: embedding tables trained with TPU sparse Adam.

No estimator, no TPU embedding graph: a Keras model keeps its embedding tables
as plain `tf.Variable`s, with an Adam first- and second-moment slot variable
(`m`, `v`) beside each. A `tf.function` step takes the gradients with
`tf.GradientTape`; a table's gradient is a `tf.IndexedSlices` (the rows its
lookups touched), which goes straight to `tpu_embed_adam.apply_adam`, the TPU
embedding engine's sparse Adam update (lazy: only those rows, no bias
correction, as on a TPU), run by the fused CPU kernel. The dense layers train
with an ordinary Keras optimizer::

    with tf.GradientTape() as tape:
        loss = ...
    table_grads, dense_grads = tape.gradient(loss, (tables, dense_variables))
    for table, m, v, grad in zip(tables, ms, vs, table_grads):
        tpu_embed_adam.apply_adam(table, m, v, None, grad, params)   # grad: IndexedSlices
    keras_optimizer.apply_gradients(zip(dense_grads, dense_variables))

The same `params` on a TPU with TF2's `tf.tpu.experimental.embedding.TPUEmbedding`
is `params.to_tpu_embedding_v2()`, a `tf.tpu.experimental.embedding.Adam`
(the script prints both).

The task is synthetic click prediction: power-law user and item ids, a user's
history of liked items, and clicks drawn from hidden preference vectors. The
item and history features share one table, so its gradient is the union of
both lookups' rows; `apply_adam` sums the duplicates, as the TPU does.

  python examples/custom_loop_tf2.py --steps=400 --batch_size=256
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import tpu_embed_adam  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_LOG_EVERY = flags.DEFINE_integer(
    "log_every", 50, "Log the mean loss and steps/s of every this many steps (and of step 1)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the synthetic task, the data and the model.")
_USERS = flags.DEFINE_integer("users", 2_000, "Rows of the user table.")
_ITEMS = flags.DEFINE_integer("items", 1_000, "Rows of the item table (shared by history).")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding dimension.")
_HISTORY = flags.DEFINE_integer("history", 8, "Items in a user's history feature.")
_EMBEDDING_LR = flags.DEFINE_float("embedding_learning_rate", 0.02, "TPU Adam learning rate.")
_DENSE_LR = flags.DEFINE_float("dense_learning_rate", 0.003, "The dense layers' Adam rate.")

_RANK = 8


class SyntheticClicks:
    """Power-law (user, item, history) impressions clicked by hidden affinity."""

    def __init__(self, users: int, items: int, history: int, seed: int):
        self._rng = np.random.default_rng(seed)
        scale = _RANK**-0.25  # unit-variance affinities
        self._users = self._rng.normal(0.0, scale, (users, _RANK))
        self._items = self._rng.normal(0.0, scale, (items, _RANK))
        # Each user's history: their best liked of 64 popular items they came across.
        seen = self._ids(items, (users, 64))
        affinity = np.einsum("uk,uck->uc", self._users, self._items[seen])
        self._history = np.take_along_axis(seen, np.argsort(-affinity, 1)[:, :history], 1)

    def _ids(self, vocab: int, shape) -> np.ndarray:
        return (self._rng.zipf(1.2, shape) - 1) % vocab

    def batch(self, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        users = self._ids(len(self._users), n)
        items = self._ids(len(self._items), n)
        affinity = np.sum(self._users[users] * self._items[items], axis=1)
        clicks = self._rng.random(n) < 1 / (1 + np.exp(-3 * affinity))
        features = {"user": users, "item": items, "history": self._history[users]}
        return features, clicks.astype(np.float32)


class ClickModel(tf.keras.Model):
    """Embedding tables as `tf.Variable`s (with Adam slots) and a small DNN."""

    def __init__(self, users: int, items: int, dim: int):
        super().__init__()
        init = tf.random_normal_initializer(stddev=dim**-0.5)
        self.user_table = tf.Variable(init([users, dim]), name="user_table")
        self.item_table = tf.Variable(init([items, dim]), name="item_table")
        self.tables = [self.user_table, self.item_table]
        # TPU Adam's slots: zeros, one m and one v per table, never trained by Keras.
        self.slots = [
            (tf.Variable(tf.zeros_like(t), trainable=False, name=t.name.split(":")[0] + "/m"),
             tf.Variable(tf.zeros_like(t), trainable=False, name=t.name.split(":")[0] + "/v"))
            for t in self.tables
        ]
        self.hidden = [tf.keras.layers.Dense(w, activation="relu") for w in (64, 32)]
        self.out = tf.keras.layers.Dense(1)

    def call(self, features):
        user = tf.nn.embedding_lookup(self.user_table, features["user"])
        item = tf.nn.embedding_lookup(self.item_table, features["item"])
        # The shared table again: the mean of the history items' rows.
        history = tf.reduce_mean(tf.nn.embedding_lookup(self.item_table, features["history"]), 1)
        x = tf.concat([user, item, history, user * item, history * item], axis=1)
        for layer in self.hidden:
            x = layer(x)
        return self.out(x)[:, 0]

    @property
    def dense_variables(self) -> list[tf.Variable]:
        return [w for layer in (*self.hidden, self.out) for w in layer.trainable_variables]


def _describe_v2(optimizer) -> str:
    """`tf.tpu.experimental.embedding.Adam(...)` with the fields it was given."""
    fields = ("learning_rate", "beta_1", "beta_2", "epsilon", "lazy_adam", "sum_inside_sqrt",
              "use_gradient_accumulation", "clip_weight_min", "clip_weight_max",
              "weight_decay_factor", "clip_gradient_min", "clip_gradient_max")
    args = ", ".join(f"{f}={getattr(optimizer, f)!r}" for f in fields)
    return f"tf.tpu.experimental.embedding.{type(optimizer).__name__}({args})"


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    tf.random.set_seed(_SEED.value)
    params = tpu_embed_adam.AdamParameters(_EMBEDDING_LR.value)
    print(f"tables: {params!r}")
    print(f"  on a TPU with TPUEmbedding v2: {_describe_v2(params.to_tpu_embedding_v2())}")
    data = SyntheticClicks(_USERS.value, _ITEMS.value, _HISTORY.value, _SEED.value)
    model = ClickModel(_USERS.value, _ITEMS.value, _DIM.value)
    model(data.batch(1)[0])  # builds the dense layers
    dense_optimizer = tf.keras.optimizers.Adam(_DENSE_LR.value)

    @tf.function
    def train_step(features, clicks):
        with tf.GradientTape() as tape:
            logits = model(features)
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=clicks, logits=logits)
            )
        table_grads, dense_grads = tape.gradient(loss, (model.tables, model.dense_variables))
        for table, (m, v), grad in zip(model.tables, model.slots, table_grads, strict=True):
            # grad is a tf.IndexedSlices: the looked-up rows, duplicates included.
            tpu_embed_adam.apply_adam(table, m, v, None, grad, params)
        dense_optimizer.apply_gradients(zip(dense_grads, model.dense_variables, strict=True))
        return loss

    window, first, window_start = [], None, time.perf_counter()
    for step in range(1, _STEPS.value + 1):
        features, clicks = data.batch(_BATCH_SIZE.value)
        window.append(float(train_step(features, clicks)))
        if step == 1 or step % _LOG_EVERY.value == 0 or step == _STEPS.value:
            now = time.perf_counter()
            mean = float(np.mean(window))
            first = mean if first is None else first
            logging.info("step %d  loss %.4f  %.1f steps/s", step, mean,
                         len(window) / (now - window_start))
            window, window_start = [], now
    print(f"loss {first:.4f} -> {mean:.4f} over {_STEPS.value} steps")
    for table, (_, v) in zip(model.tables, model.slots, strict=True):
        touched = int(tf.math.count_nonzero(tf.reduce_any(v > 0, axis=1)))
        print(f"{table.name.split(':')[0]}: {touched} of {table.shape[0]} rows trained "
              "(lazy Adam: rows never looked up keep zero slots)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
