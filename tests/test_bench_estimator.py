"""Smoke run of benchmarks/bench_estimator.py in its quick mode: every variant, ratios, PNG."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_estimator.py"
VARIANTS = {
    "engine",
    "gather_lazyadam",
    "gather_apply_adam",
    "feature_column_lazyadam",
    "tf_tpu_estimator",
    "keras",
    "tf2_embedding",
}


@pytest.mark.slow
def test_quick_run_reports_every_variant_with_ratios_memory_and_breakdown(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--breakdown", f"--json={tmp_path / 'r.json'}",
         f"--png={tmp_path / 'r.png'}"],
        capture_output=True, text=True, timeout=900, check=True,
    )
    assert "conditions:" in out.stdout and "THP" in out.stdout
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["conditions"]["cpus"] >= 1 and results["conditions"]["copy_gb_per_s"] > 0
    (cell,) = results["cells"]
    assert (cell["rows"], cell["batch"]) == (10_000, 128)
    assert set(cell["variants"]) == VARIANTS
    engine = cell["variants"]["engine"]
    (engine_run,) = engine["runs"]
    for name, entry in cell["variants"].items():
        if "skipped" in entry:
            assert name == "tf2_embedding"  # only the TF2 path may be missing
            continue
        (run,) = entry["runs"]
        assert run["examples_per_s"] > 0 and run["peak_rss_mb"] > run["table_mb"] > 0
        assert run["load_before"] >= 0 and run["load_after"] >= 0
        if name != "engine":
            assert entry["engine_ratio"] == pytest.approx(
                engine_run["examples_per_s"] / run["examples_per_s"]
            )
    # The engine's step, broken down: its own ops and TF's.
    parts = engine_run["breakdown"]["parts_ms"]
    assert {"enqueue", "Recv (lookup)", "Send (gradients, update)"} <= set(parts)
    assert "table update (LazyAdam)" in cell["variants"]["gather_lazyadam"]["runs"][0][
        "breakdown"]["parts_ms"]
    assert "table update (apply_adam)" in cell["variants"]["gather_apply_adam"]["runs"][0][
        "breakdown"]["parts_ms"]
    assert "Send (gradients, update)" in out.stdout
