"""TPUEstimator on a cluster: which `RunConfig` describes one, and what the engine gets from it.

As on a TPU pod, the training program runs once and the embedding hosts are
other processes: with `TF_CONFIG` as a Kubernetes TFJob sets it (or
`RunConfig(cluster=resolver)`), job `worker`'s task `h` is the engine's host
`h` (`tpu-embed-adam worker`, holding shard `h` of every table) and the
`chief` runs TPUEstimator, whose sessions run on its own server. An
`evaluator` is outside the cluster (Estimator empties its cluster spec) and
evaluates in its own process, as one process does.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import tensorflow as tf

__all__ = ["CHIEF", "WORKER", "EngineCluster", "accepts", "engine_cluster_of"]

CHIEF = "chief"
WORKER = "worker"
_EVALUATOR = "evaluator"
_GRPC = "grpc://"
# How long a probe waits for a worker to accept a connection.
_PROBE_S = 2.0


@dataclasses.dataclass(frozen=True)
class EngineCluster:
    """The worker processes that hold the engine's hosts, and the sessions' master.

    Attributes:
      cluster_spec: the whole cluster (job `worker`, maybe `chief`).
      master: the session target of every estimator session, `grpc://host:port`
        (for the chief's own server, a loopback name of it: `_loopback_target`).
      chief_task: this process's task in job `chief` when it runs the
        master's server (TF_CONFIG's chief), else None (a client of the master).
    """

    cluster_spec: tf.train.ClusterSpec
    master: str
    chief_task: int | None

    @property
    def num_hosts(self) -> int:
        """The engine's hosts: the tasks of job `worker`."""
        return self.cluster_spec.num_tasks(WORKER)

    def host_device(self, host: int) -> str:
        """The CPU device of host `host`'s worker (its engine, its table shards)."""
        return f"/job:{WORKER}/replica:0/task:{host}/device:CPU:0"

    def worker_address(self, host: int) -> str:
        """Host `host`'s `host:port`."""
        return self.cluster_spec.task_address(WORKER, host)


def engine_cluster_of(config: Any) -> EngineCluster | None:
    """Reads a `RunConfig`: None for one process, else the cluster the engine spans.

    Args:
      config: TPUEstimator's `RunConfig` (tpu or not), from `TF_CONFIG` or
        with `cluster=` a cluster resolver.

    Returns:
      None when the config describes no cluster of several tasks (also an
      evaluator's, whose cluster Estimator empties); else the cluster.

    Raises:
      ValueError: a cluster the engine cannot run on, naming why: no job
        `worker`, other jobs than `chief`, `worker` and `evaluator` (no
        parameter servers), this process is a `worker` (those run
        `tpu-embed-adam worker`), or no master to run the sessions on.
    """
    spec = getattr(config, "cluster_spec", None)
    if not spec or sum(spec.num_tasks(job) for job in spec.jobs) < 2:
        return None
    jobs = spec.as_dict()
    if WORKER not in jobs:
        raise ValueError(
            f"config: the RunConfig describes a cluster without a job {WORKER!r} ({jobs}): with "
            f"the CPU TPU embedding engine, the tasks of job {WORKER!r} are the embedding hosts "
            f"(`tpu-embed-adam worker` on each) and the {CHIEF!r} runs TPUEstimator."
        )
    others = sorted(set(jobs) - {CHIEF, WORKER, _EVALUATOR})
    if others:
        raise ValueError(
            f"config: the RunConfig's cluster has the jobs {others}; the CPU TPU embedding "
            f"engine's cluster is a {CHIEF!r} running TPUEstimator and the {WORKER!r} tasks "
            "holding the tables (no parameter servers: the tables live in the workers' engines)."
        )
    resolver = getattr(config, "cluster", None)
    task_type = getattr(resolver, "task_type", None) if resolver else config.task_type
    task_id = getattr(resolver, "task_id", None) if resolver else config.task_id
    if task_type == WORKER:
        raise ValueError(
            f"config: this process is task {task_id} of job {WORKER!r}, an embedding host: "
            f"run `tpu-embed-adam worker` there (it reads the same TF_CONFIG) and TPUEstimator "
            f"on the {CHIEF!r}."
        )
    master = config.master
    if not master and CHIEF in jobs:
        master = jobs[CHIEF][0]
    if not master:
        raise ValueError(
            f"config: the RunConfig's cluster {jobs} has no {CHIEF!r} and no master: give the "
            f"cluster a {CHIEF!r} task (TF_CONFIG) or the resolver a master "
            "(grpc://host:port of a task)."
        )
    if "://" not in master:
        master = _GRPC + master
    chief_task = None
    if task_type == CHIEF and master == _GRPC + jobs[CHIEF][task_id or 0]:
        chief_task = task_id or 0
        master = _loopback_target(jobs[CHIEF][chief_task])
    return EngineCluster(spec, master, chief_task)


def _loopback_target(address: str) -> str:
    """The chief's own server, reached through gRPC rather than in-process.

    A session whose target is a server of its own process talks to it
    in-process (TF's LocalMaster), and closing it then waits for a dead
    worker forever, whatever its operation timeout. Any other name of the
    same server (TF's servers listen on every IPv4 address) goes through
    gRPC, where the timeout bounds every call.
    """
    host, _, port = address.rpartition(":")
    alias = "localhost" if host == "127.0.0.1" else "127.0.0.1"
    return f"{_GRPC}{alias}:{port}"


def accepts(address: str) -> bool:
    """Whether a process accepts TCP connections at `host:port` (within 2 s).

    Args:
      address: a task's `host:port`.

    Returns:
      False also for an address that does not parse or resolve.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_PROBE_S):
            return True
    except (OSError, ValueError):
        return False
