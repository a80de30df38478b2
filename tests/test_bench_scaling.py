"""Smoke run of benchmarks/bench_scaling.py in its quick mode (about 15 s): table, JSON, PNG."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scaling.py"


@pytest.mark.slow
def test_quick_run_writes_every_path_and_size(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--json={tmp_path / 'r.json'}",
         f"--png={tmp_path / 'r.png'}"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    assert "x smallest" in out.stdout
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["path"], r["rows"]) for r in rows] == [
        (path, size) for path in ("lazy", "non_lazy", "engine") for size in (10_000, 100_000)
    ]
    for r in rows:
        assert r["ms"] > 0 and r["table_mb"] > 0 and r["beside_mb"] > 0
        smallest = next(s for s in rows if s["path"] == r["path"])
        assert r["x_smallest"] == pytest.approx(r["ms"] / smallest["ms"])
