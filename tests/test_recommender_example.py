"""Smoke test: the TPUEstimator recommender trains on CPU, learns, and saves Adam slots."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "recommender_estimator.py"


def test_recommender_learns_and_checkpoints_tpu_adam_slots(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps=300", "--log_every=100", "--eval_steps=10",
         f"--model_dir={tmp_path}"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"step 100  loss \d+\.\d+  \d+\.\d+ steps/s", result.stderr), (
        result.stderr[-4000:]
    )
    match = re.search(r"auc (\d\.\d+)  accuracy (\d\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr[-4000:]
    auc, accuracy = map(float, match.groups())
    assert auc > 0.55, result.stdout
    assert accuracy > 0.55, result.stdout
    # Both tables, each with TPU Adam's slots, under TPUEstimator's names.
    for table in ("dense_features/user_embedding/embedding_weights",
                  "history_item_shared_embedding"):
        for suffix in ("", "/Adam/m", "/Adam/v"):
            assert re.search(rf"^  {re.escape(table + suffix)}  \[", result.stdout, re.M), (
                result.stdout
            )
