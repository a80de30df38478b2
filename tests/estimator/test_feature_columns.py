"""TPUEstimator with TPU embedding feature columns: train, evaluate, predict, export.

The columns read the engine's activations in TRAIN and EVAL, as on a TPU; the
tables are saved under the names TPUEstimator gives them on a TPU, which are
also the names TF's CPU lookups use, so PREDICT and the exported SavedModel
serve the trained tables.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from estimator_harness import (
    COLUMN_BATCH,
    COLUMN_STEPS,
    TABLE_NAMES,
    TF_TPU_ESTIMATOR,
    WIDTH,
    ColumnRun,
    column_layer,
    input_fn_of,
    regression_model_fn,
    replay,
    serve,
    serving_receiver,
    trained_model,
)

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator


def test_plain_tf_and_uninstall_leave_tables_to_the_model_optimizer(tmp_path):
    """TF's own class, never installed or after uninstall(): no Adam slots, other tables."""
    tpu_embed_adam.install()
    tpu_embed_adam.uninstall()
    reader = ColumnRun(tmp_path / "tf", estimator_class=TF_TPU_ESTIMATOR).train()
    names = dict(reader.get_variable_to_shape_map())
    assert not [n for n in names if "Adam" in n]
    ours = ColumnRun(tmp_path / "ours")
    ours.train()
    want = ours.replayed()
    for table, name in TABLE_NAMES.items():
        assert not np.array_equal(reader.get_tensor(name), want.state[table].w)


def test_install_gives_tf_class_the_engine(tmp_path):
    with tpu_embed_adam.installed():
        run = ColumnRun(tmp_path, estimator_class=TF_TPU_ESTIMATOR)
        reader = run.train()
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name + "/Adam/v"), want.state[table].v)
    assert TF_TPU_ESTIMATOR.__init__ is not TPUEstimator.__init__


def test_evaluate_predict_and_export_read_the_trained_tables(tmp_path):
    run = ColumnRun(tmp_path)
    reader = run.train()
    model = trained_model(reader, run.emb)
    batch, target = run.batches[COLUMN_STEPS], run.targets[COLUMN_STEPS]
    # EVAL: the engine in inference mode.
    metrics = run.estimator.evaluate(input_fn_of([batch], [target], COLUMN_BATCH, WIDTH), steps=1)
    _, loss, _, _ = model.forward_backward(batch, target)
    bias = reader.get_tensor("bias")
    np.testing.assert_allclose(metrics["mean_loss"], loss + 0.5 * (bias - 1) ** 2, rtol=1e-5)
    want = model.activations(batch[0])

    # PREDICT: TF's CPU lookups of the same variables.
    def features_only(params):
        dataset = input_fn_of([batch], [target], COLUMN_BATCH, WIDTH)(params)
        return dataset.map(lambda features, labels: features)

    predictions = list(run.estimator.predict(features_only))
    for f in run.features:
        np.testing.assert_allclose(
            np.stack([p[f] for p in predictions]), want[f], rtol=1e-6, atol=1e-6
        )

    # A SavedModel that serves the same lookups without the engine.
    export_dir = run.estimator.export_saved_model(
        str(tmp_path / "export"), serving_receiver(run.features)
    )
    served = serve(export_dir, batch[0], run.features)
    for f in run.features:
        np.testing.assert_allclose(served[f], want[f], rtol=1e-6, atol=1e-6)


def test_train_and_evaluate_and_warm_start(tmp_path):
    run = ColumnRun(tmp_path / "first")
    train_spec = tf.estimator.TrainSpec(
        input_fn_of(run.batches[:COLUMN_STEPS], run.targets[:COLUMN_STEPS], COLUMN_BATCH, WIDTH),
        max_steps=COLUMN_STEPS,
    )
    eval_spec = tf.estimator.EvalSpec(
        input_fn_of(run.batches[COLUMN_STEPS:], run.targets[COLUMN_STEPS:], COLUMN_BATCH, WIDTH),
        steps=1,
        throttle_secs=0,
    )
    metrics, _ = tf.estimator.train_and_evaluate(run.estimator, train_spec, eval_spec)
    assert metrics["global_step"] == COLUMN_STEPS
    reader = tf.train.load_checkpoint(run.model_dir)
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name), want.state[table].w)
    # Warm start a second model from the first's tables and their Adam slots
    # (non-trainable variables: a list of patterns selects them), then check
    # that it continues from them.
    second = ColumnRun(tmp_path / "second")
    second.estimator = TPUEstimator(
        model_fn=regression_model_fn(
            second.features, second.fetched, layer=column_layer(second.cols)
        ),
        config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(tmp_path / "second")),
        use_tpu=False,
        train_batch_size=COLUMN_BATCH,
        eval_batch_size=COLUMN_BATCH,
        embedding_config_spec=second.spec,
        warm_start_from=tf.estimator.WarmStartSettings(
            run.model_dir, vars_to_warm_start=[".*embedding.*"]
        ),
    )
    second.train()
    replayed = replay(
        second.emb,
        {t: want.state[t] for t in TABLE_NAMES},
        second.batches[:COLUMN_STEPS],
        second.targets[:COLUMN_STEPS],
        second.fetched,
    )
    reader2 = tf.train.load_checkpoint(str(tmp_path / "second"))
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader2.get_tensor(name), replayed.state[table].w)


@pytest.mark.parametrize("partition_strategy", ["div", "mod"])
def test_partition_strategies(tmp_path, partition_strategy):
    run = ColumnRun(tmp_path, partition_strategy=partition_strategy)
    reader = run.train()
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name), want.state[table].w)
