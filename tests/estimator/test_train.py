"""TPUEstimator(use_tpu=False) trains the spec's tables with TPU Adam on the engine.

Each test replays the steps in numpy (`reference.adam_update` through the
engine harness's `NumpyModel`) from the activations TF backpropagated from,
and compares every table and slot of the final checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from estimator_harness import (
    BIAS_LEARNING_RATE,
    input_fn_of,
    oracle_embedding,
    random_batch,
    random_targets,
    regression_model_fn,
    replay,
    zeros_slots,
)
from tensorflow.python.tpu import tpu_embedding

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator

BATCH = 6
STEPS = 4
_TABLES = {"t_mean": (23, 4, "mean"), "t_sum": (17, 3, "sum"), "t_sqrtn": (11, 2, "sqrtn")}
_FEATURES = {
    "a": ("t_mean", 0),
    "s": ("t_mean", 3),
    "b": ("t_sum", 0),
    "d": ("t_sum", 0),
    "c": ("t_sqrtn", 0),
}


def _initial_tables(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.normal(size=(v, d)).astype(np.float32) for t, (v, d, _) in _TABLES.items()}


def table_spec(
    params, initial, partition_strategy="div", table_rates=None, rate_fns=None, **spec_kwargs
):
    """An EmbeddingConfigSpec of `_TABLES` and `_FEATURES` (tables start at `initial`).

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
        for t, (v, d, c) in _TABLES.items()
    }
    features = {
        f: tpu_embedding.FeatureConfig(t, max_sequence_length=n) for f, (t, n) in _FEATURES.items()
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
    kwargs.setdefault("train_batch_size", BATCH)
    kwargs.setdefault("eval_batch_size", BATCH)
    return estimator_class(
        model_fn=model_fn, config=config, use_tpu=False, embedding_config_spec=spec, **kwargs
    )


def train_and_replay(
    tmp_path,
    params,
    steps=STEPS,
    seed=0,
    estimator_class=TPUEstimator,
    optimizer=None,
    dynamic_rates=None,
    **spec_kwargs,
):
    """Trains `steps` steps; returns (checkpoint reader, numpy model replayed, oracle emb)."""
    initial = _initial_tables()
    spec = table_spec(params, initial, **spec_kwargs)
    emb = oracle_embedding(spec, BATCH)
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, emb, min_ids_per_sample=0) for _ in range(steps)]
    targets = [random_targets(rng, emb) for _ in range(steps)]
    fetched: list = []
    estimator = make_estimator(
        regression_model_fn(list(_FEATURES), fetched, optimizer), spec, tmp_path, estimator_class
    )
    estimator.train(input_fn_of(batches, targets, BATCH), max_steps=steps)
    assert len(fetched) == steps
    model = replay(emb, zeros_slots(initial), batches, targets, fetched, dynamic_rates)
    return tf.train.load_checkpoint(str(tmp_path)), model, emb


def assert_tables_equal(reader, model, names=None):
    for table, want in model.state.items():
        name = (names or {}).get(table, table)
        for slot, suffix in (("w", ""), ("m", "/Adam/m"), ("v", "/Adam/v")):
            got = reader.get_tensor(name + suffix)
            np.testing.assert_array_equal(got, getattr(want, slot), err_msg=f"{name}{suffix}")


PARAMS = {
    "default": tpu_embed_adam.AdamParameters(0.05),
    "tf_class": tpu_embedding.AdamParameters(0.05, beta1=0.8),
    "non_lazy_clip_decay": tpu_embed_adam.AdamParameters(
        0.02,
        lazy_adam=False,
        sum_inside_sqrt=False,
        clip_gradient_min=-0.5,
        clip_gradient_max=0.5,
        clip_weight_min=-1.5,
        clip_weight_max=1.5,
        weight_decay_factor=0.01,
        multiply_weight_decay_factor_by_learning_rate=True,
    ),
    "no_accumulation": tpu_embed_adam.AdamParameters(0.03, use_gradient_accumulation=False),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_tables_and_slots_equal_reference(tmp_path, name):
    reader, model, _ = train_and_replay(tmp_path, PARAMS[name])
    assert_tables_equal(reader, model)
    # The dense bias trained with the model_fn's SGD: b <- b - lr * (b - 1).
    bias = 0.0
    for _ in range(STEPS):
        bias -= BIAS_LEARNING_RATE * (bias - 1.0)
    np.testing.assert_allclose(reader.get_tensor("bias"), bias, rtol=1e-6)
    assert reader.get_tensor("global_step") == STEPS


def test_per_table_learning_rates_and_mod_sharding(tmp_path):
    reader, model, emb = train_and_replay(
        tmp_path,
        tpu_embed_adam.AdamParameters(0.05),
        partition_strategy="mod",
        table_rates={"t_sum": 0.2, "t_sqrtn": 0.01},
    )
    assert emb.table_to_config_dict["t_sum"].learning_rate == 0.2
    assert_tables_equal(reader, model)


def test_dynamic_learning_rates(tmp_path):
    """learning_rate_fn(global step before the update), per table, beside constant ones."""
    reader, model, _ = train_and_replay(
        tmp_path,
        tpu_embed_adam.AdamParameters(0.05),
        rate_fns={
            "t_mean": lambda step: 0.2 / (1.0 + tf.cast(step, tf.float32)),
            "t_sqrtn": lambda step: 0.01 * tf.cast(step + 1, tf.float32),
        },
        dynamic_rates=lambda step: {
            "t_mean": np.float32(0.2) / (np.float32(1.0) + np.float32(step)),
            "t_sqrtn": np.float32(0.01) * np.float32(step + 1),
        },
    )
    assert_tables_equal(reader, model)


def test_cross_shard_optimizer_in_model_fn(tmp_path):
    """TPU programs wrap their optimizer in CrossShardOptimizer: one replica here."""
    reader, model, _ = train_and_replay(
        tmp_path,
        tpu_embed_adam.AdamParameters(0.05),
        optimizer=lambda: tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(BIAS_LEARNING_RATE)
        ),
    )
    assert_tables_equal(reader, model)
    bias = 0.0
    for _ in range(STEPS):
        bias -= BIAS_LEARNING_RATE * (bias - 1.0)
    np.testing.assert_allclose(reader.get_tensor("bias"), bias, rtol=1e-6)
