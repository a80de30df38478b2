"""`tpu-embed-adam cluster` and `worker`: as a user runs them, and their usage errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from tpu_embed_adam import _library, cli, engine
from tpu_embed_adam.cluster import MAX_LOCAL_HOSTS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from processes import alive, wait_until_gone  # noqa: E402

needs_kernels = pytest.mark.skipif(
    _library.load_library() is None, reason="kernel library not built: workers refuse to start"
)


def _main(capsys, *args):
    """Runs the CLI in-process; returns (exit status, stdout, stderr)."""
    code = cli.main(["tpu-embed-adam", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tpu_embed_adam.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _read_lines(proc: subprocess.Popen[str], count: int, timeout_s: float = 120.0) -> list[str]:
    """The first `count` lines of `proc`'s stdout; kills it if they take longer than the timeout."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(count)]
    finally:
        timer.cancel()
    assert all(lines), (lines, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@needs_kernels
def test_cluster_prints_the_cluster_and_stops_its_workers_on_sigterm():
    proc = _start("cluster", "--hosts=2", "--cores_per_host=2")
    try:
        spec_line, *task_lines, target_line = _read_lines(proc, 4)
        addresses = json.loads(spec_line)["worker"]
        assert len(addresses) == 2
        pids = []
        for task, (line, address) in enumerate(zip(task_lines, addresses, strict=True)):
            found = re.fullmatch(rf"task {task}: {re.escape(address)} \(pid (\d+)\)", line)
            assert found, line
            pids.append(int(found.group(1)))
        assert target_line == f"target: grpc://{addresses[0]}"
        target = target_line.split(" ", 1)[1]
        assert [engine.info(target, task)["pid"] for task in range(2)] == pids
        config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=30_000)
        with tf.compat.v1.Session(target, graph=tf.Graph(), config=config) as sess:
            cpus = [d.name for d in sess.list_devices() if d.device_type == "CPU"]
        assert len(cpus) == 4

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert wait_until_gone(pids, timeout_s=0.0) == []
    finally:
        proc.kill()
        proc.wait()


@needs_kernels
def test_cluster_exits_1_naming_a_worker_that_died():
    proc = _start("cluster", "--hosts=1")
    try:
        pid = int(re.search(r"\(pid (\d+)\)", _read_lines(proc, 3)[1]).group(1))
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert err.endswith(
            f"tpu-embed-adam cluster: error: worker task 0 (pid {pid}) exited with status "
            f"{-signal.SIGKILL}\n"
        ), err[-2000:]
    finally:
        proc.kill()
        proc.wait()


@needs_kernels
def test_worker_serves_in_the_foreground_until_sigterm():
    port = _free_port()
    spec = json.dumps({"worker": [f"localhost:{port}"]})
    proc = _start("worker", f"--cluster_spec={spec}", "--task=0", "--cores_per_host=2")
    try:
        assert _read_lines(proc, 1) == [
            f"worker task 0 serving at localhost:{port} (pid {proc.pid})"
        ]
        assert engine.info(f"grpc://localhost:{port}", 0)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert not alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["cluster"], "the following arguments are required: --hosts"),
        (["cluster", "--hosts=0"], "argument --hosts: must be in [1, 64]; received: 0"),
        (
            ["cluster", f"--hosts={MAX_LOCAL_HOSTS + 1}"],
            f"argument --hosts: must be in [1, 64]; received: {MAX_LOCAL_HOSTS + 1}",
        ),
        (["cluster", "--hosts=two"], "argument --hosts: invalid int value: 'two'"),
        (
            ["cluster", "--hosts=1", "--cores_per_host=257"],
            "argument --cores_per_host: must be in [1, 256]; received: 257",
        ),
        (["worker", "--task=0"], "argument --cluster_spec: required with --task; give neither"),
        (
            ["worker", "--cluster_spec={worker", "--task=0"],
            "argument --cluster_spec: Argument `cluster_spec` is not JSON",
        ),
        (
            ["worker", '--cluster_spec={"ps": ["localhost:2222"]}', "--task=0"],
            "argument --cluster_spec: Argument `cluster_spec` has no job 'worker'",
        ),
        (
            ["worker", '--cluster_spec={"worker": ["localhost"]}', "--task=0"],
            "argument --cluster_spec: Argument `cluster_spec`: job 'worker' has the address "
            "'localhost', not 'host:port'",
        ),
        (
            ["worker", '--cluster_spec={"worker": "localhost:2222"}', "--task=0"],
            "job 'worker' must be a list of 'host:port' addresses",
        ),
        *[
            (
                ["worker", f"--cluster_spec={text}", "--task=0"],
                "argument --cluster_spec: Argument `cluster_spec` must be a JSON object of job "
                "names to lists of 'host:port' addresses, e.g. {\"worker\": [\"host0:2222\", "
                f"\"host1:2222\"]}}; received: {text!r}.",
            )
            for text in ('["localhost:2222"]', '"localhost:2222"', "null", "2222")
        ],
        (
            ["worker", '--cluster_spec={"worker": ["grpc://localhost:2222"]}', "--task=0"],
            "Argument `cluster_spec`: job 'worker' has the address 'grpc://localhost:2222', "
            "whose host must not hold '/' (no 'grpc://' scheme: that is a session target).",
        ),
        (
            ["worker", '--cluster_spec={"worker": ["localhost:2222", "h/1:2222"]}', "--task=0"],
            "job 'worker' has the address 'h/1:2222', whose host must not hold '/'",
        ),
        (
            ["worker", '--cluster_spec={"worker": ["localhost:\u0662\u0662"]}', "--task=0"],
            "job 'worker' has the address 'localhost:\u0662\u0662', not 'host:port'",
        ),
        (
            ["worker", '--cluster_spec={"worker": ["localhost:2222"]}', "--task=1"],
            "argument --task: must be in [0, 0] (the tasks of the cluster spec's job 'worker'); "
            "received: 1",
        ),
        (
            ["worker", '--cluster_spec={"worker": ["localhost:2222"]}', "--task=-1"],
            "argument --task: must be >= 0; received: -1",
        ),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, args, message):
    code, out, err = _main(capsys, *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"tpu-embed-adam {args[0]}: error: ") and message in err, err
    assert err.count("\n") == 1


@needs_kernels
def test_worker_exits_1_naming_a_port_in_use_and_the_cause(capsys):
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        spec = json.dumps({"worker": [f"localhost:{port}"]})
        code, out, err = _main(capsys, "worker", f"--cluster_spec={spec}", "--task=0")
    assert (code, out) == (1, "")
    assert err == (
        f"tpu-embed-adam worker: error: worker task 0 cannot serve at localhost:{port}: "
        f"port {port}: Address already in use\n"
    )


def test_worker_exits_1_when_its_parent_is_gone(capsys):
    # This process is never its own parent; the check comes before any change.
    code, _, err = _main(
        capsys, "worker", '--cluster_spec={"worker": ["localhost:2222"]}', "--task=0",
        f"--parent_pid={os.getpid()}",
    )
    assert code == 1
    assert err == (
        f"tpu-embed-adam worker: error: Argument `parent_pid` {os.getpid()} is not this "
        f"process's parent (that is {os.getppid()}): the parent has already exited.\n"
    )
