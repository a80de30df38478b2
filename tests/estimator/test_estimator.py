"""The constructor and the export of `TPUEstimator` on the engine."""

from __future__ import annotations

import contextlib
import inspect
import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from estimator_harness import (
    COLUMN_STEPS,
    TABLE_BATCH,
    TF_TPU_ESTIMATOR,
    ColumnRun,
    initial_tables,
    serve,
    serving_receiver,
    table_spec,
    trained_model,
)
from tensorflow.core.protobuf import saved_model_pb2
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


def _skip_warnings(caplog):
    return [r for r in caplog.records if "skips TPUEstimator's TPU one" in r.getMessage()]


def test_default_export_writes_the_cpu_graph_and_warns_once(tmp_path, caplog):
    """export_to_tpu=True (TF's default): the CPU graph, one warning saying why not the TPU one."""
    with tpu_embed_adam.installed():
        run = ColumnRun(tmp_path, estimator_class=TF_TPU_ESTIMATOR)
        reader = run.train()
        with caplog.at_level(logging.INFO):
            export_dir = run.estimator.export_saved_model(
                str(tmp_path / "export"), serving_receiver(run.features)
            )
    [warning] = _skip_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert "export_to_tpu=False" in warning.getMessage()
    saved_model = saved_model_pb2.SavedModel.FromString(
        (pathlib.Path(export_dir.decode()) / "saved_model.pb").read_bytes()
    )
    assert [list(m.meta_info_def.tags) for m in saved_model.meta_graphs] == [["serve"]]
    core = run.batches[COLUMN_STEPS][0]
    want = trained_model(reader, run.emb).activations(core)
    served = serve(export_dir, core, run.features)
    for f in run.features:
        np.testing.assert_allclose(served[f], want[f], rtol=1e-6, atol=1e-6)

    # export_to_tpu=False: the same export, silently.
    caplog.clear()
    quiet = ColumnRun(tmp_path, estimator_kwargs={"export_to_tpu": False})
    quiet.estimator.export_saved_model(str(tmp_path / "quiet"), serving_receiver(run.features))
    assert _skip_warnings(caplog) == []
