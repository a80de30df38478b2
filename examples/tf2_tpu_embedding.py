r"""TF2's TPU embedding API on CPU: TF's own training loop, a checkpoint, a serving model.

The program is TF's `tf.tpu.experimental.embedding.TPUEmbedding` docstring
loop, unchanged, after one line::

    tpu_embed_adam.install()   # TF's TPUEmbedding made outside a TPUStrategy now trains

    with strategy.scope():
        embedding = tf.tpu.experimental.embedding.TPUEmbedding(
            feature_config=feature_config, optimizer=tf.tpu.experimental.embedding.Adam(0.05))

    @tf.function
    def training_step(dataset_iterator, num_steps):
        def tpu_step(tpu_features):
            with tf.GradientTape() as tape:
                activations = embedding.dequeue()
                tape.watch(activations)
                loss = ...
            embedding.apply_gradients(tape.gradient(loss, activations))
            ...                                # the dense layers' optimizer
        for _ in tf.range(num_steps):
            embedding_features, tpu_features = next(dataset_iterator)
            embedding.enqueue(embedding_features, training=True)
            strategy.run(tpu_step, args=(tpu_features,))

The tables train with the TPU's embedding Adam (lazy, no bias correction; the
"items" table is shared by the item and the history features, whose
gradients are summed per row), the dense layers with Keras Adam. Then, as a
TPU job would: `tf.train.Checkpoint(model=..., embedding=...)` saves; a
serving program restores the tables into TF's `TPUEmbeddingForServing` and
exports a SavedModel, whose predictions must equal the trained model's.

The task is synthetic click prediction: power-law user and item ids, a
user's history of liked items (a ragged, weighted sequence of ids), clicks
drawn from hidden preference vectors.

  python examples/tf2_tpu_embedding.py --steps=400 --batch_size=256
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

_STEPS = flags.DEFINE_integer("steps", 400, "Training steps.")
_STEPS_PER_LOOP = flags.DEFINE_integer(
    "steps_per_loop", 50, "Steps of one training_step call (its tf.range loop); logged each."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the synthetic task, the data and the model.")
_USERS = flags.DEFINE_integer("users", 2_000, "Rows of the user table.")
_ITEMS = flags.DEFINE_integer("items", 1_000, "Rows of the item table (shared by history).")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding dimension.")
_HISTORY = flags.DEFINE_integer("history", 8, "Most items in a user's history feature.")
_EMBEDDING_LR = flags.DEFINE_float("embedding_learning_rate", 0.05, "TPU Adam learning rate.")
_DENSE_LR = flags.DEFINE_float("dense_learning_rate", 0.003, "The dense layers' Adam rate.")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Checkpoint and SavedModel; a temp dir if unset."
)

_RANK = 8
E = tf.tpu.experimental.embedding


class SyntheticClicks:
    """Power-law (user, item, history) impressions clicked by hidden affinity."""

    def __init__(self, users: int, items: int, history: int, seed: int):
        rng = np.random.default_rng(seed)
        scale = _RANK**-0.25  # unit-variance affinities
        self._users = rng.normal(0.0, scale, (users, _RANK))
        self._items = rng.normal(0.0, scale, (items, _RANK))
        self._history = history

    def _ids(self, rng: np.random.Generator, vocab: int, shape) -> np.ndarray:
        return (rng.zipf(1.2, shape) - 1) % vocab

    def _arrays(self, rng: np.random.Generator, n: int) -> tuple:
        """Users, items, history ids, their row lengths and weights, clicks: numpy."""
        users = self._ids(rng, len(self._users), n)
        items = self._ids(rng, len(self._items), n)
        lengths = rng.integers(0, self._history + 1, n)
        history = self._ids(rng, len(self._items), lengths.sum())
        # A history item's weight: how much the user liked it.
        liking = np.einsum("nk,nk->n", self._users[np.repeat(users, lengths)], self._items[history])
        weights = (1 / (1 + np.exp(-2 * liking))).astype(np.float32)
        affinity = np.sum(self._users[users] * self._items[items], axis=1)
        clicks = (rng.random(n) < 1 / (1 + np.exp(-3 * affinity))).astype(np.float32)
        return users, items, history, lengths, weights, clicks

    @staticmethod
    def _inputs(users, items, history, lengths, weights, clicks) -> tuple:
        """((features, history weights), clicks), the history ragged."""
        features = {
            "user": users,
            "item": items,
            "history": tf.RaggedTensor.from_row_lengths(history, lengths),
        }
        return (features, tf.RaggedTensor.from_row_lengths(weights, lengths)), clicks

    def batches(self, n: int, count: int, seed: int) -> list[tuple]:
        """`count` batches as `dataset` gives them, eagerly, drawn from `seed`."""
        rng = np.random.default_rng(seed)
        return [self._inputs(*self._arrays(rng, n)) for _ in range(count)]

    def dataset(self, batch_size: int, seed: int) -> tf.data.Dataset:
        """Endless batches drawn from `seed`: numpy from the generator, ragged tensors by tf.data.

        tf.data runs the generator ahead in its own thread: it draws from its
        own random generator, so that what it draws does not depend on when.
        """
        rng = np.random.default_rng(seed)
        ids = tf.TensorSpec([batch_size], tf.int64)
        spec = (
            ids,
            ids,
            tf.TensorSpec([None], tf.int64),
            ids,
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([batch_size], tf.float32),
        )
        arrays = tf.data.Dataset.from_generator(
            lambda: iter(lambda: self._arrays(rng, batch_size), None), output_signature=spec
        )
        return arrays.map(self._inputs)


def feature_config(users: int, items: int, dim: int) -> dict:
    """Three features, two tables: history shares the items table."""
    user_table = E.TableConfig(users, dim, name="users", combiner="sum")
    item_table = E.TableConfig(items, dim, name="items", combiner="mean")
    return {
        "user": E.FeatureConfig(user_table, name="user"),
        "item": E.FeatureConfig(item_table, name="item"),
        "history": E.FeatureConfig(item_table, name="history"),
    }


def build_model() -> tf.keras.Model:
    """The dense part: activations (user, item, history) -> click logit."""
    inputs = {k: tf.keras.Input([_DIM.value], name=k) for k in ("user", "item", "history")}
    user, item, history = inputs["user"], inputs["item"], inputs["history"]
    x = tf.keras.layers.Concatenate()([user, item, history, user * item, history * item])
    for width in (64, 32):
        x = tf.keras.layers.Dense(width, activation="relu")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(1)(x)[:, 0])


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels > 0.5
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    tpu_embed_adam.install()
    tf.keras.utils.set_random_seed(_SEED.value)
    model_dir = _MODEL_DIR.value or tempfile.mkdtemp(prefix="tf2_tpu_embedding_")
    data = SyntheticClicks(_USERS.value, _ITEMS.value, _HISTORY.value, _SEED.value)
    config = feature_config(_USERS.value, _ITEMS.value, _DIM.value)

    strategy = tf.distribute.get_strategy()  # on a TPU: tf.distribute.TPUStrategy(resolver)
    with strategy.scope():
        embedding = tf.tpu.experimental.embedding.TPUEmbedding(
            feature_config=config, optimizer=E.Adam(_EMBEDDING_LR.value)
        )
        model = build_model()
        dense_optimizer = tf.keras.optimizers.Adam(_DENSE_LR.value)

    def enqueue(inputs, training):
        features, weights = inputs
        embedding.enqueue(
            features, {"user": None, "item": None, "history": weights}, training=training
        )

    @tf.function
    def training_step(dataset_iterator, num_steps):
        def tpu_step(clicks):
            with tf.GradientTape() as tape:
                activations = embedding.dequeue()
                tape.watch(activations)
                logits = model(activations)
                loss = tf.reduce_mean(
                    tf.nn.sigmoid_cross_entropy_with_logits(labels=clicks, logits=logits)
                )
            embedding_gradients, dense_gradients = tape.gradient(
                loss, (activations, model.trainable_variables)
            )
            embedding.apply_gradients(embedding_gradients)
            dense_optimizer.apply_gradients(
                zip(dense_gradients, model.trainable_variables, strict=True)
            )
            return loss

        total = tf.constant(0.0)
        for _ in tf.range(num_steps):
            embedding_features, tpu_features = next(dataset_iterator)
            enqueue(embedding_features, training=True)
            total += strategy.run(tpu_step, args=(tpu_features,))
        return total / tf.cast(num_steps, tf.float32)

    @tf.function
    def evaluation_step(inputs):
        enqueue(inputs, training=False)
        return strategy.run(lambda: model(embedding.dequeue()))

    iterator = iter(data.dataset(_BATCH_SIZE.value, seed=_SEED.value + 1))
    done, losses = 0, []
    while done < _STEPS.value:
        steps = min(_STEPS_PER_LOOP.value, _STEPS.value - done)
        loop_start = time.perf_counter()
        losses.append(float(training_step(iterator, tf.constant(steps))))
        done += steps
        logging.info(
            "step %d  loss %.4f  %.1f steps/s",
            done,
            losses[-1],
            steps / (time.perf_counter() - loop_start),
        )
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {done} steps")

    # The batch size stays as in training: TF's TPU embedding fixes the shapes.
    held_out = data.batches(_BATCH_SIZE.value, count=16, seed=_SEED.value + 2)
    scores = np.concatenate([evaluation_step(inputs).numpy() for inputs, _ in held_out])
    clicks = np.concatenate([c for _, c in held_out])
    print(f"held-out AUC {_auc(clicks, scores):.3f}")

    path = tf.train.Checkpoint(model=model, embedding=embedding).save(
        os.path.join(model_dir, "ckpt")
    )
    print(f"checkpoint {path}")

    # The serving program: TF's serving class, no optimizer (no slots), CPU lookups.
    serving = E.TPUEmbeddingForServing(
        feature_config(_USERS.value, _ITEMS.value, _DIM.value), optimizer=None
    )
    serving_model = build_model()
    tf.train.Checkpoint(model=serving_model, embedding=serving).restore(path).expect_partial()
    module = tf.Module()
    module.embedding, module.model = serving, serving_model
    ids = tf.TensorSpec([None], tf.int64)
    ragged = lambda dtype: tf.RaggedTensorSpec([None, None], dtype, 1, tf.int64)  # noqa: E731

    @tf.function(
        input_signature=[
            {"user": ids, "item": ids, "history": ragged(tf.int64)},
            ragged(tf.float32),
        ]
    )
    def serve(features, history_weights):
        weights = {"user": None, "item": None, "history": history_weights}
        # dict(): TF returns its tracked copy of feature_config's dict, which
        # a tf.function cannot return or pass on (typing_extensions >= 4.6).
        return serving_model(dict(serving.embedding_lookup(features, weights)))

    module.serve = serve
    export = os.path.join(model_dir, "serving")
    tf.saved_model.save(module, export)
    loaded = tf.saved_model.load(export)
    served = np.concatenate([loaded.serve(*inputs).numpy() for inputs, _ in held_out])
    difference = float(np.max(np.abs(served - scores)))
    print(
        f"SavedModel {export}: predictions equal the trained model's "
        f"(max |difference| {difference:.3g})"
    )
    if difference > 1e-5:
        raise SystemExit("serving predictions differ from the trained model's")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
