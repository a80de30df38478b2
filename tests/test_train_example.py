"""Smoke test: the main demo trains through the engine, exits 0, and its loss falls."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tpu_embedding.py"


def test_demo_trains_and_loss_falls():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps=300", "--log_every=100", "--batch_size=256"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"steps/s", result.stderr), result.stderr[-4000:]
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+) over 300 steps", result.stderr)
    assert match, result.stderr[-4000:]
    first, last = map(float, match.groups())
    assert last < 0.8 * first, (first, last)
