"""The in-process cluster and its devices, on which the TPUEmbedding graphs run.

`cluster(num_hosts, cores_per_host)` starts (once per shape) one in-process
`tf.distribute.Server` worker per host, each with one logical CPU device per
core; `core_device` names the device standing for a core, in the cluster's job
`JOB` or, for a plain `Session` without cluster, `LOCAL_JOB`.
"""

from __future__ import annotations

import functools
import socket

import tensorflow as tf

JOB = "/job:worker"
LOCAL_JOB = "/job:localhost"


def core_device(host: int, core: int, job: str = JOB) -> str:
    """Returns the logical CPU device standing for `core` of `host`."""
    return f"{job}/replica:0/task:{host}/device:CPU:{core}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@functools.cache
def cluster(num_hosts: int, cores_per_host: int = 1) -> tuple[tf.distribute.Server, ...]:
    """Starts (once per shape, for the life of the process) a local worker cluster.

    One worker per host, each with one logical CPU device per core; a session
    on the first one's `target` is the master. In-process servers cannot be
    stopped, so clusters are cached and shared by every test that asks for the
    same shape; the engine is reset between tests.
    """
    spec = tf.train.ClusterSpec({"worker": [f"localhost:{_free_port()}" for _ in range(num_hosts)]})
    config = tf.compat.v1.ConfigProto(device_count={"CPU": cores_per_host})
    servers = tuple(
        tf.distribute.Server(spec, job_name="worker", task_index=i, config=config, start=True)
        for i in range(num_hosts)
    )
    return servers
