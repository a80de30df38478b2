"""Ends an estimator call whose worker is gone for good, instead of retrying forever.

TF's MonitoredSession (every Estimator call) takes an `UnavailableError` for
a preempted task: it closes its session and creates one again, and retries
the creation for as long as the task does not answer. That is right while a
TFJob restarts a worker (the new session restores the last checkpoint and
loads every worker's tables), and endless when nothing restarts it. So a
thread probes each worker's address while the call runs; one that accepts
no connection is logged as an ERROR at once, and one that stays away for
the deadline makes the call raise in its own thread (each blocked TF call
returns within the session's operation timeout, and the exception comes
then). A worker that never served during the call is not watched: TF's
session creation waits for it, within the operation timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator

from absl import logging

from tpu_embed_adam.estimator._cluster import EngineCluster, accepts

__all__ = ["WorkerLostError", "raise_when_a_worker_is_lost"]

_INTERVAL_S = 1.0


class WorkerLostError(BaseException):
    """A worker accepted no connection for longer than the deadline.

    A `BaseException`, as `KeyboardInterrupt` is: raised asynchronously into
    the estimator's thread, it must pass TF's `except Exception` handlers.
    Its message is a class attribute (an asynchronous raise takes a class).
    """

    message = "a worker of the cluster is lost"

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def raise_when_a_worker_is_lost(cluster: EngineCluster, deadline_s: float) -> Iterator[None]:
    """Raises `WorkerLostError` in this thread once a worker has been away for `deadline_s`.

    Args:
      cluster: the workers to watch.
      deadline_s: how long a worker may accept no connection.

    Yields:
      Nothing; the body runs while the workers are watched.

    Raises:
      WorkerLostError: naming the task, its address and how long it was away.
    """
    thread_id = threading.get_ident()
    lock = threading.Lock()
    running = [True]
    stop = threading.Event()

    def watch() -> None:
        away_since: dict[int, float] = {}
        # Only a worker seen serving can be lost; one still starting is
        # TF's to wait for (session creation, bounded by its timeout).
        seen: set[int] = set()
        while not stop.wait(_INTERVAL_S):
            for host in range(cluster.num_hosts):
                address = cluster.worker_address(host)
                if accepts(address):
                    seen.add(host)
                    away_since.pop(host, None)
                    continue
                if host not in seen:
                    continue
                now = time.monotonic()
                if host not in away_since:
                    away_since[host] = now
                    logging.error(
                        "worker /job:worker/replica:0/task:%d at %s accepts no connection: "
                        "TF retries its session until the worker answers again (a restarted "
                        "worker: training resumes from the last checkpoint), for at most %g s",
                        host, address, deadline_s,
                    )
                if now - away_since[host] >= deadline_s:
                    _raise_in(thread_id, host, address, now - away_since[host], lock, running)
                    return

    watcher = threading.Thread(target=watch, name="lost-worker-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        with lock:
            running[0] = False
        watcher.join()


def _raise_in(
    thread_id: int, host: int, address: str, away_s: float, lock: threading.Lock, running: list
) -> None:
    message = (
        f"worker /job:worker/replica:0/task:{host} at {address} has accepted no connection for "
        f"{away_s:.0f} s (the session's operation timeout): it is gone, with its shards of every "
        "table. Start it again (the same TF_CONFIG) and run the chief again: the estimator "
        "restores the last checkpoint."
    )
    logging.error("%s", message)
    lost = type("WorkerLostError", (WorkerLostError,), {"message": message})
    with lock:
        # Not once the call is over: the exception would land in the caller's code.
        if running[0]:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(thread_id), ctypes.py_object(lost)
            )
