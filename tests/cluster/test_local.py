"""`LocalCluster`: worker processes that serve, stop on every path, and fail loudly.

Every cluster here is real: `tpu-embed-adam worker` processes importing
TensorFlow (seconds each on a loaded 2-core machine), so the tests that only
read a running cluster share one per module. A stand-in executable
(`sys.executable` patched to a shell or Python script without TensorFlow)
covers the startup failures and the SIGKILL after the grace period.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf
from processes import alive, wait_until_gone

from tpu_embed_adam import _library, engine
from tpu_embed_adam.cluster import MAX_CORES_PER_HOST, MAX_LOCAL_HOSTS, LocalCluster

HOSTS, CORES = 3, 2
# Every session on a cluster bounds its blocking calls (LocalCluster's docstring).
TIMEOUT_MS = 30_000
# How soon a run that touches a dead worker must fail (TF measured ~0.01 s).
DEAD_WORKER_ERROR_S = 5.0
# A worker without the kernel library refuses to start.
needs_kernels = pytest.mark.skipif(
    _library.load_library() is None, reason="kernel library not built"
)


def _config(timeout_ms: int = TIMEOUT_MS) -> tf.compat.v1.ConfigProto:
    return tf.compat.v1.ConfigProto(operation_timeout_in_ms=timeout_ms)


def _graph_on_every_core(hosts: int, cores: int) -> tuple[tf.Graph, tf.Tensor, tf.Tensor]:
    """`x * (i + 1)` on the i-th core device of every host, summed: x * n(n+1)/2 for n cores."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [])  # fed, so nothing folds into a constant
        parts = []
        for host in range(hosts):
            for core in range(cores):
                with tf.device(f"/job:worker/replica:0/task:{host}/device:CPU:{core}"):
                    parts.append(x * float(len(parts) + 1))
        total = tf.add_n(parts)
    return graph, x, total


def _expected_total(x: float, devices: int) -> float:
    return x * devices * (devices + 1) / 2


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(HOSTS, cores_per_host=CORES) as running:
        yield running


@needs_kernels
def test_every_core_of_every_worker_runs_its_op(cluster):
    graph, x, total = _graph_on_every_core(HOSTS, CORES)
    with tf.compat.v1.Session(cluster.target, graph=graph, config=_config()) as sess:
        devices = {d.name for d in sess.list_devices() if d.device_type == "CPU"}
        assert sess.run(total, {x: 2.0}) == _expected_total(2.0, HOSTS * CORES)
    assert devices == {cluster.core_device(h, k) for h in range(HOSTS) for k in range(CORES)}


@needs_kernels
def test_engine_info_answers_from_each_workers_own_process(cluster):
    pids = [engine.info(cluster.target, task)["pid"] for task in range(HOSTS)]
    assert pids == list(cluster.pids)
    assert len(set(pids)) == HOSTS and os.getpid() not in pids
    assert engine.info()["pid"] == os.getpid()
    assert engine.tables(cluster.target, 1) == []
    assert not engine.info(cluster.target, 2)["configured"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"task:{HOSTS}/device:CPU:0"):
        engine.info(cluster.target, HOSTS)  # no such worker


@needs_kernels
def test_the_cluster_describes_itself(cluster):
    addresses = cluster.cluster_spec.job_tasks("worker")
    assert cluster.cluster_spec.jobs == ["worker"] and len(addresses) == HOSTS
    assert len(set(addresses)) == HOSTS
    assert all(re.fullmatch(r"localhost:\d+", a) for a in addresses)
    assert cluster.target == f"grpc://{addresses[0]}"
    assert (cluster.num_hosts, cluster.cores_per_host) == (HOSTS, CORES)
    assert cluster.poll() == (None,) * HOSTS
    assert all(alive(pid) for pid in cluster.pids)
    assert cluster.core_device(2, 1) == "/job:worker/replica:0/task:2/device:CPU:1"
    assert repr(cluster) == (
        f"LocalCluster(num_hosts={HOSTS}, cores_per_host={CORES}, target='{cluster.target}')"
    )


