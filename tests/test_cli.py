"""The `tpu-embed-adam` command line, run as a user runs it."""

import json
import subprocess
import sys

from tpu_embed_adam import AdamParameters


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tpu_embed_adam.cli", *args], capture_output=True, text=True
    )


def test_params_json_round_trips():
    out = _cli("params", "--learning_rate=0.05", "--clip_gradient_max=1", "--nolazy_adam")
    assert out.returncode == 0, out.stderr[-2000:]
    params = AdamParameters.from_json(out.stdout)
    assert params == AdamParameters(0.05, clip_gradient_max=1.0, lazy_adam=False)
    assert json.loads(out.stdout)["lazy_adam"] is False


def test_params_hex_decodes(tmp_path):
    out = _cli("params", "--learning_rate=0.25", "--weight_decay_factor=0.5", "--format=hex")
    assert out.returncode == 0, out.stderr[-2000:]
    path = tmp_path / "params.pb"
    path.write_bytes(bytes.fromhex(out.stdout.strip()))
    decoded = _cli("decode", str(path))
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    assert AdamParameters.from_json(decoded.stdout) == AdamParameters(0.25, weight_decay_factor=0.5)


def test_bad_input_exits_2_naming_the_argument(tmp_path):
    out = _cli("params", "--learning_rate=-1")
    assert out.returncode == 2 and "`learning_rate`" in out.stderr
    corrupt = tmp_path / "bad.pb"
    corrupt.write_bytes(b"\xff\xff")
    out = _cli("decode", str(corrupt))
    assert out.returncode == 2 and "do not parse" in out.stderr
    assert _cli("frobnicate").returncode == 2


def test_info_reports_the_kernel_library():
    out = _cli("info")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernel library: loaded" in out.stdout
    assert "LoadTPUEmbeddingADAMParameters" in out.stdout
