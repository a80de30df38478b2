"""Reads and clears the process's engine through its own ops.

The ops run eagerly when eager execution is enabled (also when called while
building a graph), and otherwise in a throwaway graph and session (TF1
programs often disable eager execution): both reach the same per-process
engine, and the eager call costs microseconds rather than a session's
milliseconds (the fuzzer and the save check call `info()` often). `info`
also reads another process's engine: a worker's, through a session on a
cluster target.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import tensorflow as tf

from tpu_embed_adam import _library

__all__ = ["info", "reset", "tables"]

# A bound on a worker's session: `info` takes the engine's lock for
# microseconds, and without a bound, a session that includes a dead worker
# waits for it forever when it starts or closes (TF 2.15).
_REMOTE_TIMEOUT_MS = 10_000


def library() -> Any:
    """The loaded kernel library.

    Raises:
      RuntimeError: it did not load.
    """
    module = _library.load_library()
    if module is None:
        raise RuntimeError(
            "the tpu_embed_adam kernel library did not load "
            f"({_library.load_error()}); build it with `make lib`."
        )
    return module


def _run(make_op: Any) -> Any:
    with tf.init_scope():
        if tf.executing_eagerly():
            result = make_op()
            return None if result is None else result.numpy()
    with tf.Graph().as_default():
        op = make_op()
        with tf.compat.v1.Session() as sess:
            return sess.run(op)


def reset(target: str | None = None, task: int | None = None) -> None:
    """Clears this process's engine, or a worker's: configuration, tables, slots, queues.

    The next op carrying a `TPUEmbeddingConfiguration` configures it afresh.
    `tpu.shutdown_system()` (ShutdownDistributedTPU) has the same effect.

    Args:
      target: as for `info`.
      task: as for `info`.

    Raises:
      As `info`.
    """
    _run_where(library().tpu_embed_adam_engine_reset, target, task)


def _run_on_worker(make_op: Any, target: Any, task: Any) -> Any:
    if not isinstance(target, str):
        raise TypeError(
            f"Argument `target` must be a string such as 'grpc://host:port'; "
            f"received: {target!r} ({type(target).__name__})."
        )
    if not target:
        raise ValueError("Argument `target` must name a cluster's server, not ''.")
    if isinstance(task, bool) or not isinstance(task, numbers.Integral):
        raise TypeError(
            f"Argument `task` must be an int; received: {task!r} ({type(task).__name__})."
        )
    if task < 0:
        raise ValueError(f"Argument `task` must be >= 0; received: {task!r}.")
    worker = f"/job:worker/replica:0/task:{task}"
    # Only this worker: the others may be busy, or dead.
    config = tf.compat.v1.ConfigProto(
        device_filters=[worker], operation_timeout_in_ms=_REMOTE_TIMEOUT_MS
    )
    with tf.Graph().as_default():
        with tf.device(f"{worker}/device:CPU:0"):
            op = make_op()
        try:
            with tf.compat.v1.Session(target, config=config) as sess:
                return sess.run(op)
        except tf.errors.DeadlineExceededError as e:
            # TF's message names no task: a session waits for a dead worker.
            raise tf.errors.DeadlineExceededError(
                e.node_def, e.op,
                f"{worker} did not answer through {target} within "
                f"{_REMOTE_TIMEOUT_MS / 1000:g} s: is its process alive? ({e.message})",
            ) from e


def _run_where(make_op: Any, target: Any, task: Any) -> Any:
    """Runs the op in this process (neither given) or on a worker (both given)."""
    if (target is None) != (task is None):
        missing = "task" if task is None else "target"
        raise ValueError(
            f"Argument `{missing}` is missing: give both `target` and `task` (a worker's "
            f"engine) or neither (this process's); received: target={target!r}, task={task!r}."
        )
    if target is None:
        return _run(make_op)
    return _run_on_worker(make_op, target, task)


def info(target: str | None = None, task: int | None = None) -> dict[str, Any]:
    """Returns what this process's engine holds, or what a worker's holds.

    Keys: `pid` (the id of the process that holds the engine), `configured`,
    `num_hosts`, `cores_per_host`, `num_features`, `queued_batches`
    (enqueued, not yet received), `deferred_loads` (loads waiting for a
    configuration), `bytes` (tables, slots and pending gradients), and
    `tables`: one dict per table with `name`, `id`, `vocabulary_size`,
    `dimension`, `sharding` (`"div"` or `"mod"`), `num_shards`, `bytes` and
    `shards` (`shard`, `rows`, `loaded` in that process,
    `steps_since_retrieve`: steps applied to the shard since its last Load
    or Retrieve op, `bytes`).

    Args:
      target: a cluster's session target (`grpc://host:port`, e.g.
        `LocalCluster.target`); with `task`, reads that worker's engine.
      task: the worker's task in job `worker`; the op runs on
        `/job:worker/replica:0/task:{task}/device:CPU:0`.

    Returns:
      The engine's state as a dict.

    Raises:
      ValueError: only one of `target` and `task` is given, `target` is empty,
        or `task` < 0.
      TypeError: `target` is not a string or `task` not an int.
      tf.errors.OpError: the worker is not in the cluster, is gone
        (`UnavailableError` naming it), or did not answer within 10 s
        (`DeadlineExceededError` naming it).
    """
    return json.loads(_run_where(library().tpu_embed_adam_engine_info, target, task))


def tables(target: str | None = None, task: int | None = None) -> list[dict[str, Any]]:
    """Returns `info(target, task)["tables"]`, in table id (= name) order.

    Args:
      target: as for `info`.
      task: as for `info`.

    Returns:
      One dict per table.

    Raises:
      As `info`.
    """
    return info(target, task)["tables"]
