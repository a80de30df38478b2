"""A worker SIGKILLed under sessions written without a timeout: errors name it, nothing hangs.

TF 2.15's sessions wait for a dead worker forever when they close or start
(docs/engine.md, "When a worker dies"). `LocalCluster`'s watchdog puts a
tombstone at the dead worker's address, which fails TF's calls naming the
task, so every wait ends. Each case runs the user's program in a child
process, so that a regression shows as a timeout here, not as a hung suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from processes import wait_until_gone

from tpu_embed_adam import _library, engine
from tpu_embed_adam.cluster import LocalCluster

HERE = os.path.dirname(os.path.abspath(__file__))
# The program must end this soon after the kill (measured: ~2 s; TF's
# reconnect to the address is the larger part).
END_WITHIN_S = 15.0
needs_kernels = pytest.mark.skipif(
    _library.load_library() is None, reason="kernel library not built: workers refuse to start"
)


@needs_kernels
@pytest.mark.parametrize("killed", [1, 0], ids=["a worker", "the master"])
def test_a_program_without_timeouts_ends_naming_the_dead_task(killed):
    child = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "plain_session_child.py"), "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    timer = threading.Timer(180, child.kill)
    timer.start()
    try:
        line = child.stdout.readline()
        assert line.startswith("pids "), (line, child.poll())
        pids = [int(pid) for pid in line.split()[1:]]
        os.kill(pids[killed], signal.SIGKILL)
        start = time.monotonic()
        _, err = child.communicate(timeout=END_WITHIN_S)
        elapsed = time.monotonic() - start
    finally:
        timer.cancel()
        child.kill()
        child.wait()
    assert child.returncode == 1, err[-3000:]
    assert elapsed < END_WITHIN_S
    # The exception the program ends with (the last traceback) names the task.
    assert f"/job:worker/replica:0/task:{killed}" in err[err.rindex("Traceback") :], err[-3000:]
    assert wait_until_gone(pids, timeout_s=10.0) == []


@needs_kernels
def test_after_a_death_every_session_fails_at_once_naming_the_task_and_closes():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [])
        with tf.device("/job:worker/replica:0/task:0/device:CPU:0"):
            a = x * 2.0
        with tf.device("/job:worker/replica:0/task:1/device:CPU:0"):
            b = x * 3.0
        total = a + b
    with LocalCluster(2) as cluster:
        sess = tf.compat.v1.Session(cluster.target, graph=graph)  # no timeout
        assert sess.run(total, {x: 1.0}) == 5.0
        os.kill(cluster.pids[1], signal.SIGKILL)
        assert wait_until_gone([cluster.pids[1]], timeout_s=5.0) == []
        with pytest.raises(tf.errors.OpError, match="/job:worker/replica:0/task:1"):
            sess.run(total, {x: 1.0})
        start = time.monotonic()
        sess.close()  # TF alone: forever
        assert time.monotonic() - start < END_WITHIN_S
        start = time.monotonic()
        with pytest.raises(
            tf.errors.FailedPreconditionError,
            match=r"worker /job:worker/replica:0/task:1 \(pid \d+\) was killed by SIGKILL: its "
            "engine and its shards of every table are gone",
        ):
            with tf.compat.v1.Session(cluster.target, graph=graph) as fresh:
                fresh.run(total, {x: 1.0})
        with pytest.raises(tf.errors.FailedPreconditionError, match="task:1 .* SIGKILL"):
            engine.info(cluster.target, 1)
        assert time.monotonic() - start < END_WITHIN_S
        assert engine.info(cluster.target, 0)["pid"] == cluster.pids[0]
        assert cluster.poll() == (None, -signal.SIGKILL)
