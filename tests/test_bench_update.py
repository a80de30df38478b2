"""Smoke run of benchmarks/bench_update.py in its quick mode (about 30 s)."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_update.py"


@pytest.mark.slow
def test_quick_run_writes_table_and_json(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "copy bandwidth probe" in out.stdout
    results = json.loads((tmp_path / "bench_update_quick.json").read_text())
    fused = [r for r in results["results"] if r["impl"] == "fused"]
    assert len(fused) == 4 and all(r["ms"] > 0 and r["x_fused"] == 1.0 for r in fused)