@needs_kernels
@pytest.mark.parametrize(
    "host, core, error, name",
    [(HOSTS, 0, ValueError, "host"), (-1, 0, ValueError, "host"), (0, CORES, ValueError, "core"),
     ("0", 0, TypeError, "host"), (0, True, TypeError, "core")],
)
def test_core_device_names_a_bad_argument(cluster, host, core, error, name):
    with pytest.raises(error, match=f"Argument `{name}`"):
        cluster.core_device(host, core)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_hosts": 0}, ValueError, "num_hosts"),
        ({"num_hosts": MAX_LOCAL_HOSTS + 1}, ValueError, "num_hosts"),
        ({"num_hosts": True}, TypeError, "num_hosts"),
        ({"num_hosts": 2.0}, TypeError, "num_hosts"),
        ({"num_hosts": 1, "cores_per_host": 0}, ValueError, "cores_per_host"),
        ({"num_hosts": 1, "cores_per_host": MAX_CORES_PER_HOST + 1}, ValueError, "cores_per_host"),
        ({"num_hosts": 1, "startup_timeout_s": 0}, ValueError, "startup_timeout_s"),
        ({"num_hosts": 1, "startup_timeout_s": float("nan")}, ValueError, "startup_timeout_s"),
        ({"num_hosts": 1, "grace_period_s": "5"}, TypeError, "grace_period_s"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, error, name, monkeypatch, tmp_path):
    # A stand-in that records any start: a refused cluster starts nothing.
    started = tmp_path / "started"
    monkeypatch.setattr(sys, "executable", _script(tmp_path, f"#!/bin/sh\ntouch {started}\n"))
    with pytest.raises(error, match=f"Argument `{name}`"):
        LocalCluster(**kwargs)
    assert not started.exists()


@needs_kernels
def test_stop_ends_every_worker_once():
    cluster = LocalCluster(2)
    pids = cluster.pids
    assert all(alive(pid) for pid in pids)
    cluster.stop()
    assert not any(alive(pid) for pid in pids)  # reaped: no zombie either
    assert cluster.poll() == (-signal.SIGTERM, -signal.SIGTERM)
    cluster.stop()
    assert cluster.poll() == (-signal.SIGTERM, -signal.SIGTERM)


@needs_kernels
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_with_block_that_raises_stops_its_workers(error):
    with pytest.raises(error, match="from the body"):
        with LocalCluster(1) as cluster:
            pids = cluster.pids
            assert alive(pids[0])
            raise error("from the body")
    assert not alive(pids[0])
    assert cluster.poll() == (-signal.SIGTERM,)


