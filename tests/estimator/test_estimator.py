"""The constructor and the export of `TPUEstimator` on the engine."""

from __future__ import annotations

import contextlib
import inspect
import logging

import pytest
import tensorflow as tf
from estimator_harness import TABLE_BATCH, TF_TPU_ESTIMATOR, initial_tables, table_spec
from tensorflow.python.util import deprecation

import tpu_embed_adam
from tpu_embed_adam.estimator import TPUEstimator


def _model_fn(features, labels, mode, params):
    raise AssertionError("never called")


@pytest.mark.parametrize("installed", [True, False], ids=["tf_class_installed", "ours"])
def test_deprecation_warning_names_the_callers_line_once(tmp_path, monkeypatch, caplog, installed):
    """TF's warning names the line that constructs the estimator, not this package."""
    monkeypatch.setattr(deprecation, "_PRINTED_WARNING", {})  # As in a fresh process.
    kwargs = dict(
        model_fn=_model_fn,
        config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(tmp_path)),
        use_tpu=False,
        train_batch_size=TABLE_BATCH,
        embedding_config_spec=table_spec(tpu_embed_adam.AdamParameters(0.1), initial_tables()),
    )
    estimator_class = TF_TPU_ESTIMATOR if installed else TPUEstimator
    install = tpu_embed_adam.installed() if installed else contextlib.nullcontext()
    with install, caplog.at_level(logging.WARNING):
        for _ in range(2):
            line = inspect.currentframe().f_lineno + 1
            estimator_class(**kwargs)
    messages = [r.getMessage() for r in caplog.records if "TPUEstimator.__init__" in r.getMessage()]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"From {__file__}:{line}: TPUEstimator.__init__ (from "), messages
