"""A TPUEstimator program as a user writes it for a TPU, run on CPU in one process or as a chief.

`tf.estimator.train_and_evaluate` is the entry point; the RunConfig comes from
TF_CONFIG when it is set (a TFJob's chief: the tables then live in the
cluster's worker processes), else the program runs in one process. The
model: a user column and a history of items sharing the items table with
the candidate item (TPU embedding columns, TPU Adam), a small dense layer
trained by the model_fn's own Adam, a logistic loss on synthetic clicks.

Usage:
  python cluster_chief.py MODE MODEL_DIR STEPS [OPERATION_TIMEOUT_MS]
    MODE: train_and_evaluate | train | evaluate | predict
Prints one line of JSON: the evaluation's metrics (evaluate), the number of
predictions (predict) or {} (train, train_and_evaluate).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorflow as tf

import tpu_embed_adam

USERS, ITEMS, DIM, HISTORY = 97, 61, 8, 5
BATCH = 16
DATA_ROWS = 256


def _data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.zipf(1.3, DATA_ROWS) % USERS
    items = rng.zipf(1.2, DATA_ROWS) % ITEMS
    history = rng.zipf(1.2, (DATA_ROWS, HISTORY)) % ITEMS
    # Variable-length histories: -1 pads, dropped before the columns see them.
    lengths = rng.integers(1, HISTORY + 1, DATA_ROWS)
    history[np.arange(HISTORY)[None, :] >= lengths[:, None]] = -1
    clicks = ((users + items) % 3 == 0).astype(np.float32)
    return {"user": users, "item": items, "history": history, "click": clicks}


def input_fn(params, seed: int = 0, repeat: bool = True) -> tf.data.Dataset:
    data = _data(seed)

    def to_features(row):
        history = tf.sparse.from_dense(row["history"])
        history = tf.sparse.retain(history, history.values >= 0)
        features = {
            "user": tf.sparse.from_dense(row["user"][:, None]),
            "item": tf.sparse.from_dense(row["item"][:, None]),
            "history": history,
        }
        return features, row["click"]

    dataset = tf.data.Dataset.from_tensor_slices(data)
    if repeat:
        dataset = dataset.repeat()
    return dataset.batch(params["batch_size"], drop_remainder=True).map(to_features)


def table_initializer(rows: int, seed: int):
    """The same table whatever the number of hosts: each partition gets its rows.

    TF's random initializers draw each partition (one per host) on its own,
    so a different number of hosts would start from different tables.
    """
    table = np.random.default_rng(seed).normal(0, 0.1, (rows, DIM)).astype(np.float32)

    def init(shape, dtype=None, partition_info=None):
        del dtype
        start = 0 if partition_info is None else partition_info.single_offset(shape)
        return tf.constant(table[start : start + shape[0]])

    return init


def columns():
    fc = tf.compat.v1.feature_column
    tpu = tf.compat.v1.tpu.experimental
    user = tpu.embedding_column(
        fc.categorical_column_with_identity("user", USERS), DIM, combiner="mean",
        initializer=table_initializer(USERS, 1),
    )
    item, history = tpu.shared_embedding_columns(
        [
            fc.categorical_column_with_identity("item", ITEMS),
            fc.categorical_column_with_identity("history", ITEMS),
        ],
        DIM, combiner="mean", initializer=table_initializer(ITEMS, 2),
    )
    return [user, item, history]


def model_fn(features, labels, mode, params):
    del params
    net = tf.compat.v1.keras.layers.DenseFeatures(columns())(features)
    hidden = tf.compat.v1.layers.dense(
        net, 8, tf.nn.relu, kernel_initializer=tf.compat.v1.glorot_uniform_initializer(seed=3)
    )
    logits = tf.squeeze(
        tf.compat.v1.layers.dense(
            hidden, 1, kernel_initializer=tf.compat.v1.glorot_uniform_initializer(seed=4)
        ),
        -1,
    )
    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
            mode, predictions={"probability": tf.sigmoid(logits)}
        )
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
    if mode == tf.estimator.ModeKeys.EVAL:

        def metrics(labels, logits):
            return {"auc": tf.compat.v1.metrics.auc(labels, tf.sigmoid(logits))}

        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
            mode, loss=loss, eval_metrics=(metrics, [labels, logits])
        )
    optimizer = tf.compat.v1.train.AdamOptimizer(0.01)
    train_op = optimizer.minimize(loss, tf.compat.v1.train.get_global_step())
    return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def make_estimator(model_dir: str, estimator_class=None, timeout_ms: int = 0):
    """The estimator: TF's TPUEstimator after install(), or `estimator_class`."""
    if estimator_class is None:
        tpu_embed_adam.install()
        estimator_class = tf.compat.v1.estimator.tpu.TPUEstimator
    config = tf.compat.v1.estimator.tpu.RunConfig(  # the cluster comes from TF_CONFIG
        model_dir=model_dir, save_checkpoints_steps=3, keep_checkpoint_max=None,
        session_config=(
            tf.compat.v1.ConfigProto(operation_timeout_in_ms=timeout_ms) if timeout_ms else None
        ),
        tpu_config=tf.compat.v1.estimator.tpu.TPUConfig(iterations_per_loop=2),
    )
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=columns(),
        optimization_parameters=tf.compat.v1.tpu.experimental.AdamParameters(0.05),
    )
    return estimator_class(
        model_fn=model_fn, config=config, use_tpu=False, train_batch_size=BATCH,
        eval_batch_size=BATCH, predict_batch_size=BATCH, embedding_config_spec=spec,
    )


def run(
    mode: str, model_dir: str, steps: int, estimator_class=None, timeout_ms: int = 0
) -> dict:
    """Runs `mode`; returns the evaluation's metrics, the number of predictions, or {}."""
    estimator = make_estimator(model_dir, estimator_class, timeout_ms)
    out: dict = {}
    if mode == "train_and_evaluate":
        tf.estimator.train_and_evaluate(
            estimator,
            tf.estimator.TrainSpec(input_fn, max_steps=steps),
            tf.estimator.EvalSpec(
                lambda params: input_fn(params, seed=1, repeat=False), steps=None,
                throttle_secs=0, start_delay_secs=0,
            ),
        )
    elif mode == "train":
        estimator.train(input_fn, max_steps=steps)
    elif mode == "evaluate":
        metrics = estimator.evaluate(lambda params: input_fn(params, seed=1, repeat=False))
        out = {k: float(v) for k, v in metrics.items()}
    elif mode == "predict":
        predictions = estimator.predict(lambda params: input_fn(params, seed=1, repeat=False))
        out = {"predictions": sum(1 for _ in predictions)}
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out


def main(mode: str, model_dir: str, steps: int, timeout_ms: int = 0) -> None:
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.WARN)
    print(json.dumps(run(mode, model_dir, steps, timeout_ms=timeout_ms)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3], *map(int, sys.argv[3:]))
