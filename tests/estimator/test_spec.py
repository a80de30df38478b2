"""TF's own `AdamParameters` in the spec, installed or not: taken as ours.

After install(), TF's estimator picks the slot names by isinstance against
the public alias, which then names ours: an instance of TF's class made
before install() matched nothing there.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from estimator_harness import (
    TABLE_NAMES,
    TF_TPU_ESTIMATOR,
    ColumnRun,
    columns,
    initial_tables,
    spec_of,
    table_spec,
)
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator
from tpu_embed_adam.estimator._spec import spec_with_our_adam


def _tpu_estimator(estimator_class, spec, model_dir):
    return estimator_class(
        model_fn=lambda features, labels, mode, params: None,
        config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(model_dir)),
        use_tpu=True,
        train_batch_size=8,
        embedding_config_spec=spec,
    )


def test_tf_class_made_before_install_trains_as_ours(tmp_path):
    tf_params = tf_tpu_embedding.AdamParameters(0.05, beta1=0.8)
    ours = tpu_embed_adam.AdamParameters(0.05, beta1=0.8)
    want = ColumnRun(tmp_path / "ours", params=ours).train()
    with tpu_embed_adam.installed():
        got = ColumnRun(tmp_path / "tf", estimator_class=TF_TPU_ESTIMATOR, params=tf_params).train()
    for name in TABLE_NAMES.values():
        for suffix in ("", "/Adam/m", "/Adam/v"):
            np.testing.assert_array_equal(
                got.get_tensor(name + suffix), want.get_tensor(name + suffix), err_msg=name + suffix
            )


def test_tpu_path_after_install_gets_ours(tmp_path):
    """use_tpu=True: TF's estimator names the slots on a TPU through the same alias."""
    spec = spec_of(columns(None), tf_tpu_embedding.AdamParameters(0.05, beta2=0.99))
    with tpu_embed_adam.installed():
        estimator = _tpu_estimator(TF_TPU_ESTIMATOR, spec, tmp_path)
    converted = estimator._ctx._embedding_config_spec.optimization_parameters
    assert converted == tpu_embed_adam.AdamParameters(0.05, beta2=0.99)


def test_tf_class_ours_refuse_is_named_on_the_tpu_path(tmp_path):
    spec = spec_of(columns(None), tf_tpu_embedding.AdamParameters(0.05, epsilon=1e-50))
    with pytest.raises(
        ValueError, match=r"embedding_config_spec\.optimization_parameters: .*epsilon"
    ):
        _tpu_estimator(TPUEstimator, spec, tmp_path)


def test_tables_own_tf_class_converted():
    spec = table_spec(tf_tpu_embedding.AdamParameters(0.05), initial_tables())
    tables = dict(spec.table_to_config_dict)
    tables["t_sum"] = tables["t_sum"]._replace(
        optimization_parameters=tf_tpu_embedding.AdamParameters(0.2, lazy_adam=False)
    )
    tables["t_mean"] = tables["t_mean"]._replace(
        optimization_parameters=tf_tpu_embedding.AdagradParameters(0.1)
    )
    converted = spec_with_our_adam(spec._replace(table_to_config_dict=tables))
    got = {t: c.optimization_parameters for t, c in converted.table_to_config_dict.items()}
    assert got["t_sum"] == tpu_embed_adam.AdamParameters(0.2, lazy_adam=False)
    assert got["t_mean"] is tables["t_mean"].optimization_parameters  # Not Adam: TF's to judge.
    assert got["t_sqrtn"] is None
    assert converted.optimization_parameters == tpu_embed_adam.AdamParameters(0.05)
    assert list(converted.table_to_config_dict) == list(tables)
