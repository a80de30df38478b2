"""Shared helpers of the TPUEstimator tests: models, inputs and the numpy oracle.

A model here regresses every embedding activation onto a target
(loss 0.5*|act - target|^2, as `tests/engine/tpu_embedding_harness.NumpyModel`
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "engine"))
from tpu_embedding_harness import (  # noqa: E402
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
