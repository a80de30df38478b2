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
    NumpyModel,
    input_fn_of,
    oracle_embedding,
    random_batch,
    random_targets,
    regression_model_fn,
    replay,
    sparse_feature,
    zeros_slots,
)

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator

BATCH = 5
STEPS = 3
WIDTH = 8
TF_TPU_ESTIMATOR = TPUEstimator.__mro__[1]
# Column feature key -> checkpoint name of its table (TPUEstimator's names on a TPU).
TABLE_NAMES = {
    "tbl_user": "dense_features/user_embedding/embedding_weights",
    "tbl_hist_item_shared_embedding": "hist_item_shared_embedding",
}


def _initial() -> dict[str, np.ndarray]:
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


class Run:
    """One estimator, its batches, and the numpy replay of its training."""

    def __init__(self, tmp_path, estimator_class=TPUEstimator, seed=0, **spec_kwargs):
        self.initial = _initial()
        self.cols = columns(self.initial)
        self.spec = spec_of(self.cols, **spec_kwargs)
        self.emb = oracle_embedding(self.spec, BATCH)
        self.features = list(self.emb.feature_to_config_dict)
        rng = np.random.default_rng(seed)
        self.batches = [random_batch(rng, self.emb, max_ids_per_sample=4) for _ in range(STEPS + 1)]
        self.targets = [random_targets(rng, self.emb) for _ in range(STEPS + 1)]
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
            train_batch_size=BATCH,
            eval_batch_size=BATCH,
            predict_batch_size=BATCH,
            export_to_tpu=False,
            embedding_config_spec=self.spec,
        )
        self.model_dir = str(tmp_path)

    def train(self):
        self.estimator.train(
            input_fn_of(self.batches[:STEPS], self.targets[:STEPS], BATCH, WIDTH), max_steps=STEPS
        )
        return tf.train.load_checkpoint(self.model_dir)

    def replayed(self) -> NumpyModel:
        return replay(
            self.emb,
            zeros_slots(self.initial),
            self.batches[:STEPS],
            self.targets[:STEPS],
            self.fetched,
        )


def trained_model(reader, emb) -> NumpyModel:
    return NumpyModel(emb, zeros_slots({t: reader.get_tensor(n) for t, n in TABLE_NAMES.items()}))


def test_columns_train_with_tpu_adam_under_tpu_names(tmp_path):
    run = Run(tmp_path)
    reader = run.train()
    want = run.replayed()
    names = dict(reader.get_variable_to_shape_map())
    for table, name in TABLE_NAMES.items():
        for slot, suffix in (("w", ""), ("m", "/Adam/m"), ("v", "/Adam/v")):
            assert names[name + suffix] == list(want.state[table].w.shape)
            np.testing.assert_array_equal(
                reader.get_tensor(name + suffix), getattr(want.state[table], slot)
            )


def test_plain_tf_and_uninstall_leave_tables_to_the_model_optimizer(tmp_path):
    """TF's own class, never installed or after uninstall(): no Adam slots, other tables."""
    tpu_embed_adam.install()
    tpu_embed_adam.uninstall()
    reader = Run(tmp_path / "tf", estimator_class=TF_TPU_ESTIMATOR).train()
    names = dict(reader.get_variable_to_shape_map())
    assert not [n for n in names if "Adam" in n]
    ours = Run(tmp_path / "ours")
    ours.train()
    want = ours.replayed()
    for table, name in TABLE_NAMES.items():
        assert not np.array_equal(reader.get_tensor(name), want.state[table].w)


def test_install_gives_tf_class_the_engine(tmp_path):
    with tpu_embed_adam.installed():
        run = Run(tmp_path, estimator_class=TF_TPU_ESTIMATOR)
        reader = run.train()
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name + "/Adam/v"), want.state[table].v)
    assert TF_TPU_ESTIMATOR.__init__ is not TPUEstimator.__init__


