"""What the engine path cannot honour is refused at construction, by name."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from estimator_harness import (
    FEATURES,
    TABLE_BATCH,
    TF_TPU_ESTIMATOR,
    columns,
    initial_tables,
    input_fn_of,
    make_estimator,
    oracle_embedding,
    random_batch,
    random_targets,
    regression_model_fn,
    replay,
    spec_of,
    table_spec,
    zeros_slots,
)
from tensorflow.python.tpu import tpu_embedding

import tpu_embed_adam


def _model_fn(features, labels, mode, params):
    raise AssertionError("never called")


def _build(tmp_path, spec, **kwargs):
    return make_estimator(_model_fn, spec, tmp_path, **kwargs)


@pytest.mark.parametrize(
    "params, match",
    [
        (tpu_embedding.AdagradParameters(0.1), "Adam only; got AdagradParameters"),
        (tpu_embedding.StochasticGradientDescentParameters(0.1), "Adam only"),
        (tpu_embedding.AdamParameters(0.1, epsilon=1e-50), "epsilon"),
    ],
)
def test_optimizer_must_be_adam(tmp_path, params, match):
    with pytest.raises(ValueError, match=f"optimization_parameters: .*{match}"):
        _build(tmp_path, spec_of(columns(None), params))


def test_per_table_optimizer_named(tmp_path):
    spec = table_spec(tpu_embed_adam.AdamParameters(0.1), initial_tables())
    tables = dict(spec.table_to_config_dict)
    tables["t_sum"] = tables["t_sum"]._replace(
        optimization_parameters=tpu_embedding.AdagradParameters(0.1)
    )
    with pytest.raises(ValueError, match=r"table_to_config_dict\['t_sum'\]"):
        _build(tmp_path, spec._replace(table_to_config_dict=tables))


def test_lookup_device_columns_refused(tmp_path):
    cat = tf.compat.v1.feature_column.categorical_column_with_identity("q", 10)
    column = tf.compat.v1.tpu.experimental.embedding_column(cat, 4, embedding_lookup_device="cpu")
    with pytest.raises(ValueError, match="'q_embedding' uses embedding_lookup_device='cpu'"):
        _build(tmp_path, spec_of([column]))


@pytest.mark.parametrize("value", [None, 0, -4, 2.5, True])
def test_train_batch_size_required(tmp_path, value):
    with pytest.raises(ValueError, match=f"train_batch_size must be a positive int.*{value!r}"):
        _build(tmp_path, spec_of(columns(None)), train_batch_size=value)


@pytest.mark.parametrize("argument", ["train_batch_size", "eval_batch_size"])
def test_batch_size_beyond_int32_refused_at_construction(tmp_path, argument):
    """TF's TPUEmbeddingConfiguration holds batch sizes as int32."""
    with pytest.raises(ValueError, match=f"{argument} must be a positive int.*2147483648"):
        _build(tmp_path, spec_of(columns(None)), **{argument: 2**31})


def test_eval_batch_size_checked(tmp_path):
    with pytest.raises(ValueError, match="eval_batch_size must be a positive int"):
        _build(tmp_path, spec_of(columns(None)), eval_batch_size=-1)


def test_tf_class_checks_after_install(tmp_path):
    with tpu_embed_adam.installed():
        with pytest.raises(ValueError, match="Adam only"):
            _build(
                tmp_path,
                spec_of(columns(None), tpu_embedding.AdagradParameters(0.1)),
                estimator_class=TF_TPU_ESTIMATOR,
            )
    # Without install TF accepts it (and would ignore it on CPU).
    _build(
        tmp_path,
        spec_of(columns(None), tpu_embedding.AdagradParameters(0.1)),
        estimator_class=TF_TPU_ESTIMATOR,
    )


