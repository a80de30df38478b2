"""The console script's entry point: TF's C++ log lines off unless `--verbosity` asks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import logging as absl_logging

import tpu_embed_adam_cli

_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _entry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpu_embed_adam_cli", *args], capture_output=True, text=True,
        env=_ENV,
    )


@pytest.fixture(scope="module")
def tf_import_lines() -> str:
    """What TensorFlow's C++ code logs at INFO while it loads, on this machine."""
    out = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
        env=dict(_ENV, TF_CPP_MIN_LOG_LEVEL="0"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def test_no_tf_log_lines_by_default():
    out = _entry("params", "--learning_rate=1")
    assert out.returncode == 0 and out.stderr == ""


@pytest.mark.parametrize("verbosity, shown", [("0", True), ("1", True), ("-1", False)])
def test_verbosity_shows_tf_log_lines(verbosity, shown, tf_import_lines):
    if not tf_import_lines:
        pytest.skip("TensorFlow logs nothing while it loads on this machine")
    out = _entry("params", "--learning_rate=1", f"--verbosity={verbosity}")
    assert out.returncode == 0, out.stderr[-2000:]
    # 0 (info) and 1 (debug) show TF's INFO lines; -1 (warnings) hides them.
    assert ("cpu_feature_guard" in out.stderr) == ("cpu_feature_guard" in tf_import_lines and shown)
    assert (out.stderr != "") == shown


def test_library_import_keeps_tfs_log_lines(tf_import_lines):
    # Only the command line silences TF: `import tpu_embed_adam` leaves its logs alone.
    out = subprocess.run(
        [sys.executable, "-c", "import tpu_embed_adam"], capture_output=True, text=True,
        env=dict(_ENV, TF_CPP_MIN_LOG_LEVEL="0"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for line in tf_import_lines.splitlines():
        assert line.split("] ", 1)[-1] in out.stderr


@pytest.mark.parametrize(
    "argv, user_level, level, status",
    [
        (["info"], None, "3", 0),
        (["info", "--verbosity=0"], None, "0", 0),
        (["-v", "-1", "info"], None, "1", 0),
        (["info", "--verbosity=-7"], None, "3", 0),
        (["info", "--verbosity=2"], None, "0", 0),
        (["-v", "x"], None, "3", 2),
        (["info"], "1", "1", 0),  # the user's own level wins without --verbosity
        (["info", "--verbosity=-2"], "0", "2", 0),
    ],
)
def test_run_sets_tf_cpp_min_log_level(argv, user_level, level, status, monkeypatch, capsys):
    if user_level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_level)
    monkeypatch.setattr(sys, "argv", ["tpu-embed-adam", *argv])
    verbosity = absl_logging.get_verbosity()
    try:
        with pytest.raises(SystemExit) as exit_info:
            tpu_embed_adam_cli.run()
    finally:
        absl_logging.set_verbosity(verbosity)
    assert exit_info.value.code == status, capsys.readouterr().err
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level


def test_console_script_enters_here():
    script = os.path.join(os.path.dirname(sys.executable), "tpu-embed-adam")
    if not os.path.exists(script):
        pytest.skip(f"no installed console script at {script} (e.g. under Bazel)")
    out = subprocess.run([script, "info"], capture_output=True, text=True, env=_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == "" and "kernel library: loaded" in out.stdout
    with open(script) as f:
        assert "tpu_embed_adam_cli" in f.read()
