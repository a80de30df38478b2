"""The sessions of a TPUEstimator on a cluster: their server, their config, their errors.

- **Server.** The chief's sessions run on its own `tf.distribute.Server`.
  `tf.estimator.train_and_evaluate` starts it (TF's executor, for a chief);
  `train`, `evaluate` and `predict` called directly start one if nothing
  serves at the chief's address yet, once per process, and a later
  `train_and_evaluate` in that process takes it (TF cannot stop a server,
  and a second one at the address would not bind).
- **Config.** Every session gets `operation_timeout_in_ms` (unless the
  RunConfig's session_config sets one): TF 2.15 waits forever for a dead
  worker when it creates or closes a session, and Estimator's
  MonitoredSession does both after a failed step. Sessions keep their own
  variables on the workers (`isolate_session_state`), as each session does
  in one process.
- **Errors.** An error from a session on the cluster that names no task
  gets the tasks that do not accept connections any more.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import tensorflow as tf
from absl import logging
from tensorflow_estimator.python.estimator import training as estimator_training

from tpu_embed_adam.estimator._cluster import CHIEF, EngineCluster, accepts
from tpu_embed_adam.estimator._lost_workers import WorkerLostError, raise_when_a_worker_is_lost

__all__ = [
    "DEFAULT_OPERATION_TIMEOUT_MS",
    "cluster_session_config",
    "config_for_cluster",
    "ensure_master_serves",
    "on_cluster",
    "with_unreachable_workers",
]

# Longer than any one run of an estimator session (a step, a restore or a
# full retrieve of a large table), short enough that a dead host ends a
# program within minutes rather than never.
DEFAULT_OPERATION_TIMEOUT_MS = 300_000
# The servers this process started, by address; TF 2.15 cannot stop one.
_SERVERS: dict[str, tf.distribute.Server] = {}
_SERVERS_LOCK = threading.Lock()


def cluster_session_config(session_config: Any) -> tf.compat.v1.ConfigProto:
    """A copy of `session_config` for a session on the cluster.

    Args:
      session_config: the estimator's `ConfigProto` (None: a default one).

    Returns:
      The copy, with `operation_timeout_in_ms` set to
      `DEFAULT_OPERATION_TIMEOUT_MS` where it was 0 (no bound) and
      `isolate_session_state` on.
    """
    config = tf.compat.v1.ConfigProto()
    if session_config is not None:
        config.CopyFrom(session_config)
    if not config.operation_timeout_in_ms:
        config.operation_timeout_in_ms = DEFAULT_OPERATION_TIMEOUT_MS
    config.isolate_session_state = True
    return config


def config_for_cluster(config: Any, cluster: EngineCluster) -> Any:
    """A copy of an estimator's `RunConfig` whose sessions run on the cluster.

    Args:
      config: the estimator's `RunConfig` (TF's constructor completed it).
      cluster: what `engine_cluster_of(config)` returned.

    Returns:
      The copy: `cluster_session_config` of its session config, and the
      cluster's master (`grpc://`) as master and evaluation master, where a
      resolver's master came without its scheme.
    """
    config = config.replace(session_config=cluster_session_config(config.session_config))
    # RunConfig.replace refuses these two; the copy is the estimator's own.
    config._master = cluster.master
    config._evaluation_master = cluster.master
    return config


@contextlib.contextmanager
def on_cluster(cluster: EngineCluster | None, session_config: Any = None) -> Iterator[None]:
    """Around an estimator call: the master serves, no wait for a lost worker is endless.

    TF's MonitoredSession takes a failed step for a preempted worker and
    creates its session again, retrying until the worker answers (a TFJob
    restarts it; the new session restores the last checkpoint and loads
    every worker's tables). A worker that accepts no connection for the
    session's operation timeout is lost: the call then ends with
    `tf.errors.UnavailableError` naming it (`_lost_workers`).

    Args:
      cluster: the estimator's cluster; None (one process) does nothing.
      session_config: the estimator's session config, whose
        `operation_timeout_in_ms` is how long a worker may be away.

    Yields:
      Nothing.

    Raises:
      tf.errors.OpError: what the call raised, with the unreachable workers
        named (`with_unreachable_workers`), or `UnavailableError` for a
        worker lost for longer than the timeout.
    """
    if cluster is None:
        yield
        return
    ensure_master_serves(cluster)
    timeout_ms = getattr(session_config, "operation_timeout_in_ms", 0)
    deadline_s = (timeout_ms or DEFAULT_OPERATION_TIMEOUT_MS) / 1000
    try:
        with raise_when_a_worker_is_lost(cluster, deadline_s):
            yield
    except WorkerLostError as e:
        raise tf.errors.UnavailableError(None, None, str(e)) from None
    except tf.errors.OpError as e:
        named = with_unreachable_workers(e, cluster)
        if named is e:
            raise
        raise named from e


def ensure_master_serves(cluster: EngineCluster) -> None:
    """Starts this process's chief server if the sessions' master is it and none serves yet.

    Args:
      cluster: the estimator's cluster.

    Raises:
      tf.errors.OpError: the server could not start.
    """
    if cluster.chief_task is None:
        return
    address = cluster.cluster_spec.task_address(CHIEF, cluster.chief_task)
    with _SERVERS_LOCK:
        # train_and_evaluate's executor starts the chief's server itself.
        if address in _SERVERS or accepts(address):
            return
        logging.info("starting the chief's server at %s for the estimator's sessions", address)
        _SERVERS[address] = tf.distribute.Server(
            cluster.cluster_spec, job_name=CHIEF, task_index=cluster.chief_task, start=True
        )
        _let_train_and_evaluate_reuse_servers()


def _let_train_and_evaluate_reuse_servers() -> None:
    """Once per process: `train_and_evaluate` takes the chief's server started here.

    Its executor starts a server for the chief's task itself; after a
    `train` that started one (TF 2.15 cannot stop a server), the second
    would not bind ("Address already in use"). Called with `_SERVERS_LOCK`.
    """
    executor = estimator_training._TrainingExecutor
    start_std_server = executor._start_std_server
    if getattr(start_std_server, "reuses_servers", False):
        return

    def start_std_server_unless_serving(self: Any, config: Any) -> Any:
        try:
            address = config.cluster_spec.task_address(config.task_type, config.task_id)
        except (AttributeError, TypeError, ValueError):  # no cluster: TF's own error
            return start_std_server(self, config)
        with _SERVERS_LOCK:
            server = _SERVERS.get(address)
        return server if server is not None else start_std_server(self, config)

    start_std_server_unless_serving.reuses_servers = True  # type: ignore[attr-defined]
    executor._start_std_server = start_std_server_unless_serving


def with_unreachable_workers(error: tf.errors.OpError, cluster: EngineCluster) -> Any:
    """Returns `error`, or a copy whose message also names the workers that are gone.

    Args:
      error: what a session on the cluster raised.
      cluster: the estimator's cluster.

    Returns:
      `error` itself when every worker accepts connections or the message
      already names a task of job `worker`; else an error of the same type
      whose message ends with the unreachable tasks and addresses.
    """
    if "/job:worker/replica:0/task:" in error.message:
        return error
    hosts = range(cluster.num_hosts)
    with futures.ThreadPoolExecutor(max_workers=min(16, cluster.num_hosts)) as pool:
        alive = list(pool.map(lambda h: accepts(cluster.worker_address(h)), hosts))
    gone = [h for h in hosts if not alive[h]]
    if not gone:
        return error
    names = ", ".join(
        f"/job:worker/replica:0/task:{h} ({cluster.worker_address(h)})" for h in gone
    )
    return type(error)(
        error.node_def,
        error.op,
        f"{error.message}\n\ntpu_embed_adam: no process accepts connections for {names}: "
        "the worker is gone, with its shards of every table. Start it again (the same "
        "TF_CONFIG) and train again: the estimator restores the last checkpoint.",
    )