def test_batch_larger_than_train_batch_size_fails_naming_it(tmp_path):
    """Statically larger: at graph construction; dynamically: when the step runs."""
    spec = table_spec(tpu_embed_adam.AdamParameters(0.1), initial_tables())
    emb = oracle_embedding(spec, TABLE_BATCH + 2)
    rng = np.random.default_rng(0)
    batches, targets = [random_batch(rng, emb)], [random_targets(rng, emb)]
    estimator = make_estimator(regression_model_fn(list(FEATURES)), spec, tmp_path)
    with pytest.raises(
        ValueError, match=f"train_batch_size is {TABLE_BATCH}.*batches of {TABLE_BATCH + 2}"
    ):
        estimator.train(input_fn_of(batches, targets, TABLE_BATCH + 2), max_steps=1)

    def unknown_batch(params):
        return input_fn_of(batches, targets, TABLE_BATCH + 2)(params).map(
            lambda f, t: (
                {
                    k: tf.sparse.SparseTensor(
                        v.indices,
                        v.values,
                        tf.compat.v1.placeholder_with_default(v.dense_shape, [2]),
                    )
                    for k, v in f.items()
                },
                {
                    k: tf.compat.v1.placeholder_with_default(v, [None, *v.shape[1:]])
                    for k, v in t.items()
                },
            )
        )

    with pytest.raises(tf.errors.InvalidArgumentError, match=f"train_batch_size is {TABLE_BATCH}"):
        make_estimator(regression_model_fn(list(FEATURES)), spec, tmp_path / "dynamic").train(
            unknown_batch, max_steps=1
        )


def _ids(rows):
    values = [i for row in rows for i in row]
    return tf.RaggedTensor.from_row_lengths(
        tf.constant(values, tf.int64), [len(row) for row in rows]
    )


@pytest.mark.parametrize(
    "features, match",
    [
        (
            lambda: {"hist": tf.sparse.SparseTensor([[0, 0]], tf.constant([1], tf.int64), [2, 1])},
            r"features have no 'item'.*\['hist'\]",
        ),
        (
            lambda: {"hist": _ids([[1], [2, 3]]), "item": _ids([[1], []])},
            r"feature 'hist' is a RaggedTensor",
        ),
    ],
)
def test_embedding_features_that_cannot_be_enqueued_are_named(tmp_path, features, match):
    """Before TF's enqueue would fail on them with an error that names no feature."""
    estimator = make_estimator(_model_fn, spec_of(columns(None)), tmp_path)
    with pytest.raises(ValueError, match=match):
        estimator.train(lambda params: tf.data.Dataset.from_tensors(features()), max_steps=1)


def test_smaller_last_batch_is_padded(tmp_path):
    """A batch below train_batch_size trains as that batch alone (empty padding samples)."""
    initial = initial_tables()
    spec = table_spec(tpu_embed_adam.AdamParameters(0.1), initial)
    small = oracle_embedding(spec, TABLE_BATCH - 2)
    rng = np.random.default_rng(1)
    batches, targets = [random_batch(rng, small)], [random_targets(rng, small)]
    fetched: list = []
    estimator = make_estimator(regression_model_fn(list(FEATURES), fetched), spec, tmp_path)
    estimator.train(input_fn_of(batches, targets, TABLE_BATCH - 2), max_steps=1)
    want = replay(small, zeros_slots(initial), batches, targets, fetched)
    reader = tf.train.load_checkpoint(str(tmp_path))
    for table, state in want.state.items():
        np.testing.assert_array_equal(reader.get_tensor(table), state.w)


def test_scaffold_with_own_saver_refused(tmp_path):
    """A saver of the model_fn's would save the tables as loaded, not as trained."""
    spec = table_spec(tpu_embed_adam.AdamParameters(0.1), initial_tables())
    emb = oracle_embedding(spec, TABLE_BATCH)
    rng = np.random.default_rng(0)
    inner = regression_model_fn(list(FEATURES))

    def model_fn(features, labels, mode, params):
        tpu_spec = inner(features, labels, mode, params)
        return tpu_spec._replace(
            scaffold_fn=lambda: tf.compat.v1.train.Scaffold(saver=tf.compat.v1.train.Saver())
        )

    estimator = make_estimator(model_fn, spec, tmp_path)
    with pytest.raises(ValueError, match=r"scaffold has a saver.*RetrievingSaver"):
        estimator.train(
            input_fn_of([random_batch(rng, emb)], [random_targets(rng, emb)], TABLE_BATCH),
            max_steps=1,
        )


def test_export_to_cpu_false_refused(tmp_path):
    """Off a TPU only the CPU serving graph exports: a TPU-only export would fail at the end."""
    with pytest.raises(ValueError, match="export_to_cpu=False: .*leave export_to_cpu=True"):
        _build(tmp_path, spec_of(columns(None)), export_to_cpu=False)
