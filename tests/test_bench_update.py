"""Smoke run of benchmarks/bench_update.py in its quick mode (about 30 s): table, JSON, PNG."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_update.py"


@pytest.mark.slow
def test_quick_run_writes_table_json_and_png(tmp_path):
    png = tmp_path / "ratios.png"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--out_dir={tmp_path}", f"--png={png}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "copy bandwidth probe" in out.stdout and "conditions:" in out.stdout
    assert "random-row probe" in out.stdout
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    results = json.loads((tmp_path / "bench_update_quick.json").read_text())
    rows = results["results"]
    fused = {(r["case"], r["mode"]): r for r in rows if r["impl"] == "fused"}
    assert len(fused) == 4 and all(r["ms"] > 0 for r in fused.values())
    # Every other implementation that ran is compared with the fused kernel of
    # its own case and mode: the ratio is its time over that one.
    peers = [r for r in rows if r["impl"] != "fused" and "ms" in r]
    assert {r["impl"] for r in peers} >= {"tf_path", "numpy_reference", "fused_loop"}
    # The random-row probe: one per lazy case, with the kernel as a fraction of it.
    probes = {r["case"]: r for r in rows if r["impl"] == "random_row_probe" and "ms" in r}
    assert set(probes) == {r["case"] for r in fused.values()}
    for r in probes.values():
        assert r["fused_of_probe"] == pytest.approx(r["ms"] / fused[(r["case"], "lazy")]["ms"])
        assert r["prefetch"] in (0, 4, 8, 16) and r["threads"] >= 1
    for r in peers:
        base = fused[(r["case"], r["mode"])]
        assert r["ms"] > 0
        assert r["x_fused"] == pytest.approx(r["ms"] / base["ms"])
