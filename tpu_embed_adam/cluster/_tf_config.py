"""TF_CONFIG: which task of which cluster this process is, as Estimator and TFJobs say it.

TF's Estimator, `tf.distribute` and Kubernetes TFJobs describe a cluster in
the `TF_CONFIG` environment variable::

    {"cluster": {"chief": ["chief-0:2222"], "worker": ["worker-0:2222", "worker-1:2222"]},
     "task": {"type": "worker", "index": 1}}

Here the jobs mean: `worker`, the embedding hosts (task `i` runs
`tpu-embed-adam worker` and holds host `i`'s shard of every table); `chief`,
the training program (TPUEstimator, `tf.estimator.train_and_evaluate`); an
`evaluator`, outside the cluster, evaluates checkpoints in its own process.
This module reads what a worker needs, with errors that name what is wrong
in `TF_CONFIG`, and turns TF's cluster resolvers into cluster specs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

__all__ = ["CHIEF", "TF_CONFIG", "WORKER", "as_cluster_spec_input", "worker_task_from_tf_config"]

TF_CONFIG = "TF_CONFIG"
# Estimator's and TFJob's job names (tensorflow_estimator's run_config.TaskType).
CHIEF = "chief"
WORKER = "worker"


def as_cluster_spec_input(cluster: Any) -> Any:
    """Returns a cluster resolver's `ClusterSpec`; anything else unchanged.

    `TFConfigClusterResolver` (TF_CONFIG), `SimpleClusterResolver` and every
    other `tf.distribute.cluster_resolver.ClusterResolver` are read through
    their `cluster_spec()`, so an API that takes a cluster spec takes them too.

    Args:
      cluster: a `ClusterResolver`, or what the caller checks itself (a
        `tf.train.ClusterSpec`, a dict).

    Returns:
      `cluster.cluster_spec()` for a resolver, else `cluster`.
    """
    if isinstance(cluster, tf.distribute.cluster_resolver.ClusterResolver):
        return cluster.cluster_spec()
    return cluster


def worker_task_from_tf_config(
    environ: Mapping[str, str] | None = None,
) -> tuple[tf.train.ClusterSpec, int]:
    """Reads the cluster and this embedding host's task from TF_CONFIG.

    Args:
      environ: the environment to read (default `os.environ`).

    Returns:
      `(cluster_spec, index)`: the whole cluster (every job, as
      `run_worker` takes it) and `task.index`, this process's task in job
      `worker`.

    Raises:
      ValueError: TF_CONFIG is unset, is not a JSON object, has no `cluster`
        with a `worker` job of `host:port` addresses, or its `task` is not
        `{"type": "worker", "index": i}` with `i` one of the worker tasks;
        the message says which.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG)
    if not text:
        raise ValueError(
            f"{TF_CONFIG} is not set: give --cluster_spec and --task, or set {TF_CONFIG} to "
            '{"cluster": {"worker": ["host0:2222", ...]}, "task": {"type": "worker", "index": i}} '
            "(what a Kubernetes TFJob sets)."
        )
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{TF_CONFIG} is not JSON ({e}); received: {text!r}.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{TF_CONFIG} must be a JSON object; received: {text!r}.")
    cluster = _cluster(config)
    index = _worker_index(config, len(cluster[WORKER]))
    return tf.train.ClusterSpec(cluster), index


def _cluster(config: dict[str, Any]) -> dict[str, list[str]]:
    """`config["cluster"]`, checked: jobs of `host:port` addresses, a `worker` job among them."""
    if "cluster" not in config:
        raise ValueError(
            f"{TF_CONFIG} has no `cluster`; received keys {sorted(config)}. A worker needs the "
            'whole cluster: {"cluster": {"worker": ["host0:2222", ...], ...}, ...}.'
        )
    cluster = config["cluster"]
    if not isinstance(cluster, dict):
        raise ValueError(
            f"{TF_CONFIG}'s `cluster` must be an object of job name to addresses; "
            f"received: {cluster!r}."
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(
                f"{TF_CONFIG}'s `cluster.{job}` must be a non-empty list of 'host:port' "
                f"addresses; received: {addresses!r}."
            )
        for address in addresses:
            _check_address(job, address)
    if WORKER not in cluster:
        raise ValueError(
            f"{TF_CONFIG}'s `cluster` has no job {WORKER!r} (the embedding hosts); it has "
            f"{sorted(cluster)}."
        )
    return cluster


def _check_address(job: str, address: Any) -> None:
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    # ASCII digits only (TF parses no others); no '/' in the host: TF's
    # server aborts the process on a 'grpc://' address.
    if (
        not host
        or "/" in host
        or not (port.isascii() and port.isdigit())
        or not 1 <= int(port) <= 65535
    ):
        raise ValueError(
            f"{TF_CONFIG}'s `cluster.{job}` has the address {address!r}, not 'host:port' "
            "(no scheme) with a port in [1, 65535]."
        )


def _worker_index(config: dict[str, Any], num_workers: int) -> int:
    """`config["task"]["index"]`, checked to be a task of job `worker`."""
    task = config.get("task")
    if not isinstance(task, dict):
        raise ValueError(
            f"{TF_CONFIG} must have a `task` object, {{\"type\": \"worker\", \"index\": i}}; "
            f"received: {task!r}."
        )
    task_type = task.get("type")
    if task_type != WORKER:
        raise ValueError(
            f"{TF_CONFIG}'s `task.type` is {task_type!r}: `tpu-embed-adam worker` serves the "
            f"embedding hosts, the tasks of job {WORKER!r}; the {CHIEF!r} runs the training "
            "program (TPUEstimator) and an 'evaluator' evaluates checkpoints, neither runs this "
            "command."
        )
    index = task.get("index")
    # TF's Estimator reads the index with int(), so "1" is a task too.
    if isinstance(index, str) and index.isascii() and index.isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"{TF_CONFIG}'s `task.index` must be an int; received: {index!r}.")
    if not 0 <= index < num_workers:
        raise ValueError(
            f"{TF_CONFIG}'s `task.index` is {index}, but `cluster.{WORKER}` has {num_workers} "
            f"task{'s' if num_workers != 1 else ''} (indices 0 to {num_workers - 1})."
        )
    return index
