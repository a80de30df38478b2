"""Shared helpers of the TPUEstimator tests: models, inputs and the numpy oracle.

A model here regresses every embedding activation onto a target
(loss 0.5*|act - target|^2, as `tests/engine/harness_numpy_model.NumpyModel`
computes it) plus a dense bias trained by the model_fn's own optimizer, so a
test can replay each step in numpy: the activations TF backpropagated from
are fetched by a hook in the same `Session.run` as the step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding
from tensorflow_estimator.python.estimator.tpu import _tpu_estimator_embedding as tf_tpu_est_emb

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
from harness_numpy_model import (  # noqa: E402
    Batch,
    FeatureInput,
    NumpyModel,
    Slots,
    constant_learning_rate,
    random_batch,
    random_targets,
)

_F32 = np.float32
BIAS_LEARNING_RATE = 0.25
__all__ = [
    "Batch",
    "FeatureInput",
    "NumpyModel",
    "Slots",
    "constant_learning_rate",
    "random_batch",
    "random_targets",
]


def oracle_embedding(spec: Any, batch_size: int) -> tpu_embedding.TPUEmbedding:
    """TF's `TPUEmbedding` of `spec` for one CPU core: what `NumpyModel` replays."""
    if spec.feature_columns:
        tables, features = tf_tpu_est_emb.get_configs_from_feature_columns(spec.feature_columns)
    else:
        tables, features = spec.table_to_config_dict, spec.feature_to_config_dict
    with tf.Graph().as_default():
        return tpu_embedding.TPUEmbedding(
            tables,
            features,
            batch_size,
            tpu_embedding.TRAINING,
            master=None,
            optimization_parameters=spec.optimization_parameters,
            partition_strategy=spec.partition_strategy,
            pipeline_execution_with_tensor_core=spec.pipeline_execution_with_tensor_core,
            device_config=tpu_embedding.DeviceConfig(1, 1, "/job:localhost"),
        )


def sparse_feature(x: FeatureInput, batch_size: int, width: int) -> tf.sparse.SparseTensor:
    """`x` as the SparseTensor an input_fn gives ([batch, width] ids)."""
    indices = x.sample_indices
    if indices is None:
        indices = np.stack([np.arange(len(x.ids)), np.zeros(len(x.ids), np.int64)], 1)
    return tf.sparse.SparseTensor(indices, x.ids, [batch_size, width])


def input_fn_of(
    batches: Sequence[Batch],
    targets: Sequence[list[Mapping[str, np.ndarray]]],
    batch_size: int,
    width: int = 8,
    weight_keys: Mapping[str, str] | None = None,
) -> Callable[[Any], tf.data.Dataset]:
    """An input_fn yielding `batches` (one core each) and their targets, in order.

    Features are SparseTensors keyed by feature name; the weights of a feature
    go under `weight_keys[feature]`; labels are a dict of targets by feature.
    """

    def input_fn(params: Any) -> tf.data.Dataset:
        del params
        datasets = []
        for batch, target in zip(batches, targets, strict=True):
            (core,), (core_target,) = batch, target
            features = {f: sparse_feature(x, batch_size, width) for f, x in core.items()}
            for feature, key in (weight_keys or {}).items():
                x = core[feature]
                features[key] = tf.sparse.SparseTensor(
                    features[feature].indices, x.weights, [batch_size, width]
                )
            labels = {f: tf.constant(t) for f, t in core_target.items()}
            datasets.append(tf.data.Dataset.from_tensors((features, labels)))
        dataset = datasets[0]
        for more in datasets[1:]:
            dataset = dataset.concatenate(more)
        return dataset

    return input_fn


class FetchActivations(tf.compat.v1.train.SessionRunHook):
    """Fetches the activations of every step, in the step's own `Session.run`."""

    def __init__(self, tensors: Mapping[str, tf.Tensor], sink: list[dict[str, np.ndarray]]):
        self._tensors = dict(tensors)
        self._sink = sink

    def before_run(self, run_context: Any) -> Any:
        return tf.compat.v1.train.SessionRunArgs(self._tensors)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        self._sink.append(run_values.results)


