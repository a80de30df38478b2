"""Training logs, once, which tables the engine trains and with which optimizer."""

from __future__ import annotations

import logging

import tensorflow as tf
from estimator_harness import TABLE_NAMES, ColumnRun, train_and_replay

import tpu_embed_adam


def _lines(caplog):
    return [r for r in caplog.records if "software TPU embedding engine trains" in r.getMessage()]


def test_training_logs_tables_and_optimizer_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_and_replay(
            tmp_path,
            tpu_embed_adam.AdamParameters(0.05, beta1=0.8),
            steps=2,
            table_rates={"t_sum": 0.2},
            rate_fns={"t_mean": lambda step: tf.constant(0.1)},
        )
    [line] = _lines(caplog)
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        "tpu_embed_adam: the software TPU embedding engine trains tables "
        "['t_mean', 't_sqrtn', 't_sum'] with "
        "tpu_embed_adam.AdamParameters(learning_rate=0.05, beta1=0.8); "
        "table 't_mean': learning_rate_fn; table 't_sum': learning_rate=0.2"
    )


def test_columns_tables_named_as_in_the_checkpoint(tmp_path, caplog):
    run = ColumnRun(tmp_path)
    with caplog.at_level(logging.INFO):
        run.train()
    [line] = _lines(caplog)
    assert f"tables {sorted(TABLE_NAMES.values())} with " in line.getMessage()
