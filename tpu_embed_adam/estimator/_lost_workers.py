"""Ends an estimator call whose worker is gone for good, instead of retrying forever.

TF's MonitoredSession (every Estimator call) takes an `UnavailableError` for
a preempted task: it closes its session and creates one again, and retries
the creation for as long as the task does not answer. That is right while a
TFJob restarts a worker (the new session restores the last checkpoint and
loads every worker's tables), and endless when nothing restarts it. So a
thread probes each worker's address while the call runs; one that accepts
no connection is logged as an ERROR at once, and once it has stayed away
for the deadline the call's next session creation raises `WorkerLostError`
instead of trying again. The raise is synchronous, in the calling thread,
at a point where TF runs Python: each blocked TF call returns within the
session's operation timeout, and MonitoredSession then creates its session
again. A worker that never served during the call is not watched: TF's
session creation waits for it, within the operation timeout.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging
from tensorflow.python.training import monitored_session

from tpu_embed_adam.estimator._cluster import EngineCluster, accepts

__all__ = ["WorkerLostError", "raise_when_a_worker_is_lost"]

_INTERVAL_S = 1.0
# What the watch of each calling thread found: the message of a lost worker.
_LOST: dict[int, list[str]] = {}
_LOST_LOCK = threading.Lock()


class WorkerLostError(Exception):
    """A worker accepted no connection for longer than the deadline.

    Not a `tf.errors.OpError`: MonitoredSession retries a session creation
    that raises `UnavailableError` or `AbortedError`, and this must end it.
    """


@contextlib.contextmanager
def raise_when_a_worker_is_lost(cluster: EngineCluster, deadline_s: float) -> Iterator[None]:
    """Makes this thread's session creations raise once a worker has been away for `deadline_s`.

    Args:
      cluster: the workers to watch.
      deadline_s: how long a worker may accept no connection.

    Yields:
      Nothing; the body runs while the workers are watched.

    Raises:
      WorkerLostError: from the body's next `ChiefSessionCreator` or
        `WorkerSessionCreator.create_session` after the deadline, naming
        the task, its address and how long it was away.
    """
    _patch_session_creators()
    thread_id = threading.get_ident()
    found: list[str] = []
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
                    message = _lost_message(host, address, now - away_since[host])
                    logging.error("%s", message)
                    with _LOST_LOCK:
                        found.append(message)
                    return

    with _LOST_LOCK:
        previous = _LOST.get(thread_id)
        _LOST[thread_id] = found
    watcher = threading.Thread(target=watch, name="lost-worker-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        with _LOST_LOCK:
            if previous is None:
                del _LOST[thread_id]
            else:
                _LOST[thread_id] = previous


def _lost_message(host: int, address: str, away_s: float) -> str:
    return (
        f"worker /job:worker/replica:0/task:{host} at {address} has accepted no connection for "
        f"{away_s:.0f} s (the session's operation timeout): it is gone, with its shards of every "
        "table. Start it again (the same TF_CONFIG) and run the chief again: the estimator "
        "restores the last checkpoint."
    )


def _raise_if_lost() -> None:
    with _LOST_LOCK:
        found = list(_LOST.get(threading.get_ident(), ()))
    if found:
        raise WorkerLostError(found[0])


def _patch_session_creators() -> None:
    """Once per process: the session creators Estimator uses check the calling thread's watch."""
    with _LOST_LOCK:
        for creator in (monitored_session.ChiefSessionCreator,
                        monitored_session.WorkerSessionCreator):
            if not getattr(creator.create_session, "checks_lost_workers", False):
                creator.create_session = _checked(creator.create_session)


def _checked(create_session: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def create_session_unless_a_worker_is_lost(self: Any) -> Any:
        _raise_if_lost()
        return create_session(self)

    create_session_unless_a_worker_is_lost.checks_lost_workers = True  # type: ignore[attr-defined]
    return create_session_unless_a_worker_is_lost
