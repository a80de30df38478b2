"""examples/params_tour.py runs as a user runs it."""

import pathlib
import subprocess
import sys

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "params_tour.py"


def test_params_tour_runs():
    out = subprocess.run([sys.executable, str(_EXAMPLE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tour ok: tpu_embed_adam.AdamParameters(learning_rate=0.05" in out.stdout
    assert "same as TF's: True" in out.stderr
