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
    FEATURES,
    TABLE_BATCH,
    TABLE_STEPS,
    TABLES,
    assert_tables_equal,
    initial_tables,
    input_fn_of,
    oracle_embedding,
    random_batch,
    random_targets,
    regression_model_fn,
    replay,
    table_spec,
    train_and_replay,
    zeros_slots,
)
from tensorflow.python.tpu import tpu_embedding

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator

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
    for _ in range(TABLE_STEPS):
        bias -= BIAS_LEARNING_RATE * (bias - 1.0)
    np.testing.assert_allclose(reader.get_tensor("bias"), bias, rtol=1e-6)
    assert reader.get_tensor("global_step") == TABLE_STEPS


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
    for _ in range(TABLE_STEPS):
        bias -= BIAS_LEARNING_RATE * (bias - 1.0)
    np.testing.assert_allclose(reader.get_tensor("bias"), bias, rtol=1e-6)


def test_pipeline_execution_with_tensor_core_accepted(tmp_path):
    """Accepted; lookups still see the previous step's update (docs/estimator.md)."""
    reader, model, emb = train_and_replay(
        tmp_path, tpu_embed_adam.AdamParameters(0.05), pipeline_execution_with_tensor_core=True
    )
    assert emb.config_proto.pipeline_execution_with_tensor_core
    assert_tables_equal(reader, model)


class ReadTables(tf.compat.v1.train.SessionRunHook):
    """Reads the table variables after every step, in a run of their own (as a hook would)."""

    def __init__(self, sink: list[dict[str, np.ndarray]]):
        self._sink = sink

    def begin(self) -> None:
        self._vars = {
            t: v
            for t in TABLES
            for v in tf.compat.v1.global_variables()
            if v.op.name == f"{t}/part_0"
        }

    def after_run(self, run_context, run_values) -> None:
        self._sink.append(run_context.session.run(self._vars))


@pytest.mark.parametrize("iterations_per_loop", [1, 2])
def test_table_variables_are_fresh_after_every_loop(tmp_path, iterations_per_loop):
    initial = initial_tables()
    spec = table_spec(tpu_embed_adam.AdamParameters(0.05), initial)
    emb = oracle_embedding(spec, TABLE_BATCH)
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, emb, min_ids_per_sample=0) for _ in range(TABLE_STEPS)]
    targets = [random_targets(rng, emb) for _ in range(TABLE_STEPS)]
    fetched, read = [], []
    config = tf.compat.v1.estimator.tpu.RunConfig(
        model_dir=str(tmp_path),
        save_checkpoints_steps=1000,
        tpu_config=tf.compat.v1.estimator.tpu.TPUConfig(iterations_per_loop=iterations_per_loop),
    )
    estimator = TPUEstimator(
        model_fn=regression_model_fn(list(FEATURES), fetched),
        config=config,
        use_tpu=False,
        embedding_config_spec=spec,
        train_batch_size=TABLE_BATCH,
    )
    estimator.train(
        input_fn_of(batches, targets, TABLE_BATCH),
        max_steps=TABLE_STEPS,
        hooks=[ReadTables(read)],
    )
    assert len(read) == TABLE_STEPS
    for step in range(1, TABLE_STEPS + 1):
        # What a TPU's variables hold after this step: the tables as of the
        # end of the last loop.
        done = step - step % iterations_per_loop
        model = replay(emb, zeros_slots(initial), batches[:done], targets[:done], fetched[:done])
        for table in TABLES:
            np.testing.assert_array_equal(
                read[step - 1][table], model.state[table].w, err_msg=f"{table} after step {step}"
            )