def test_evaluate_predict_and_export_read_the_trained_tables(tmp_path):
    run = Run(tmp_path)
    reader = run.train()
    model = trained_model(reader, run.emb)
    batch, target = run.batches[STEPS], run.targets[STEPS]
    # EVAL: the engine in inference mode.
    metrics = run.estimator.evaluate(input_fn_of([batch], [target], BATCH, WIDTH), steps=1)
    _, loss, _, _ = model.forward_backward(batch, target)
    bias = reader.get_tensor("bias")
    np.testing.assert_allclose(metrics["mean_loss"], loss + 0.5 * (bias - 1) ** 2, rtol=1e-5)
    want = model.activations(batch[0])

    # PREDICT: TF's CPU lookups of the same variables.
    def features_only(params):
        dataset = input_fn_of([batch], [target], BATCH, WIDTH)(params)
        return dataset.map(lambda features, labels: features)

    predictions = list(run.estimator.predict(features_only))
    for f in run.features:
        np.testing.assert_allclose(
            np.stack([p[f] for p in predictions]), want[f], rtol=1e-6, atol=1e-6
        )

    # A SavedModel that serves the same lookups without the engine.
    def receiver():
        inputs = {f: tf.compat.v1.sparse_placeholder(tf.int64, name=f) for f in run.features}
        return tf.estimator.export.ServingInputReceiver(inputs, inputs)

    export_dir = run.estimator.export_saved_model(str(tmp_path / "export"), receiver)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], export_dir)
        signature = meta.signature_def["serving_default"]
        feed = {}
        for f in run.features:
            st = sess.run(sparse_feature(batch[0][f], BATCH, WIDTH))
            info = signature.inputs[f].coo_sparse
            feed[info.indices_tensor_name] = st.indices
            feed[info.values_tensor_name] = st.values
            feed[info.dense_shape_tensor_name] = st.dense_shape
        fetch = {f: signature.outputs[f].name for f in run.features}
        served = sess.run(fetch, feed)
    for f in run.features:
        np.testing.assert_allclose(served[f], want[f], rtol=1e-6, atol=1e-6)


def test_train_and_evaluate_and_warm_start(tmp_path):
    run = Run(tmp_path / "first")
    train_spec = tf.estimator.TrainSpec(
        input_fn_of(run.batches[:STEPS], run.targets[:STEPS], BATCH, WIDTH), max_steps=STEPS
    )
    eval_spec = tf.estimator.EvalSpec(
        input_fn_of(run.batches[STEPS:], run.targets[STEPS:], BATCH, WIDTH),
        steps=1,
        throttle_secs=0,
    )
    metrics, _ = tf.estimator.train_and_evaluate(run.estimator, train_spec, eval_spec)
    assert metrics["global_step"] == STEPS
    reader = tf.train.load_checkpoint(run.model_dir)
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name), want.state[table].w)
    # Warm start a second model from the first's tables and their Adam slots
    # (non-trainable variables: a list of patterns selects them), then check
    # that it continues from them.
    second = Run(tmp_path / "second")
    second.estimator = TPUEstimator(
        model_fn=regression_model_fn(
            second.features, second.fetched, layer=column_layer(second.cols)
        ),
        config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(tmp_path / "second")),
        use_tpu=False,
        train_batch_size=BATCH,
        eval_batch_size=BATCH,
        embedding_config_spec=second.spec,
        warm_start_from=tf.estimator.WarmStartSettings(
            run.model_dir, vars_to_warm_start=[".*embedding.*"]
        ),
    )
    second.train()
    replayed = replay(
        second.emb,
        {t: want.state[t] for t in TABLE_NAMES},
        second.batches[:STEPS],
        second.targets[:STEPS],
        second.fetched,
    )
    reader2 = tf.train.load_checkpoint(str(tmp_path / "second"))
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader2.get_tensor(name), replayed.state[table].w)


@pytest.mark.parametrize("partition_strategy", ["div", "mod"])
def test_partition_strategies(tmp_path, partition_strategy):
    run = Run(tmp_path, partition_strategy=partition_strategy)
    reader = run.train()
    want = run.replayed()
    for table, name in TABLE_NAMES.items():
        np.testing.assert_array_equal(reader.get_tensor(name), want.state[table].w)
