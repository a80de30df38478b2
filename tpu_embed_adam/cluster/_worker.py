"""One worker process: task `task` of job `worker`, serving its host's engine.

`tpu-embed-adam worker` runs `run_worker` in the foreground (what one runs on
each host of a real cluster); `LocalCluster` starts that same command once
per host, adding `--parent_pid` so that its children never outlive it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from tpu_embed_adam import _library
from tpu_embed_adam.cluster._checks import check_int
from tpu_embed_adam.cluster._tf_config import as_cluster_spec_input

__all__ = [
    "JOB",
    "MAX_CORES_PER_HOST",
    "parse_cluster_spec",
    "ready_message",
    "run_worker",
]

JOB = "worker"
# The engine's own limits (docs/engine.md, "Limits"): a larger cluster could
# never be configured.
_MAX_HOSTS = 4096
MAX_CORES_PER_HOST = 256

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_MAX_PID = 2**31 - 1
_PARENT_POLL_S = 0.5
# What the worker exits with when its parent is gone (128 + SIGHUP, as a shell
# reports a process that lost its terminal).
_PARENT_GONE_STATUS = 129


def parse_cluster_spec(text: str) -> tf.train.ClusterSpec:
    """Reads a cluster spec from JSON, as `tpu-embed-adam worker --cluster_spec` takes it.

    Args:
      text: `{"worker": ["host:port", ...]}`: task `i` of job `worker` serves
        at the `i`-th address (other jobs may be present).

    Returns:
      The `tf.train.ClusterSpec`.

    Raises:
      ValueError: `text` is not JSON, not a JSON object (an array, a string),
        or not a cluster spec with a `worker` job.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"Argument `cluster_spec` is not JSON ({e}); received: {text!r}.") from e
    if not isinstance(value, dict):
        raise ValueError(
            "Argument `cluster_spec` must be a JSON object of job names to lists of 'host:port' "
            f'addresses, e.g. {{"{JOB}": ["host0:2222", "host1:2222"]}}; received: {text!r}.'
        )
    return _as_cluster_spec(value)


def _as_cluster_spec(
    cluster_spec: tf.train.ClusterSpec | Mapping[str, Sequence[str]],
) -> tf.train.ClusterSpec:
    """Checks a cluster spec and returns it as a `tf.train.ClusterSpec`.

    Args:
      cluster_spec: a `tf.train.ClusterSpec` or a dict from job name to a list
        of `host:port` addresses; it must have a `worker` job.

    Returns:
      The `tf.train.ClusterSpec`.

    Raises:
      TypeError: `cluster_spec` is neither.
      ValueError: a job is not a non-empty list of `host:port` strings, there
        is no `worker` job, or it has more than the engine's 4096 hosts.
    """
    # A ClusterResolver (TFConfigClusterResolver, SimpleClusterResolver) gives its spec.
    cluster_spec = as_cluster_spec_input(cluster_spec)
    if isinstance(cluster_spec, tf.train.ClusterSpec):
        jobs: Any = cluster_spec.as_dict()
    elif isinstance(cluster_spec, Mapping):
        jobs = cluster_spec
    else:
        raise TypeError(
            "Argument `cluster_spec` must be a tf.train.ClusterSpec or a dict of job name to "
            f"addresses; received: {cluster_spec!r} ({type(cluster_spec).__name__})."
        )
    if JOB not in jobs:
        raise ValueError(
            f"Argument `cluster_spec` has no job {JOB!r}; received: {dict(jobs)!r}."
        )
    for job, addresses in jobs.items():
        if not isinstance(job, str) or not job:
            raise ValueError(f"Argument `cluster_spec` has a job name {job!r}: not a string.")
        if isinstance(addresses, str | bytes) or not isinstance(addresses, Sequence):
            raise ValueError(
                f"Argument `cluster_spec`: job {job!r} must be a list of 'host:port' "
                f"addresses; received: {addresses!r}."
            )
        if not addresses:
            raise ValueError(f"Argument `cluster_spec`: job {job!r} has no tasks.")
        for address in addresses:
            _check_address(job, address)
    if len(jobs[JOB]) > _MAX_HOSTS:
        raise ValueError(
            f"Argument `cluster_spec`: job {JOB!r} has {len(jobs[JOB])} tasks, more than the "
            f"engine's {_MAX_HOSTS} hosts."
        )
    return tf.train.ClusterSpec({job: list(addresses) for job, addresses in jobs.items()})


def _check_address(job: str, address: Any) -> None:
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    # str.isdigit() takes other scripts' digits, which TF cannot parse.
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"Argument `cluster_spec`: job {job!r} has the address {address!r}, "
            "not 'host:port' with a port in [1, 65535]."
        )
    if "/" in host:
        # TF's server aborts the process on such an address (any task's).
        raise ValueError(
            f"Argument `cluster_spec`: job {job!r} has the address {address!r}, whose host "
            "must not hold '/' (no 'grpc://' scheme: that is a session target)."
        )


