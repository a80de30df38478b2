"""`tpu-embed-adam inspect` on checkpoints from TF's own `TPUEmbedding` variables and plain ones."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding as te

from tpu_embed_adam import _checkpoint_inspect, cli, engine

# The engine tests' harness builds TF's TPUEmbedding graph as a TPU user would.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "engine"))
from harness_graph import EmbeddingGraph  # noqa: E402
from harness_numpy_model import Slots  # noqa: E402


def _tpu_embedding_checkpoint(directory: str) -> tuple[str, dict[str, Slots]]:
    """`users` (10 x 4, 2 hosts: 2 slices) with rows 0, 3, 7 touched; `tiny` (1 x 2, 1 slice)."""
    tables = {
        "users": te.TableConfig(vocabulary_size=10, dimension=4, combiner="sum"),
        "tiny": te.TableConfig(vocabulary_size=1, dimension=2, combiner="sum"),
    }
    features = {"user": te.FeatureConfig("users"), "flag": te.FeatureConfig("tiny")}
    engine.reset()
    graph = EmbeddingGraph(
        tables, features, optimization_parameters=te.AdamParameters(0.05), num_hosts=2
    )
    rng = np.random.default_rng(0)
    state = {}
    for name, config in tables.items():
        shape = (config.vocabulary_size, config.dimension)
        m = np.zeros(shape, np.float32)
        v = np.zeros(shape, np.float32)
        touched = [0, 3, 7] if name == "users" else [0]
        m[touched] = rng.normal(size=(len(touched), shape[1]))
        v[touched] = rng.uniform(0.5, 1.0, size=(len(touched), shape[1]))
        state[name] = Slots(rng.normal(size=shape).astype(np.float32), m, v)
    try:
        graph.run_init()
        graph.write(state)
        path = graph.save(os.path.join(directory, "ckpt"))
    finally:
        graph.close()
        engine.reset()
    return path, state


@pytest.fixture(scope="module")
def tpu_checkpoint(tmp_path_factory):
    return _tpu_embedding_checkpoint(str(tmp_path_factory.mktemp("tpu")))


def _plain_checkpoint(directory: str, state: dict[str, np.ndarray]) -> str:
    """Each array a variable under its own name (so `x/part_i` names stay as written)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = {
            k: tf.compat.v1.Variable(v, name=k.replace("/", "_")) for k, v in state.items()
        }
        session.run(tf.compat.v1.global_variables_initializer())
        saver = tf.compat.v1.train.Saver(var_list=variables)
        return saver.save(session, os.path.join(directory, "ckpt"))


def test_tpu_embedding_checkpoint_tables_shards_slots_and_touched_rows(tpu_checkpoint):
    path, state = tpu_checkpoint
    tables = {t.name: t for t in _checkpoint_inspect.read_tables(path)}
    assert set(tables) == {"users", "tiny"}
    users = tables["users"]
    assert (users.shape, users.shards, users.slots) == ((10, 4), 2, ("m", "v"))
    assert users.rows_touched == 3
    assert tables["tiny"].shards == 1 and tables["tiny"].rows_touched == 1
    np.testing.assert_allclose(users.row_norms, np.linalg.norm(state["users"].w, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(users.v, state["users"].v)


def test_part_named_variables_read_as_one_table(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    m = np.zeros_like(w)
    m[4] = 1.0
    arrays = {
        "emb/part_0": w[:3], "emb/part_1": w[3:],
        "emb/Adam/m/part_0": m[:3], "emb/Adam/m/part_1": m[3:],
        "global_step": np.int64(7),
    }
    path = _plain_checkpoint(str(tmp_path), arrays)
    (table,) = _checkpoint_inspect.read_tables(path)
    assert (table.name, table.shape, table.shards, table.slots) == ("emb", (5, 3), 2, ("m",))
    assert table.rows_touched == 1 and table.v is None
    np.testing.assert_allclose(table.row_norms, np.linalg.norm(w, axis=1), rtol=1e-6)


def test_plain_variables_without_slots(tmp_path, capsys):
    path = _plain_checkpoint(str(tmp_path), {"words": np.ones((4, 2), np.float32)})
    assert cli.main(["tpu-embed-adam", "inspect", path]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["table", "shape", "shards"]
    assert line.split()[:7] == ["words", "4", "x", "2", "1", "-", "-"]
    assert line.split()[7:] == "1.414 / 1.414 / 1.414 / 1.414".split()


def test_inspect_prints_a_line_per_table_and_plots(tpu_checkpoint, tmp_path):
    path, _ = tpu_checkpoint
    png = tmp_path / "tables.png"
    out = subprocess.run(
        [sys.executable, "-m", "tpu_embed_adam_cli", "inspect", os.path.dirname(path),
         f"--plot={png}"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].split()[:7] == ["tiny", "1", "x", "2", "1", "m,v", "1/1"]
    assert lines[2].split()[:7] == ["users", "10", "x", "4", "2", "m,v", "3/10"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_checkpoints_exit_1_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert cli.main(["tpu-embed-adam", "inspect", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tpu-embed-adam inspect: error: {missing}: ") and err.count("\n") == 1
    corrupt = tmp_path / "ckpt.index"
    corrupt.write_bytes(b"\x00garbage" * 10)
    assert cli.main(["tpu-embed-adam", "inspect", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert "not a readable TF checkpoint" in err and err.count("\n") == 1