@needs_kernels
def test_a_dead_worker_fails_the_next_run_naming_it_and_a_new_cluster_serves_the_graph():
    graph, x, total = _graph_on_every_core(2, 1)
    with LocalCluster(2) as first:
        # A short bound: closing this session after the death waits all of it.
        sess = tf.compat.v1.Session(first.target, graph=graph, config=_config(5_000))
        assert sess.run(total, {x: 1.0}) == _expected_total(1.0, 2)
        os.kill(first.pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(tf.errors.UnavailableError, match="/job:worker/replica:0/task:1:"):
            sess.run(total, {x: 1.0})
        assert time.monotonic() - start < DEAD_WORKER_ERROR_S
        assert wait_until_gone([first.pids[1]], timeout_s=5.0) == []
        # /proc shows the main thread a zombie while TF's other threads still
        # exit; only then can the parent reap it.
        deadline = time.monotonic() + 5.0
        while first.poll()[1] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() == (None, -signal.SIGKILL)
        # TF 2.15 closes a session by waiting for its dead worker; the
        # watchdog's tombstone answers for it (test_dead_worker.py), and the
        # operation timeout would bound the wait.
        start = time.monotonic()
        sess.close()
        assert time.monotonic() - start < 5.0 + DEAD_WORKER_ERROR_S
        # A new session fails at once naming the dead worker.
        with pytest.raises(tf.errors.FailedPreconditionError, match="task:1 .* was killed by"):
            engine.info(first.target, 1)
        assert engine.info(first.target, 0)["pid"] == first.pids[0]
    assert not any(alive(pid) for pid in first.pids)

    with LocalCluster(2) as second:
        with tf.compat.v1.Session(second.target, graph=graph, config=_config()) as sess:
            assert sess.run(total, {x: 3.0}) == _expected_total(3.0, 2)
        assert engine.info(second.target, 1)["pid"] == second.pids[1]


def _run_parent(code: str) -> subprocess.Popen[str]:
    """A Python process running `code`, its stdout a pipe of text lines."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


def _pids_line(parent: subprocess.Popen[str]) -> list[int]:
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.startswith("pids "), (line, parent.stderr.read() if parent.poll() else "")
    return [int(pid) for pid in line.split()[1:]]


@needs_kernels
def test_workers_die_with_a_parent_killed_by_sigkill():
    parent = _run_parent(
        """
        import time
        from tpu_embed_adam.cluster import LocalCluster
        cluster = LocalCluster(2)
        print("pids", *cluster.pids, flush=True)
        time.sleep(600)
        """
    )
    try:
        pids = _pids_line(parent)
        assert all(alive(pid) for pid in pids)
        parent.kill()  # no atexit, no finally: only the kernel's parent-death signal
        assert parent.wait() == -signal.SIGKILL
        assert wait_until_gone(pids, timeout_s=10.0) == []
    finally:
        parent.kill()
        parent.wait()


@needs_kernels
def test_workers_stop_at_interpreter_exit():
    # The report runs after LocalCluster's own exit hook (atexit runs hooks
    # last-registered first), so it sees how that hook ended the workers.
    parent = _run_parent(
        """
        import atexit
        from tpu_embed_adam.cluster import LocalCluster
        cluster = None
        atexit.register(lambda: print("statuses", *cluster.poll(), flush=True))
        cluster = LocalCluster(1)
        print("pids", *cluster.pids, flush=True)
        """
    )
    try:
        pids = _pids_line(parent)
        out, err = parent.communicate(timeout=60)
        assert parent.returncode == 0, err[-2000:]
        assert out == f"statuses {-signal.SIGTERM}\n"
        assert wait_until_gone(pids, timeout_s=0.0) == []
    finally:
        parent.kill()
        parent.wait()


def _script(tmp_path, text: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_worker_that_dies_at_startup_is_named_with_its_stderr(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "executable", _script(tmp_path, "#!/bin/sh\necho 'no kernels here' >&2\nexit 3\n")
    )
    with pytest.raises(RuntimeError) as raised:
        LocalCluster(2)
    message = str(raised.value)
    # Both workers die; whichever the cluster sees first is named.
    assert re.match(
        r"worker /job:worker/replica:0/task:[01] \(pid \d+\) exited with status 3 before it "
        r"served; its stderr ends:\nno kernels here\n$", message
    ), message


def test_a_worker_that_does_not_serve_in_time_is_named_and_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "executable",
        _script(tmp_path, "#!/bin/sh\necho 'still importing' >&2\nexec sleep 600\n"),
    )
    start = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        LocalCluster(1, startup_timeout_s=0.5)
    assert time.monotonic() - start < 10.0
    message = str(raised.value)
    found = re.match(
        r"worker /job:worker/replica:0/task:0 \(pid (\d+)\) did not serve within 0.5 s; "
        r"its stderr ends:\nstill importing\n$", message
    )
    assert found, message
    assert not alive(int(found.group(1)))


# Serves as a worker would (the ready line, a listening port) but ignores SIGTERM.
_STUBBORN_WORKER = """#!{python}
import json, os, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
config = json.loads(os.environ["TF_CONFIG"])
task = config["task"]["index"]
address = config["cluster"]["worker"][task]
server = socket.create_server(("localhost", int(address.rsplit(":", 1)[1])))
print(f"worker task {{task}} serving at {{address}} (pid {{os.getpid()}})", flush=True)
time.sleep(600)
"""


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "executable", _script(tmp_path, _STUBBORN_WORKER.format(python=sys.executable))
    )
    cluster = LocalCluster(1, grace_period_s=0.5)
    assert cluster.poll() == (None,) and alive(cluster.pids[0])
    start = time.monotonic()
    cluster.stop()
    assert 0.5 <= time.monotonic() - start < 5.0
    assert cluster.poll() == (-signal.SIGKILL,)
    assert not alive(cluster.pids[0])
