"""Smoke run of benchmarks/bench_tf2_step.py in its quick mode (about 15 s): table, JSON, PNG."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_tf2_step.py"


@pytest.mark.slow
def test_quick_run_writes_every_path_and_size(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--json={tmp_path / 'r.json'}",
         f"--png={tmp_path / 'r.png'}"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    assert "x gather" in out.stdout
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = json.loads((tmp_path / "r.json").read_text())
    paths = ["tf2", "gather", "keras"]
    if importlib.util.find_spec("tensorflow_recommenders"):
        paths.append("tfrs")
    assert [(r["path"], r["rows"]) for r in rows] == [
        (path, size) for size in (10_000, 100_000) for path in paths
    ]
    for r in rows:
        gather = next(g for g in rows if g["path"] == "gather" and g["rows"] == r["rows"])
        assert r["ms"] > 0
        assert r["x_gather"] == pytest.approx(r["ms"] / gather["ms"])