def ready_message(task: int, address: str, pid: int) -> str:
    """The line a worker prints on stdout once it serves (`LocalCluster` waits for it).

    Args:
      task: the worker's task index.
      address: its `host:port` in the cluster spec.
      pid: its process id.

    Returns:
      The line, without a newline.
    """
    return f"worker task {task} serving at {address} (pid {pid})"


def run_worker(
    cluster_spec: tf.train.ClusterSpec | Mapping[str, Sequence[str]]
    | tf.distribute.cluster_resolver.ClusterResolver,
    task: int,
    cores_per_host: int = 1,
    parent_pid: int | None = None,
) -> None:
    """Serves task `task` of job `worker` until the process is killed.

    Starts a `tf.distribute.Server` with `cores_per_host` logical CPU devices
    (one per TPU core of the host), prints `ready_message(...)` on stdout and
    blocks. The engine's shard of this host lives in this process. SIGINT and
    SIGTERM end the process at once (a blocked `join()` would never run a
    Python handler, and the engine holds nothing that must be written out).
    Call it from the main thread of a process that imported `tpu_embed_adam`.

    Args:
      cluster_spec: the whole cluster (checked as `parse_cluster_spec` checks it), or a
        cluster resolver (`TFConfigClusterResolver`, `SimpleClusterResolver`); every task
        of job `worker` must run `run_worker` with the same spec.
      task: this worker's index in job `worker`.
      cores_per_host: logical CPU devices (`/device:CPU:0` ...) of this task.
      parent_pid: when given, the process exits as soon as this process, its
        parent, has exited (what `LocalCluster` passes): Linux's parent-death
        signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`) kills it with its parent,
        and a watchdog thread polling `os.getppid()` catches the rest.

    Raises:
      TypeError: an argument has the wrong type.
      ValueError: a bad cluster spec, `task` outside the job's tasks, or
        `cores_per_host` outside [1, MAX_CORES_PER_HOST].
      RuntimeError: `parent_pid` is not this process's parent (it has already
        exited), the kernel library did not load (the worker would serve
        no TPU embedding op), or the task's port cannot be listened on (in
        use, or reserved): the message names the port and the cause.
      tf.errors.OpError: the server did not start for another reason.
    """
    if parent_pid is not None:
        _exit_with_parent(check_int("parent_pid", parent_pid, 1, _MAX_PID))
    spec = _as_cluster_spec(cluster_spec)
    task = check_int("task", task, 0, spec.num_tasks(JOB) - 1)
    cores_per_host = check_int("cores_per_host", cores_per_host, 1, MAX_CORES_PER_HOST)
    if _library.load_library() is None:
        raise RuntimeError(
            f"the tpu_embed_adam kernel library did not load ({_library.load_error()}): this "
            "worker would serve no TPU embedding op; build it with `make lib`."
        )
    _check_port(task, spec.task_address(JOB, task))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server = tf.distribute.Server(
        spec,
        job_name=JOB,
        task_index=task,
        config=tf.compat.v1.ConfigProto(device_count={"CPU": cores_per_host}),
        start=True,
    )
    print(ready_message(task, spec.task_address(JOB, task), os.getpid()), flush=True)
    server.join()


def _check_port(task: int, address: str) -> None:
    """Raises RuntimeError, naming the port and the cause, if `address`'s port cannot be served.

    TF's server would fail with "Could not start gRPC server" alone (gRPC
    logs the cause on a line of its own); listening on the port as it does,
    on every interface and not sharing the port, finds that cause first.
    """
    port = int(address.rpartition(":")[2])
    dualstack = socket.has_dualstack_ipv6()
    try:
        family = socket.AF_INET6 if dualstack else socket.AF_INET
        socket.create_server(("", port), family=family, dualstack_ipv6=dualstack).close()
    except OSError as e:
        # create_server's strerror adds the address tuple; the port says it.
        cause = os.strerror(e.errno) if e.errno else str(e)
        raise RuntimeError(
            f"worker task {task} cannot serve at {address}: port {port}: {cause}"
        ) from e


def _exit_with_parent(parent_pid: int) -> None:
    """Makes this process exit when `parent_pid`, its parent, exits."""
    # Checked first, so that a refused call changes nothing.
    if os.getppid() != parent_pid:
        raise RuntimeError(
            f"Argument `parent_pid` {parent_pid} is not this process's parent "
            f"(that is {os.getppid()}): the parent has already exited."
        )
    # The kernel's signal covers every way a parent dies, even SIGKILL, but
    # not one that died before this call; the watchdog covers that, and
    # systems without prctl.
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None or prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logging.warning(
            "prctl(PR_SET_PDEATHSIG) is unavailable: this worker notices its parent's exit "
            "by polling, within %.1f s",
            _PARENT_POLL_S,
        )
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    logging.error("parent process %d has exited: this worker exits too", parent_pid)
    os._exit(_PARENT_GONE_STATUS)