def regression_model_fn(
    feature_names: Sequence[str],
    sink: list[dict[str, np.ndarray]] | None = None,
    optimizer: Callable[[], Any] | None = None,
    layer: Callable[[Mapping[str, Any]], Mapping[str, tf.Tensor]] | None = None,
) -> Callable[..., Any]:
    """A model_fn: loss 0.5*|act - target|^2 per feature + 0.5*(bias - 1)^2.

    Args:
      feature_names: the embedding features (the activations' keys).
      sink: where a hook appends each training step's activations.
      optimizer: builds the model_fn's optimizer (default: SGD, rate
        `BIAS_LEARNING_RATE`), which must leave the tables alone.
      layer: maps the features to the activations by name (default: TPU
        mode's features dict itself, as a `table_to_config_dict` model reads).
    """

    def model_fn(features: Any, labels: Any, mode: str, params: Any) -> Any:
        del params
        acts = dict(layer(features)) if layer else {f: features[f] for f in feature_names}
        bias = tf.compat.v1.get_variable("bias", [], initializer=tf.zeros_initializer())
        loss = 0.5 * tf.square(bias - 1.0)
        if labels is not None:
            for f in feature_names:
                loss += 0.5 * tf.reduce_sum(tf.square(acts[f] - labels[f]))
        hooks = [FetchActivations(acts, sink)] if sink is not None else []
        train_op = None
        if mode == tf.estimator.ModeKeys.TRAIN:
            opt = (
                optimizer()
                if optimizer
                else (tf.compat.v1.train.GradientDescentOptimizer(BIAS_LEARNING_RATE))
            )
            train_op = opt.minimize(loss, tf.compat.v1.train.get_global_step())
        predictions = {f: acts[f] for f in feature_names}
        return tf.compat.v1.estimator.tpu.TPUEstimatorSpec(
            mode,
            loss=loss,
            train_op=train_op,
            training_hooks=hooks,
            predictions=predictions,
            eval_metrics=(_metric_fn, [loss]) if mode == tf.estimator.ModeKeys.EVAL else None,
        )

    return model_fn


def _metric_fn(loss: tf.Tensor) -> dict[str, Any]:
    return {"mean_loss": tf.compat.v1.metrics.mean(loss)}


def replay(
    emb: tpu_embedding.TPUEmbedding,
    initial: Mapping[str, Slots],
    batches: Sequence[Batch],
    targets: Sequence[list[Mapping[str, np.ndarray]]],
    fetched: Sequence[Mapping[str, np.ndarray]],
    dynamic_rates: Callable[[int], Mapping[str, float]] | None = None,
) -> NumpyModel:
    """Replays the steps in numpy from the activations TF backpropagated from.

    `dynamic_rates(step)` gives the rates of tables with a `learning_rate_fn`
    at the 0-based global step before the update.
    """
    model = NumpyModel(emb, initial)
    rates = {t: constant_learning_rate(emb, t) for t in emb.table_to_config_dict}
    for step, (batch, target, acts) in enumerate(zip(batches, targets, fetched, strict=True)):
        step_rates = {**rates, **(dynamic_rates(step) if dynamic_rates else {})}
        model.step(batch, target, step_rates, backprop_from=[dict(acts)])
    return model


def zeros_slots(initial: Mapping[str, np.ndarray]) -> dict[str, Slots]:
    """Tables at their initial values with zero Adam slots (a fresh start)."""
    return {t: Slots(w.copy(), np.zeros_like(w), np.zeros_like(w)) for t, w in initial.items()}


# --- A model on table_to_config_dict / feature_to_config_dict (features read
# the activations directly): three tables, one per combiner, a sequence
# feature, and two features sharing a table.

TABLE_BATCH = 6
TABLE_STEPS = 4
TABLES = {"t_mean": (23, 4, "mean"), "t_sum": (17, 3, "sum"), "t_sqrtn": (11, 2, "sqrtn")}
FEATURES = {
    "a": ("t_mean", 0),
    "s": ("t_mean", 3),
    "b": ("t_sum", 0),
    "d": ("t_sum", 0),
    "c": ("t_sqrtn", 0),
}


def initial_tables(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.normal(size=(v, d)).astype(np.float32) for t, (v, d, _) in TABLES.items()}


