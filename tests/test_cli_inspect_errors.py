"""`tpu-embed-adam inspect` on damaged or odd checkpoints: one-line errors and warnings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from tpu_embed_adam import _checkpoint_inspect, cli


def _checkpoint(directory: str, arrays: dict[str, np.ndarray]) -> str:
    """Each array a variable saved under its key (so `x/part_i` names stay as written)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = {
            k: tf.compat.v1.Variable(v, name=k.replace("/", "_")) for k, v in arrays.items()
        }
        session.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver(var_list=variables)
        return saver.save(session, os.path.join(directory, "ckpt"))


def _inspect(capsys, *args):
    """Runs `inspect` in-process; returns (exit status, stdout, stderr)."""
    code = cli.main(["tpu-embed-adam", "inspect", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_table_without_rows_exits_1_naming_it(tmp_path, capsys):
    path = _checkpoint(str(tmp_path), {"empty": np.zeros((0, 4), np.float32)})
    assert _inspect(capsys, path) == (
        1, "", f"tpu-embed-adam inspect: error: {path}: table `empty` has no rows (shape 0 x 4)\n"
    )


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_damaged_data_file_exits_1_naming_the_variable(damage, tmp_path, capsys):
    path = _checkpoint(str(tmp_path), {"emb": np.ones((64, 8), np.float32)})
    data = f"{path}.data-00000-of-00001"
    if damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    else:
        os.remove(data)
    code, out, err = _inspect(capsys, path)
    assert (code, out) == (1, "")
    assert err.startswith(f"tpu-embed-adam inspect: error: {path}: cannot read `emb`: ")
    assert err.endswith("(a data file, .data-?????-of-?????, missing or truncated?)\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["emb", "emb/Adam/v"])
def test_plot_of_a_table_holding_nan_exits_1_naming_it(bad, where, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    arrays = {"emb": np.ones((3, 2), np.float32), "emb/Adam/v": np.ones((3, 2), np.float32)}
    arrays[where][1, 0] = bad
    path = _checkpoint(str(tmp_path), arrays)
    png = tmp_path / "tables.png"
    rows, values = (1, 0) if where == "emb" else (0, 1)
    assert _inspect(capsys, path, f"--plot={png}") == (
        1, "",
        f"tpu-embed-adam inspect: error: --plot={png}: table `emb` cannot be plotted: {rows} of "
        f"its 3 rows and {values} of its Adam v values hold NaN or infinity (a histogram needs "
        "finite values; inspect without --plot summarizes it)\n",
    )
    assert not png.exists()
    code, out, err = _inspect(capsys, path)
    assert (code, err) == (0, "") and out.splitlines()[1].split()[0] == "emb"


def test_a_missing_part_is_a_warning(tmp_path, capsys):
    parts = {
        "emb/part_0": np.ones((2, 3), np.float32), "emb/part_2": np.ones((1, 3), np.float32),
        "emb/Adam/m/part_0": np.ones((2, 3), np.float32),
        "emb/Adam/m/part_2": np.ones((1, 3), np.float32),
        "whole": np.ones((2, 3), np.float32),
    }
    path = _checkpoint(str(tmp_path), parts)
    code, out, err = _inspect(capsys, path)
    assert code == 0
    assert err == (
        f"tpu-embed-adam inspect: warning: {path}: table `emb` lacks `/part_i` variables (emb: 1; "
        "emb/Adam/m: 1): its shape and statistics are those of the parts present\n"
    )
    assert [line.split()[:5] for line in out.splitlines()[1:]] == [
        ["emb", "3", "x", "3", "2"], ["whole", "2", "x", "3", "1"]]
    (table, whole) = _checkpoint_inspect.read_tables(path)
    assert table.missing_parts == {"emb": (1,), "emb/Adam/m": (1,)}
    assert whole.missing_parts == {}
