"""Smoke test: TF2's TPUEmbedding docstring loop trains on CPU, checkpoints and serves."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tf2_tpu_embedding.py"


def test_docstring_loop_trains_checkpoints_and_serves(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--steps=200",
            "--steps_per_loop=50",
            f"--model_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [float(x) for x in re.findall(r"step \d+  loss (\d+\.\d+)", result.stderr)]
    assert len(losses) == 4, result.stderr[-4000:]  # steps 50, 100, 150, 200
    assert losses[-1] < losses[0], losses
    auc = re.search(r"held-out AUC (\d\.\d+)", result.stdout)
    assert auc and float(auc.group(1)) > 0.6, result.stdout
    assert "predictions equal the trained model's (max |difference| 0)" in result.stdout
    assert (tmp_path / "serving" / "saved_model.pb").exists()
    assert list(tmp_path.glob("ckpt-1.index"))
