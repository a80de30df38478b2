"""Smoke run of benchmarks/bench_scale.py, both paths, tiny: TF's byte count equals the model."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["graph", "estimator"])
def test_bytes_between_processes_equal_the_model(path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), f"--path={path}", "--rows=20000", "--dim=16", "--ids=512",
         "--iters=2", "--warmup=1", "--hosts=1", "--hosts=2"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["configuration"] for r in rows] == ["single process", "1 workers", "2 workers"]
    for r in rows:
        assert r["step_ms"] > 0
        # The model leaves out a few scalars (the refresh's predicate: 1 byte).
        assert 0 <= r["bytes_between_processes"] - r["model_bytes"] <= 64, r
    assert rows[2]["model_bytes"] > rows[1]["model_bytes"] >= 0
