"""`LocalCluster`: one worker process per host, on this machine."""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO

import tensorflow as tf
from absl import logging

from tpu_embed_adam.cluster import _worker
from tpu_embed_adam.cluster._checks import check_int, check_seconds
from tpu_embed_adam.cluster._tf_config import CHIEF, TF_CONFIG, WORKER
from tpu_embed_adam.cluster._tombstone import Tombstone
from tpu_embed_adam.cluster._watchdog import WorkerWatchdog

__all__ = ["MAX_LOCAL_HOSTS", "LocalCluster"]

# Each worker is a TensorFlow process (a few hundred MB before any table):
# more than this on one machine is a typo, not a test.
MAX_LOCAL_HOSTS = 64

# The directory that holds the `tpu_embed_adam` package this process imported:
# the children import the same one, whatever their working directory.
_PACKAGE_ROOT = str(pathlib.Path(__file__).absolute().parent.parent.parent)
_POLL_S = 0.05
# How often the watchdog looks for a worker that exited.
_WATCH_S = 0.1
_EVALUATOR = "evaluator"
_STDERR_TAIL_CHARS = 4000


class LocalCluster:
    """Starts one worker process per host on this machine; a context manager.

    Each host is a process running `tpu-embed-adam worker` (the same code as on
    a real host), started as a Kubernetes TFJob starts a worker: `TF_CONFIG`
    holds the cluster and its task. It is a `tf.distribute.Server` for task
    `h` of job `worker`, with `cores_per_host` logical CPU devices, whose
    engine holds that host's shards. The constructor returns once every
    worker serves::

        with LocalCluster(num_hosts=2, cores_per_host=2) as cluster:
            config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=60_000)
            with tf.compat.v1.Session(cluster.target, config=config) as sess:
                ...  # ops placed on cluster.core_device(host, core)

    When a worker dies, TF 2.15 fails the next `Session.run` that touches it
    at once, but creating a session and closing one (also when Python
    collects it) would then wait for the dead worker forever. So a watchdog
    thread polls the workers (every 0.1 s): one that exits is logged as an
    ERROR naming its task, its status and the end of its stderr, and a
    tombstone takes its address, failing every call of TF's with
    `FailedPreconditionError` naming the task. The waits end within about a
    second (TF's reconnect) and every later session fails at once naming
    the task, even one written without an operation timeout. The shards of
    the dead worker are gone: start a new cluster and restore a checkpoint.
    Still set `operation_timeout_in_ms` where you can: on real hosts no
    watchdog answers for a dead host (docs/deploy.md).

    The children stop (SIGTERM, then SIGKILL after `grace_period_s`; always
    reaped) when the `with` block exits, also on an exception or
    KeyboardInterrupt, on `stop()`, at interpreter exit, and when this
    process dies, even by SIGKILL. The last is Linux's parent-death signal,
    which fires when the *thread* that started the cluster exits: start it
    from a thread that outlives it (the main thread).

    With `chief=True` the cluster also has a job `chief` of one task, whose
    address is reserved for the training program: a TPUEstimator program run
    with `TF_CONFIG=cluster.tf_config("chief")` (docs/deploy.md).

    Args:
      num_hosts: worker processes, 1 to `MAX_LOCAL_HOSTS`.
      cores_per_host: logical CPU devices per worker, 1 to
        `MAX_CORES_PER_HOST` (the engine's limit).
      chief: whether the cluster has a `chief` task (started by the caller,
        not by the cluster).
      startup_timeout_s: how long to wait for every worker to serve.
      grace_period_s: how long `stop()` waits after SIGTERM before SIGKILL.

    Raises:
      TypeError: an argument has the wrong type.
      ValueError: an argument is out of range.
      RuntimeError: a worker exited before it served (the error names its
        task and ends with its stderr).
      TimeoutError: a worker did not serve within `startup_timeout_s` (the
        error names its task and ends with its stderr).
    """

    def __init__(
        self,
        num_hosts: int,
        cores_per_host: int = 1,
        *,
        chief: bool = False,
        startup_timeout_s: float = 120.0,
        grace_period_s: float = 5.0,
    ) -> None:
        self._num_hosts = check_int("num_hosts", num_hosts, 1, MAX_LOCAL_HOSTS)
        self._cores_per_host = check_int(
            "cores_per_host", cores_per_host, 1, _worker.MAX_CORES_PER_HOST
        )
        startup_timeout_s = check_seconds("startup_timeout_s", startup_timeout_s)
        self._grace_period_s = check_seconds("grace_period_s", grace_period_s)
        if not isinstance(chief, bool):
            raise TypeError(
                f"Argument `chief` must be a bool; received: {chief!r} ({type(chief).__name__})."
            )
        ports = [f"localhost:{port}" for port in _free_ports(self._num_hosts + chief)]
        self._addresses = ports[: self._num_hosts]
        jobs = {WORKER: self._addresses}
        if chief:
            jobs[CHIEF] = ports[self._num_hosts :]
        self._cluster_spec = tf.train.ClusterSpec(jobs)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[tuple[IO[bytes], IO[bytes]]] = []
        self._lock = threading.Lock()
        self._watchdog: WorkerWatchdog | None = None
        self._tombstones: list[Tombstone] = []
        atexit.register(self.stop)
        try:
            self._spawn()
            self._wait_until_serving(startup_timeout_s)
            self._watchdog = WorkerWatchdog(self._procs, self._on_worker_exit, _WATCH_S)
        except BaseException:
            self.stop()
            raise

    @property
    def num_hosts(self) -> int:
        """The number of worker processes (tasks of job `worker`)."""
        return self._num_hosts

    @property
    def cores_per_host(self) -> int:
        """Logical CPU devices per worker."""
        return self._cores_per_host

    @property
    def cluster_spec(self) -> tf.train.ClusterSpec:
        """The cluster: job `worker`, task `h` at `localhost:<port>` (and `chief`, if asked)."""
        return self._cluster_spec

    def tf_config(self, task_type: str = CHIEF, index: int = 0) -> str:
        """Returns the `TF_CONFIG` of one task of this cluster, as a TFJob sets it.

        Args:
          task_type: `"chief"` (the training program; the cluster must have
            been made with `chief=True`), `"worker"` (what each worker of
            this cluster got) or `"evaluator"` (evaluates checkpoints, outside
            the cluster, as Estimator has it).
          index: the task's index in its job.

        Returns:
          The JSON text: `{"cluster": ..., "task": {"type": ..., "index": ...},
          "environment": "cloud"}`.

        Raises:
          ValueError: `task_type` is not one of the three, or names a job
            this cluster does not have, or `index` is not one of its tasks.
        """
        jobs = self._cluster_spec.as_dict()
        if task_type not in (CHIEF, WORKER, _EVALUATOR):
            raise ValueError(
                f"Argument `task_type` must be {CHIEF!r}, {WORKER!r} or {_EVALUATOR!r}; "
                f"received: {task_type!r}."
            )
        tasks = 1 if task_type == _EVALUATOR else len(jobs.get(task_type, ()))
        if not tasks:
            raise ValueError(
                f"Argument `task_type` is {task_type!r}, but this cluster has no such job: "
                "make it with LocalCluster(..., chief=True)."
            )
        index = check_int("index", index, 0, tasks - 1)
        return json.dumps(
            {"cluster": jobs, "task": {"type": task_type, "index": index}, "environment": "cloud"}
        )

    @property
    def target(self) -> str:
        """Task 0's `grpc://localhost:<port>`, for `tf.compat.v1.Session(target)`."""
        return f"grpc://{self._addresses[0]}"

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes' ids, in task order."""
        return tuple(proc.pid for proc in self._procs)

    def poll(self) -> tuple[int | None, ...]:
        """Returns each worker's exit status, in task order: None while it runs.

        A negative status `-N` means that signal `N` ended it (as `subprocess`
        reports it). Reaps the workers that have exited.
        """
        return tuple(proc.poll() for proc in self._procs)

    def core_device(self, host: int, core: int) -> str:
        """Returns the full name of a core's device.

        Args:
          host: the task, in [0, num_hosts).
          core: the core within the host, in [0, cores_per_host).

        Returns:
          `/job:worker/replica:0/task:{host}/device:CPU:{core}`.

        Raises:
          TypeError: `host` or `core` is not an int.
          ValueError: `host` or `core` is out of range.
        """
        host = check_int("host", host, 0, self._num_hosts - 1)
        core = check_int("core", core, 0, self._cores_per_host - 1)
        return f"/job:{WORKER}/replica:0/task:{host}/device:CPU:{core}"

    def stop(self) -> None:
        """Stops every worker and waits for it; a no-op once stopped.

        SIGTERM first, SIGKILL to those still running after the grace period;
        then the tombstones of workers that died stop answering.
        """
        with self._lock:
            # First: the exits that stop() causes are no deaths to report.
            if self._watchdog is not None:
                self._watchdog.stop()
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + self._grace_period_s
            for proc in self._procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for tombstone in self._tombstones:
                tombstone.stop()
            for stdout, stderr in self._logs:
                stdout.close()
                stderr.close()
            self._logs.clear()
            # Last: a stop interrupted above is retried at exit.
            atexit.unregister(self.stop)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LocalCluster(num_hosts={self._num_hosts}, cores_per_host={self._cores_per_host}, "
            f"target={self.target!r})"
        )

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
        )
        for task in range(self._num_hosts):
            # As a TFJob starts a worker: the cluster and the task in TF_CONFIG.
            env[TF_CONFIG] = self.tf_config(WORKER, task)
            # Files, not pipes: nobody reads a worker's output after startup,
            # and a full pipe would block its logging.
            logs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
            self._logs.append(logs)
            self._procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "tpu_embed_adam.cli", "worker",
                        f"--cores_per_host={self._cores_per_host}",
                        f"--parent_pid={os.getpid()}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=logs[0],
                    stderr=logs[1],
                    env=env,
                    # Its own session: a Ctrl-C at the terminal reaches this
                    # process, which decides what happens to the workers.
                    start_new_session=True,
                )
            )

    def _wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(range(self._num_hosts))
        while waiting:
            for task in list(waiting):
                proc = self._procs[task]
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"worker {self._task_name(task)} (pid {proc.pid}) exited with status "
                        f"{proc.returncode} before it served; its stderr ends:\n"
                        f"{self._stderr_tail(task)}"
                    )
                ready = _worker.ready_message(task, self._addresses[task], proc.pid)
                if ready in self._stdout(task).splitlines() and _accepts(self._addresses[task]):
                    waiting.remove(task)
            if waiting and time.monotonic() > deadline:
                task = waiting[0]
                raise TimeoutError(
                    f"worker {self._task_name(task)} (pid {self._procs[task].pid}) did not serve "
                    f"within {timeout_s} s; its stderr ends:\n{self._stderr_tail(task)}"
                )
            if waiting:
                time.sleep(_POLL_S)

    def _on_worker_exit(self, task: int, status: int) -> None:
        """The watchdog's report of a worker that exited: log it, answer for it."""
        if status < 0:
            how = f"was killed by {_signal_name(-status)}"
        else:
            how = f"exited with status {status}"
        death = f"worker {self._task_name(task)} (pid {self._procs[task].pid}) {how}"
        logging.error("%s; its stderr ends:\n%s", death, self._stderr_tail(task))
        self._tombstones.append(
            Tombstone(
                self._addresses[task],
                f"{death}: its engine and its shards of every table are gone. LocalCluster's "
                "watchdog answers at its address so that no session waits for it; start a new "
                "cluster and restore the tables from a checkpoint.",
            )
        )

    def _task_name(self, task: int) -> str:
        return f"/job:{WORKER}/replica:0/task:{task}"

    def _stdout(self, task: int) -> str:
        return _read_all(self._logs[task][0])

    def _stderr_tail(self, task: int) -> str:
        return _read_all(self._logs[task][1])[-_STDERR_TAIL_CHARS:] or "(empty)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _read_all(log: IO[bytes]) -> str:
    # pread: the child writes through the same open file, and moving its
    # offset would make it overwrite what it wrote.
    return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0).decode(errors="replace")


def _free_ports(count: int) -> list[int]:
    """Ports no process listens on now (all held at once, so distinct)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False

