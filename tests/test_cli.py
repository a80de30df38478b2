"""The `tpu-embed-adam` command line: as a user runs it (subprocess) and in-process (faster).

TF's log level (`--verbosity`) is the entry point's: tests/test_tpu_embed_adam_cli.py.
"""

import inspect
import json
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as tf_pb2

from tpu_embed_adam import AdamParameters, cli


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tpu_embed_adam_cli", *args], capture_output=True, text=True
    )


def _main(capsys, *args):
    """Runs the CLI in-process; returns (exit status, stdout, stderr)."""
    code = cli.main(["tpu-embed-adam", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command_and_the_exit_codes():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for command in ("params", "decode", "convert", "inspect", "info", "cluster", "worker"):
        assert f"\n    {command} " in out.stdout
    assert "2 usage error" in " ".join(out.stdout.split())


def test_params_flags_are_the_signature_of_adam_parameters(capsys):
    code, out, _ = _main(capsys, "params", "--help")
    assert code == 0
    for name, parameter in inspect.signature(AdamParameters).parameters.items():
        assert f"--{name}" in out
        if parameter.annotation is bool:
            assert f"--no{name}" in out
    # TF's class has no default learning rate, so the flag is required.
    code, _, err = _main(capsys, "params")
    assert code == 2
    assert err == (
        "tpu-embed-adam params: error: the following arguments are required: --learning_rate "
        "(see tpu-embed-adam params --help)\n"
    )


def test_params_json_round_trips():
    out = _cli("params", "--learning_rate=0.05", "--clip_gradient_max=1", "--nolazy_adam")
    assert out.returncode == 0, out.stderr[-2000:]
    params = AdamParameters.from_json(out.stdout)
    assert params == AdamParameters(0.05, clip_gradient_max=1.0, lazy_adam=False)
    assert json.loads(out.stdout)["lazy_adam"] is False


def test_params_bool_flags_take_absl_spellings(capsys):
    code, out, _ = _main(
        capsys, "params", "--learning_rate=1", "--sum_inside_sqrt=false",
        "--weight_decay_factor=0.5", "--multiply_weight_decay_factor_by_learning_rate",
    )
    assert code == 0
    assert AdamParameters.from_json(out) == AdamParameters(
        1.0, sum_inside_sqrt=False, weight_decay_factor=0.5,
        multiply_weight_decay_factor_by_learning_rate=True,
    )
    code, _, err = _main(capsys, "params", "--learning_rate=1", "--lazy_adam=maybe")
    assert code == 2 and "--lazy_adam: expected true or false, got 'maybe'" in err


def test_params_hex_decodes(tmp_path, capsys):
    code, out, _ = _main(
        capsys, "params", "--learning_rate=0.25", "--weight_decay_factor=0.5", "--format=hex"
    )
    assert code == 0
    path = tmp_path / "params.pb"
    path.write_bytes(bytes.fromhex(out.strip()))
    code, decoded, _ = _main(capsys, "decode", str(path))
    assert code == 0
    assert AdamParameters.from_json(decoded) == AdamParameters(0.25, weight_decay_factor=0.5)


def test_bad_flag_values_exit_2_naming_the_argument(capsys):
    code, _, err = _main(capsys, "params", "--learning_rate=-1")
    assert code == 2 and "`learning_rate`" in err and err.count("\n") == 1
    code, _, err = _main(capsys, "params", "--learning_rate=fast")
    assert code == 2 and "argument --learning_rate: invalid float value: 'fast'" in err
    code, _, err = _main(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


PARAMS = AdamParameters(0.05, beta2=0.99, clip_gradient_min=-1.0, clip_gradient_max=1.0)


@pytest.mark.parametrize("source", ["json", "pbtxt", "binary"])
@pytest.mark.parametrize("target", ["json", "pbtxt", "binary"])
def test_convert_detects_the_input_format_and_round_trips(source, target, tmp_path, capsys):
    from tpu_embed_adam import _params_formats

    path = tmp_path / f"in.{source}"
    path.write_bytes(_params_formats.write(PARAMS, source))
    assert _params_formats.detect(path.read_bytes()) == source
    out = tmp_path / f"out.{target}"
    code, stdout, err = _main(capsys, "convert", str(path), f"--to={target}", f"--out={out}")
    assert (code, stdout, err) == (0, "", "")
    assert _params_formats.read(out.read_bytes(), target) == PARAMS
    assert out.read_bytes() == _params_formats.write(PARAMS, target)


def test_convert_reads_tf_messages_and_names_other_optimizers(tmp_path, capsys):
    tf_text = tmp_path / "tf.pbtxt"
    tf_text.write_text(str(PARAMS.to_tf_proto()))
    code, out, _ = _main(capsys, "convert", str(tf_text), "--to=json")
    assert code == 0 and AdamParameters.from_json(out) == PARAMS
    sgd = tmp_path / "sgd.pbtxt"
    sgd.write_text("learning_rate { constant: 0.1 }\nstochastic_gradient_descent {}\n")
    code, _, err = _main(capsys, "convert", str(sgd), "--to=json")
    assert code == 1 and "'stochastic_gradient_descent' optimizer, not 'adam'" in err


def test_convert_binary_to_a_pipe_and_from_forced():
    out = subprocess.run(
        [sys.executable, "-m", "tpu_embed_adam_cli", "convert", "-", "--from=json", "--to=binary"],
        input=PARAMS.to_json().encode(), capture_output=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == PARAMS.to_proto().SerializeToString()


def test_convert_refuses_binary_to_a_terminal(tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text(PARAMS.to_json())
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = _main(capsys, "convert", str(path), "--to=binary")
    assert (code, out) == (2, "")
    assert err == (
        "tpu-embed-adam convert: error: --to=binary writes bytes: give --out=FILE or "
        "redirect stdout\n"
    )


def test_bad_input_exits_1_with_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code, _, err = _main(capsys, "convert", str(missing), "--to=json")
    assert (code, err) == (
        1, f"tpu-embed-adam convert: error: {missing}: No such file or directory\n"
    )
    corrupt = tmp_path / "bad.pb"
    corrupt.write_bytes(b"\xff\xff")
    code, _, err = _main(capsys, "decode", str(corrupt))
    assert code == 1 and err.startswith(f"tpu-embed-adam decode: error: {corrupt}: ")
    assert "do not parse" in err and err.count("\n") == 1
    code, _, err = _main(capsys, "convert", str(corrupt), "--to=json")
    assert code == 1 and "do not parse" in err
    bad_text = tmp_path / "bad.pbtxt"
    bad_text.write_text("learning_rate {\n  constant: fast\n}\n")
    code, _, err = _main(capsys, "convert", str(bad_text), "--to=json")
    assert code == 1 and "not a text tensorflow.tpu.OptimizationParameters: 2:13" in err
    assert err.count("\n") == 1
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    code, _, err = _main(capsys, "convert", str(empty), "--to=json")
    assert (code, err) == (1, f"tpu-embed-adam convert: error: {empty}: the input is empty\n")


@pytest.mark.parametrize("fmt", ["json", "pbtxt"])
@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_convert_reads_text_after_a_byte_order_mark(fmt, codec, tmp_path, capsys):
    from tpu_embed_adam import _params_formats

    path = tmp_path / f"in.{fmt}"
    text = _params_formats.write(PARAMS, fmt).decode()
    # Python's utf-16-le/-be write no mark: added by hand (what Windows editors write).
    mark = "\ufeff" if codec in ("utf-16-le", "utf-16-be") else ""
    path.write_bytes((mark + text).encode(codec))
    for forced in ([], [f"--from={fmt}"]):
        code, out, err = _main(capsys, "convert", str(path), "--to=json", *forced)
        assert (code, err) == (0, "") and AdamParameters.from_json(out) == PARAMS


_ARRAY = "Argument `text` must be a JSON object of argument names; received: "


@pytest.mark.parametrize(
    "content, forced, message",
    [
        (b"[1, 2]", None, _ARRAY + "[1, 2] (a JSON array)."),
        (b"[1, 2]", "json", _ARRAY + "[1, 2] (a JSON array)."),
        (b' [{"learning_rate": 0.1}]\n', None,
         _ARRAY + "[{'learning_rate': 0.1}] (a JSON array)."),
        *[(b"", forced, "the input is empty") for forced in (None, "json", "pbtxt", "binary")],
        (b" \n\t", None, "the input is empty"),
        (b" \n\t", "binary", "the input is empty"),
        (b"\xef\xbb\xbf\n", None, "the input is empty"),
        (b"\xff\xfe", None, "the input is empty"),
    ],
)
def test_convert_names_a_json_array_and_an_empty_file(content, forced, message, tmp_path, capsys):
    path = tmp_path / "in"
    path.write_bytes(content)
    code, out, err = _main(
        capsys, "convert", str(path), "--to=json", *([f"--from={forced}"] if forced else [])
    )
    assert (code, out, err) == (1, "", f"tpu-embed-adam convert: error: {path}: {message}\n")


def test_decode_names_an_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.pb"
    path.write_bytes(b"")
    assert _main(capsys, "decode", str(path)) == (
        1, "", f"tpu-embed-adam decode: error: {path}: the input is empty\n")


def test_wrong_to_exits_2(tmp_path, capsys):
    code, _, err = _main(capsys, "convert", "x.json", "--to=yaml")
    assert code == 2
    assert err == (
        "tpu-embed-adam convert: error: argument --to: invalid choice: 'yaml' (choose from "
        "'json', 'pbtxt', 'binary') (see tpu-embed-adam convert --help)\n"
    )


def test_info_reports_the_kernel_library():
    out = _cli("info")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernel library: loaded" in out.stdout
    assert "LoadTPUEmbeddingADAMParameters" in out.stdout


def test_info_lists_every_kernel_the_library_registers():
    out = _cli("info")
    assert out.returncode == 0, out.stderr[-2000:]
    listed = {
        line.split(":", 1)[0]: line.split(": ", 1)[1].split(", ")
        for line in out.stdout.splitlines()
        if line.startswith(("CPU kernels", "own ops"))
    }
    tpu_ops = next(v for k, v in listed.items() if k.startswith("CPU kernels"))
    own_ops = next(v for k, v in listed.items() if k.startswith("own ops"))
    for op in ("CrossReplicaSum", "TPUEmbeddingActivations", "EnqueueTPUEmbeddingIntegerBatch",
               "ConfigureDistributedTPU", "SendTPUEmbeddingGradients"):
        assert op in tpu_ops
    assert "TpuEmbedAdamApply" in own_ops
    assert len(tpu_ops) >= 15


_HINTED = "\n".join([
    str(PARAMS.to_tf_proto()),
    "hot_id_replication_configuration { status: MIGRATION_ONLY }",
    "low_dimensional_packing_status: ENABLED",
])


def test_convert_and_decode_keep_the_layout_hints(tmp_path, capsys):
    source = tmp_path / "tf.pbtxt"
    source.write_text(_HINTED)
    expected = text_format.Parse(_HINTED, tf_pb2.OptimizationParameters())
    code, out, _ = _main(capsys, "convert", str(source), "--to=json")
    assert code == 0
    config = json.loads(out)
    assert (config["hot_id_replication_status"], config["low_dimensional_packing_status"]) == (
        "MIGRATION_ONLY", "ENABLED")
    as_json = tmp_path / "p.json"
    as_json.write_text(out)
    binary = tmp_path / "p.pb"
    assert _main(capsys, "convert", str(as_json), "--to=binary", f"--out={binary}")[0] == 0
    assert tf_pb2.OptimizationParameters.FromString(binary.read_bytes()) == expected
    code, decoded, _ = _main(capsys, "decode", str(binary))
    assert code == 0 and json.loads(decoded) == config
    code, out, _ = _main(capsys, "params", "--learning_rate=0.05", "--beta2=0.99",
                         "--clip_gradient_min=-1", "--clip_gradient_max=1",
                         "--hot_id_replication_status=MIGRATION_ONLY",
                         "--low_dimensional_packing_status=ENABLED", "--format=text")
    assert code == 0 and text_format.Parse(out, tf_pb2.OptimizationParameters()) == expected


@pytest.mark.parametrize("fmt", ["pbtxt", "binary"])
def test_convert_and_decode_refuse_enabled_simulated_quantization(fmt, tmp_path, capsys):
    msg = PARAMS.to_tf_proto()
    msg.simulated_quantization.num_buckets = 16
    path = tmp_path / f"q.{fmt}"
    for enabled in (False, True):
        msg.simulated_quantization.enabled = enabled
        path.write_bytes(text_format.MessageToString(msg).encode() if fmt == "pbtxt"
                         else msg.SerializeToString())
        commands = [["convert", str(path), "--to=json"]] + (
            [["decode", str(path)]] if fmt == "binary" else [])
        for command in commands:
            code, out, err = _main(capsys, *command)
            if not enabled:  # no effect: read, and not written back
                assert code == 0 and AdamParameters.from_json(out) == PARAMS
                continue
            assert code == 1 and err.count("\n") == 1
            assert "Argument `simulated_quantization` is not supported" in err
            assert "received: enabled: true num_buckets: 16" in err
