"""Smoke run of benchmarks/bench_engine_step.py on a small table: the ratio rows and their PNG."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine_step.py"


@pytest.mark.slow
def test_small_run_prints_ratio_rows_and_writes_png(tmp_path):
    png = tmp_path / "step.png"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows=2000", "--dim=8", "--ids=64", "--iters=2",
         "--warmup=1", f"--png={png}"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    # absl logs to stderr: one ratio row per id distribution.
    assert "uniform" in out.stderr and "zipf 1.2" in out.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