def table_spec(
    params, initial, partition_strategy="div", table_rates=None, rate_fns=None, **spec_kwargs
):
    """An EmbeddingConfigSpec of `TABLES` and `FEATURES` (tables start at `initial`).

    `table_rates` and `rate_fns` give tables a constant learning rate or a
    `learning_rate_fn` of their own.
    """
    tables = {
        t: tpu_embedding.TableConfig(
            v,
            d,
            initializer=tf.constant_initializer(initial[t]),
            combiner=c,
            learning_rate=(table_rates or {}).get(t),
            learning_rate_fn=(rate_fns or {}).get(t),
        )
        for t, (v, d, c) in TABLES.items()
    }
    features = {
        f: tpu_embedding.FeatureConfig(t, max_sequence_length=n) for f, (t, n) in FEATURES.items()
    }
    return tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        table_to_config_dict=tables,
        feature_to_config_dict=features,
        optimization_parameters=params,
        partition_strategy=partition_strategy,
        **spec_kwargs,
    )


def make_estimator(model_fn, spec, model_dir, estimator_class=TPUEstimator, **kwargs):
    config = tf.compat.v1.estimator.tpu.RunConfig(
        model_dir=str(model_dir), save_checkpoints_steps=1000
    )
    kwargs.setdefault("train_batch_size", TABLE_BATCH)
    kwargs.setdefault("eval_batch_size", TABLE_BATCH)
    return estimator_class(
        model_fn=model_fn, config=config, use_tpu=False, embedding_config_spec=spec, **kwargs
    )


def train_and_replay(
    tmp_path,
    params,
    steps=TABLE_STEPS,
    seed=0,
    estimator_class=TPUEstimator,
    optimizer=None,
    dynamic_rates=None,
    **spec_kwargs,
):
    """Trains `steps` steps; returns (checkpoint reader, numpy model replayed, oracle emb)."""
    initial = initial_tables()
    spec = table_spec(params, initial, **spec_kwargs)
    emb = oracle_embedding(spec, TABLE_BATCH)
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, emb, min_ids_per_sample=0) for _ in range(steps)]
    targets = [random_targets(rng, emb) for _ in range(steps)]
    fetched: list = []
    estimator = make_estimator(
        regression_model_fn(list(FEATURES), fetched, optimizer), spec, tmp_path, estimator_class
    )
    estimator.train(input_fn_of(batches, targets, TABLE_BATCH), max_steps=steps)
    assert len(fetched) == steps
    model = replay(emb, zeros_slots(initial), batches, targets, fetched, dynamic_rates)
    return tf.train.load_checkpoint(str(tmp_path)), model, emb


def assert_tables_equal(reader, model, names=None):
    for table, want in model.state.items():
        name = (names or {}).get(table, table)
        for slot, suffix in (("w", ""), ("m", "/Adam/m"), ("v", "/Adam/v")):
            got = reader.get_tensor(name + suffix)
            np.testing.assert_array_equal(got, getattr(want, slot), err_msg=f"{name}{suffix}")


# --- A model on TPU embedding feature columns: an embedding column and two
# shared columns, read through TF1's DenseFeatures.

COLUMN_BATCH = 5
COLUMN_STEPS = 3
WIDTH = 8
TF_TPU_ESTIMATOR = TPUEstimator.__mro__[1]
# Column feature key -> checkpoint name of its table (TPUEstimator's names on a TPU).
TABLE_NAMES = {
    "tbl_user": "dense_features/user_embedding/embedding_weights",
    "tbl_hist_item_shared_embedding": "hist_item_shared_embedding",
}


def initial_column_tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "tbl_user": rng.normal(size=(23, 4)).astype(np.float32),
        "tbl_hist_item_shared_embedding": rng.normal(size=(17, 3)).astype(np.float32),
    }


