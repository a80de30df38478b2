r"""A deterministic training process for the kill-and-resume and soak tests.

TF's v1 `TPUEmbedding` graph on CPU (one host, one core, `/job:localhost`,
`harness_graph.EmbeddingGraph(local=True)`), trained through the
software engine. The data of step `s` (ids, sample indices, targets) depend
only on `s`, so any run that reaches step `s` from the same state holds the
same tables.

Every `--every` steps it copies the engine's tables and slots into TF's
variables (`retrieve_ops()`) and writes a `Saver` checkpoint
`{ckpt_dir}/ckpt-{step}`. On start it restores the newest checkpoint that the
`checkpoint` state file names (TF's `latest_checkpoint`) and loads it into the
engine (`load_ops()`), or initializes from scratch. At `--steps` it retrieves
and writes the final tables and slots to `--out` (npz: `{table}/w|m|v`).

Lines on stdout (flushed) tell the parent where it is:
  `start {step}`    resumed after `step` (0: from scratch)
  `step {step}`     step done
  `saving {step}`   about to write a checkpoint
  `in-save {step}`  inside `Saver.save`: the data files of `ckpt-{step}` are
                    written, the `checkpoint` state file not yet; with
                    `--pause_in_save_at={step}` it sleeps here (to be killed)
  `saved {step}`
  `done {step}`

  python tests/engine/train_child.py --ckpt_dir=/tmp/k --steps=40 --every=5 --out=/tmp/k.npz
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from harness_graph import EmbeddingGraph  # noqa: E402
from harness_numpy_model import Batch, random_targets  # noqa: E402
from tensorflow.python.checkpoint import checkpoint_management  # noqa: E402
from tensorflow.python.tpu import tpu_embedding as te  # noqa: E402

import tpu_embed_adam  # noqa: E402, F401  (registers the engine's kernels)

# Seeded initializers: every process starts from the same tables.
TABLES = {
    "users": te.TableConfig(vocabulary_size=64, dimension=8, combiner="sum",
                            initializer=tf.compat.v1.truncated_normal_initializer(0, 0.1, seed=1)),
    "items": te.TableConfig(vocabulary_size=32, dimension=4, combiner="mean",
                            initializer=tf.compat.v1.truncated_normal_initializer(0, 0.1, seed=2)),
}
FEATURES = {"user": te.FeatureConfig("users"), "item": te.FeatureConfig("items")}
PARAMS = te.AdamParameters(learning_rate=0.05, clip_gradient_max=5.0,
                           clip_gradient_min=-5.0, weight_decay_factor=1e-3)


def make_graph(batch_size_per_core: int = 16) -> EmbeddingGraph:
    return EmbeddingGraph(
        TABLES, FEATURES, batch_size_per_core=batch_size_per_core,
        optimization_parameters=PARAMS, local=True, weighted=("item",),
    )


def step_data(graph: EmbeddingGraph, step: int) -> tuple[Batch, list]:
    """The batch and targets of `step`: a function of the step index only."""
    rng = np.random.default_rng([7, step])
    return graph.random_batch(rng), random_targets(rng, graph.emb)


def latest_step(ckpt_dir: str) -> tuple[str | None, int]:
    path = tf.train.latest_checkpoint(ckpt_dir)
    if path is None:
        return None, 0
    match = re.search(r"ckpt-(\d+)$", path)
    assert match, path
    return path, int(match.group(1))


def dump(graph: EmbeddingGraph, path: str) -> None:
    state = graph.retrieve()
    arrays = {f"{t}/{k}": getattr(s, k) for t, s in state.items() for k in "wmv"}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="")
    parser.add_argument("--pause_in_save_at", type=int, default=-1)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    args = parser.parse_args()

    current_save = [0]
    original = checkpoint_management.update_checkpoint_state_internal

    def update_state(*a, **kw):  # the last thing Saver.save does
        say(f"in-save {current_save[0]}")
        if current_save[0] == args.pause_in_save_at:
            time.sleep(3600)
        return original(*a, **kw)

    checkpoint_management.update_checkpoint_state_internal = update_state

    graph = make_graph()
    path, start = latest_step(args.ckpt_dir)
    graph.run_init()
    if path is not None:
        graph.restore(path)
    graph.load()
    say(f"start {start}")
    prefix = os.path.join(args.ckpt_dir, "ckpt")
    for step in range(start + 1, args.steps + 1):
        batch, targets = step_data(graph, step)
        graph.train_step(batch, targets, step)
        say(f"step {step}")
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % args.every == 0:
            say(f"saving {step}")
            graph.session.run(graph.retrieve_ops)
            current_save[0] = step
            with graph.graph.as_default():
                graph.saver.save(graph.session, prefix, global_step=step)
            say(f"saved {step}")
    if args.out:
        dump(graph, args.out)
    say(f"done {args.steps}")
    graph.close()


if __name__ == "__main__":
    main()
