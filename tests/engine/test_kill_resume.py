"""SIGKILL a training process mid-training and mid-save; resume from its last checkpoint.

The child (`train_child.py`) trains TF's v1 `TPUEmbedding` graph on CPU (one
core, data fixed per step index) and checkpoints every `EVERY` steps through
`retrieve_ops()` and a `Saver`. It is killed with SIGKILL (no cleanup, no
atexit) twice: once between checkpoints, and once inside `Saver.save` after
the checkpoint's data files are written but before the `checkpoint` state
file names them. Each restart resumes from the newest complete checkpoint,
loads it into the engine, and replays the lost steps; the last run reaches
`STEPS` and writes its tables and slots. They must equal, bit for bit, those
of an uninterrupted run to `STEPS` (here, in the test's own process).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import train_child

from tpu_embed_adam import engine

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 14
EVERY = 5


class Child:
    """A `train_child.py` process whose stdout lines are read as they come."""

    def __init__(self, ckpt_dir: str, steps: int, *extra: str, out: str = ""):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join([HERE, *sys.path]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "train_child.py"), f"--ckpt_dir={ckpt_dir}",
             f"--steps={steps}", f"--every={EVERY}", f"--out={out}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        self.lines: list[str] = []
        self.started = time.perf_counter()

    def wait_for(self, line: str, timeout: float = 120.0) -> None:
        """Reads lines until `line`; fails if the child exits or `timeout` passes."""
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            for got in self.proc.stdout:
                self.lines.append(got.strip())
                if got.strip() == line:
                    return
            pytest.fail(f"child exited ({self.proc.wait()}) before {line!r}: {self.lines}")
        finally:
            timer.cancel()

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def finish(self) -> float:
        self.wait_for(f"done {STEPS}")
        assert self.proc.wait(timeout=120) == 0
        return time.perf_counter() - self.started


def uninterrupted(steps: int) -> dict[str, np.ndarray]:
    """Trains to `steps` in this process (same graph, data and kernels) and reads the state."""
    engine.reset()
    graph = train_child.make_graph()
    try:
        graph.run_init()
        graph.load()
        for step in range(1, steps + 1):
            graph.train_step(*train_child.step_data(graph, step), step)
        state = graph.retrieve()
    finally:
        graph.close()
        engine.reset()
    return {f"{t}/{k}": getattr(s, k) for t, s in state.items() for k in "wmv"}


def assert_bit_exact(got_path: str, want: dict[str, np.ndarray]) -> None:
    with np.load(got_path) as got:
        assert sorted(got.files) == sorted(want)
        for name, value in want.items():
            assert got[name].dtype == np.float32
            # Bitwise: same float32 bits, not merely close.
            np.testing.assert_array_equal(got[name].view(np.uint32), value.view(np.uint32),
                                          err_msg=name)


def test_sigkill_mid_training_and_mid_save_resumes_bit_exact(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.npz")
    os.makedirs(ckpt)
    timings = {}

    # 1. Killed between checkpoints: after step 7 (last checkpoint: 5).
    first = Child(ckpt, STEPS)
    first.wait_for("step 7")
    first.sigkill()
    timings["run 1 (killed at step 7)"] = time.perf_counter() - first.started
    assert tf.train.latest_checkpoint(ckpt).endswith("ckpt-5")

    # 2. Resumes from 5; killed inside Saver.save of step 10, after its data files.
    second = Child(ckpt, STEPS, "--pause_in_save_at=10")
    second.wait_for("start 5")
    second.wait_for("in-save 10")
    second.sigkill()
    timings["run 2 (resumed at 5, killed in save 10)"] = time.perf_counter() - second.started
    assert os.path.exists(os.path.join(ckpt, "ckpt-10.index"))  # killed mid-save ...
    assert tf.train.latest_checkpoint(ckpt).endswith("ckpt-5")  # ... so 10 is not recorded

    # 3. Resumes from 5 again and finishes.
    third = Child(ckpt, STEPS, out=out)
    third.wait_for("start 5")
    timings["run 3 (resumed at 5, to the end)"] = third.finish()
    assert tf.train.latest_checkpoint(ckpt).endswith("ckpt-10")

    start = time.perf_counter()
    want = uninterrupted(STEPS)
    timings["uninterrupted, in process"] = time.perf_counter() - start
    assert_bit_exact(out, want)
    print("kill/resume timings (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))


@pytest.mark.slow
def test_random_sigkills_resume_bit_exact(tmp_path):
    """Several SIGKILLs at random moments (steps, saves, startup); the end state is exact."""
    steps, rng = 40, random.Random(0)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.npz")
    os.makedirs(ckpt)
    kills = 0
    for _ in range(6):
        # Steps slow enough (40 x 0.25 s) that six kills 2-8 s after start
        # land before the run could finish, on a fast box too.
        child = Child(ckpt, steps, "--step_sleep=0.25")
        time.sleep(rng.uniform(2.0, 8.0))  # TF's import takes a few seconds: some kills land there
        if child.proc.poll() is not None:
            break
        child.sigkill()
        kills += 1
    final = Child(ckpt, steps, out=out)
    final.wait_for(f"done {steps}", timeout=300)
    assert final.proc.wait(timeout=120) == 0
    assert kills >= 3
    assert_bit_exact(out, uninterrupted(steps))
