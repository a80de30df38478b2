"""Reads and clears the process's engine through its own ops.

The ops run eagerly when eager execution is enabled (also when called while
building a graph), and otherwise in a throwaway graph and session (TF1
programs often disable eager execution): both reach the same per-process
engine, and the eager call costs microseconds rather than a session's
milliseconds (the fuzzer and the save check call `info()` often).
"""

from __future__ import annotations

import json
from typing import Any

import tensorflow as tf

from tpu_embed_adam.ops import loader

__all__ = ["info", "reset", "tables"]


def _library() -> Any:
    library = loader.load_library()
    if library is None:
        raise RuntimeError(
            "the tpu_embed_adam kernel library did not load "
            f"({loader.load_error()}); build it with `make lib`."
        )
    return library


def _run(make_op: Any) -> Any:
    with tf.init_scope():
        if tf.executing_eagerly():
            result = make_op()
            return None if result is None else result.numpy()
    with tf.Graph().as_default():
        op = make_op()
        with tf.compat.v1.Session() as sess:
            return sess.run(op)


def reset() -> None:
    """Clears this process's engine: configuration, tables, slots, queues.

    The next op carrying a `TPUEmbeddingConfiguration` configures it afresh.
    `tpu.shutdown_system()` (ShutdownDistributedTPU) has the same effect.
    """
    _run(_library().tpu_embed_adam_engine_reset)


def info() -> dict[str, Any]:
    """Returns what this process's engine holds.

    Keys: `configured`, `num_hosts`, `cores_per_host`, `num_features`,
    `queued_batches` (enqueued, not yet received), `bytes` (tables, slots and
    pending gradients), and `tables`: one dict per table with `name`, `id`,
    `vocabulary_size`, `dimension`, `sharding` (`"div"` or `"mod"`),
    `num_shards`, `bytes` and `shards` (`shard`, `rows`, `loaded` in this
    process, `steps_since_retrieve`: steps applied to the shard since its
    last Load or Retrieve op, `bytes`).
    """
    return json.loads(_run(_library().tpu_embed_adam_engine_info))


def tables() -> list[dict[str, Any]]:
    """Returns `info()["tables"]`, in table id (= name) order."""
    return info()["tables"]
