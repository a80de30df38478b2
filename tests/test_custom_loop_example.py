"""Smoke test: the TF2 custom loop trains its tables with apply_adam and the loss falls."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_loop_tf2.py"


def test_custom_loop_trains_and_loss_falls():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps=200", "--log_every=50"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tf.tpu.experimental.embedding.Adam(learning_rate=0.02" in result.stdout, result.stdout
    assert re.search(r"step 50  loss \d+\.\d+  \d+\.\d+ steps/s", result.stderr), (
        result.stderr[-4000:]
    )
    losses = [float(x) for x in re.findall(r"step \d+  loss (\d+\.\d+)", result.stderr)]
    assert len(losses) == 5, result.stderr[-4000:]  # steps 1, 50, 100, 150, 200
    assert losses[-1] < losses[1] < losses[0], losses
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+) over 200 steps", result.stdout)
    assert match, result.stdout
    first, last = map(float, match.groups())
    assert last < 0.9 * first, (first, last)
