"""Sessions that share the engine: evaluations during training, estimators in threads.

Each run's tables and slots must equal those of the same training alone,
bit for bit.
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf
from estimator_harness import (
    FEATURES,
    TABLE_BATCH,
    TABLES,
    initial_tables,
    input_fn_of,
    oracle_embedding,
    random_batch,
    random_targets,
    regression_model_fn,
    table_spec,
)

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator

STEPS = 3


def _spec_and_input(seed: int = 0):
    spec = table_spec(tpu_embed_adam.AdamParameters(0.1), initial_tables())
    emb = oracle_embedding(spec, TABLE_BATCH)
    rng = np.random.default_rng(seed)
    batches = [random_batch(rng, emb) for _ in range(STEPS)]
    targets = [random_targets(rng, emb) for _ in range(STEPS)]
    return spec, input_fn_of(batches, targets, TABLE_BATCH)


def _estimator(spec, model_dir, **config_kwargs):
    config = tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(model_dir), **config_kwargs)
    return TPUEstimator(
        model_fn=regression_model_fn(list(FEATURES)),
        config=config,
        use_tpu=False,
        train_batch_size=TABLE_BATCH,
        eval_batch_size=TABLE_BATCH,
        embedding_config_spec=spec,
    )


def _assert_trained_alone(model_dir, spec, input_fn, alone_dir):
    _estimator(spec, alone_dir).train(input_fn, max_steps=STEPS)
    got, want = tf.train.load_checkpoint(str(model_dir)), tf.train.load_checkpoint(str(alone_dir))
    assert got.get_tensor("global_step") == STEPS
    for table in TABLES:
        for name in (table, f"{table}/Adam/m", f"{table}/Adam/v"):
            np.testing.assert_array_equal(got.get_tensor(name), want.get_tensor(name), name)


def test_train_and_evaluate_evaluating_during_training(tmp_path):
    """An evaluation after each checkpoint, from inside train(), configures INFERENCE."""
    spec, input_fn = _spec_and_input()
    estimator = _estimator(spec, tmp_path / "run", save_checkpoints_steps=1)
    metrics, _ = tf.estimator.train_and_evaluate(
        estimator,
        tf.estimator.TrainSpec(input_fn, max_steps=STEPS),
        tf.estimator.EvalSpec(input_fn, steps=1, throttle_secs=0),
    )
    _assert_trained_alone(tmp_path / "run", spec, input_fn, tmp_path / "alone")
    # The last evaluation read the trained tables.
    again = _estimator(spec, tmp_path / "run").evaluate(input_fn, steps=1)
    assert metrics["mean_loss"] == again["mean_loss"]


def test_in_memory_evaluator_hook(tmp_path):
    """Evaluations from a training hook, the last one after the final step."""
    spec, input_fn = _spec_and_input()
    estimator = _estimator(spec, tmp_path / "run")
    evaluator = tf.estimator.experimental.InMemoryEvaluatorHook(
        estimator, input_fn, steps=1, every_n_iter=1
    )
    estimator.train(input_fn, max_steps=STEPS, hooks=[evaluator])
    _assert_trained_alone(tmp_path / "run", spec, input_fn, tmp_path / "alone")


def test_estimators_of_one_configuration_in_two_threads(tmp_path):
    """Same configuration, different data: each trains its own tables."""
    runs = [(*_spec_and_input(seed), tmp_path / f"run{seed}") for seed in (0, 1)]
    errors: list[BaseException] = []

    def train(spec, input_fn, model_dir):
        try:
            _estimator(spec, model_dir).train(input_fn, max_steps=STEPS)
        except BaseException as err:  # noqa: BLE001 (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=train, args=run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed, (spec, input_fn, model_dir) in enumerate(runs):
        _assert_trained_alone(model_dir, spec, input_fn, tmp_path / f"alone{seed}")