def columns(initial, combiner="mean"):
    """The model's columns; tables start at `initial` (None: TF's initializers)."""

    def init(table):
        return None if initial is None else tf.constant_initializer(initial[table])

    fc = tf.compat.v1.feature_column
    tpu = tf.compat.v1.tpu.experimental
    user = tpu.embedding_column(
        fc.categorical_column_with_identity("user", 23),
        4,
        combiner=combiner,
        initializer=init("tbl_user"),
    )
    item, hist = tpu.shared_embedding_columns(
        [
            fc.categorical_column_with_identity("item", 17),
            fc.categorical_column_with_identity("hist", 17),
        ],
        3,
        combiner="sqrtn",
        initializer=init("tbl_hist_item_shared_embedding"),
    )
    return [user, item, hist]


def spec_of(cols, params=None, **kwargs):
    return tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=cols,
        optimization_parameters=params or tpu_embed_adam.AdamParameters(0.05),
        **kwargs,
    )


def column_layer(cols):
    """TF1's DenseFeatures over the columns, split back into one activation per feature."""
    ordered = sorted(cols, key=lambda c: c.name)
    dims = [int(c.variable_shape[-1]) for c in ordered]

    def layer(features):
        net = tf.compat.v1.keras.layers.DenseFeatures(cols)(features)
        parts = tf.split(net, dims, axis=1)
        return {c.categorical_column.key: p for c, p in zip(ordered, parts, strict=True)}

    return layer


class ColumnRun:
    """One estimator, its batches, and the numpy replay of its training."""

    def __init__(
        self, tmp_path, estimator_class=TPUEstimator, seed=0, estimator_kwargs=None, **spec_kwargs
    ):
        self.initial = initial_column_tables()
        self.cols = columns(self.initial)
        self.spec = spec_of(self.cols, **spec_kwargs)
        self.emb = oracle_embedding(self.spec, COLUMN_BATCH)
        self.features = list(self.emb.feature_to_config_dict)
        rng = np.random.default_rng(seed)
        self.batches = [
            random_batch(rng, self.emb, max_ids_per_sample=4) for _ in range(COLUMN_STEPS + 1)
        ]
        self.targets = [random_targets(rng, self.emb) for _ in range(COLUMN_STEPS + 1)]
        self.fetched: list = []
        config = tf.compat.v1.estimator.tpu.RunConfig(
            model_dir=str(tmp_path), save_checkpoints_steps=1000
        )
        self.estimator = estimator_class(
            model_fn=regression_model_fn(
                self.features, self.fetched, layer=column_layer(self.cols)
            ),
            config=config,
            use_tpu=False,
            train_batch_size=COLUMN_BATCH,
            eval_batch_size=COLUMN_BATCH,
            predict_batch_size=COLUMN_BATCH,
            embedding_config_spec=self.spec,
            **(estimator_kwargs or {}),
        )
        self.model_dir = str(tmp_path)

    def train(self):
        self.estimator.train(
            input_fn_of(
                self.batches[:COLUMN_STEPS], self.targets[:COLUMN_STEPS], COLUMN_BATCH, WIDTH
            ),
            max_steps=COLUMN_STEPS,
        )
        return tf.train.load_checkpoint(self.model_dir)

    def replayed(self) -> NumpyModel:
        return replay(
            self.emb,
            zeros_slots(self.initial),
            self.batches[:COLUMN_STEPS],
            self.targets[:COLUMN_STEPS],
            self.fetched,
        )


def trained_model(reader, emb) -> NumpyModel:
    return NumpyModel(emb, zeros_slots({t: reader.get_tensor(n) for t, n in TABLE_NAMES.items()}))


def serving_receiver(features):
    """A serving_input_receiver_fn: one sparse id placeholder per feature, named so."""

    def receiver():
        inputs = {f: tf.compat.v1.sparse_placeholder(tf.int64, name=f) for f in features}
        return tf.estimator.export.ServingInputReceiver(inputs, inputs)

    return receiver


def serve(export_dir, core, features):
    """Runs the SavedModel's serving signature on one core's batch; outputs by feature."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], export_dir)
        signature = meta.signature_def["serving_default"]
        feed = {}
        for f in features:
            st = sess.run(sparse_feature(core[f], COLUMN_BATCH, WIDTH))
            info = signature.inputs[f].coo_sparse
            feed[info.indices_tensor_name] = st.indices
            feed[info.values_tensor_name] = st.values
            feed[info.dense_shape_tensor_name] = st.dense_shape
        return sess.run({f: signature.outputs[f].name for f in features}, feed)
