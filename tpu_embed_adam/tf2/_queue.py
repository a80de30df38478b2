"""The batch `enqueue` leaves for `dequeue` and `apply_gradients`, one per graph.

On a TPU, `enqueue` feeds a device queue that the next `dequeue` reads and
the next `apply_gradients` answers. On CPU the three calls meet in one
program: eagerly, or traced into one `tf.function` (where `strategy.run`
and the body of a `tf.range` loop trace into the function's graph or a graph
inside it). So the batch is kept per graph, and a call finds the one of its
own graph or of a graph it is traced inside; a batch enqueued eagerly is not
visible inside a `tf.function`, whose trace would otherwise bake it in as a
constant. Each enqueue feeds one dequeue and, with `training=True`, one
`apply_gradients`, as the TPU's queue does; a second use of the same batch
raises, where a TPU would wait forever.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import tensorflow as tf
from absl import logging
from tensorflow.python.framework import ops

from tpu_embed_adam.tf2._inputs import FeatureBatch

__all__ = ["BatchQueue", "Pending"]


@dataclasses.dataclass
class Pending:
    """One enqueued batch and what has been done with it.

    Attributes:
      batches: the features' batches, in `feature_config`'s flat order.
      structure: the features as enqueued: `dequeue` returns this structure
        (`feature_config` itself is wrapped by TF's object tracking, and
        `tf.function` cannot return its wrappers).
      training: `enqueue`'s `training` argument.
      dequeued: whether `dequeue` read it.
      applied: whether `apply_gradients` answered it.
    """

    batches: tuple[FeatureBatch, ...]
    structure: Any
    training: bool
    dequeued: bool = False
    applied: bool = False


def _where() -> str:
    return "inside this tf.function" if not tf.executing_eagerly() else "eagerly"


class BatchQueue:
    """The pending batch of each graph (and of eager execution).

    Args:
      warn_unapplied: log a warning when a training batch is replaced before
        its `apply_gradients` (off where training batches are enqueued for
        evaluation too, as TF Recommenders' layer does).
    """

    def __init__(self, warn_unapplied: bool = True) -> None:
        self._by_graph: weakref.WeakKeyDictionary[Any, Pending] = weakref.WeakKeyDictionary()
        self._eager: Pending | None = None
        self._warn_unapplied = warn_unapplied

    def put(self, pending: Pending) -> None:
        """Makes `pending` the batch of the current graph (or of eager execution)."""
        previous = self._find()
        if self._warn_unapplied and previous and previous.training and not previous.applied:
            logging.warning(
                "TPUEmbedding.enqueue: the batch enqueued before with training=True got no "
                "apply_gradients; on a TPU the embedding engine would still wait for its "
                "gradients. Enqueue with training=False when not training."
            )
        if tf.executing_eagerly():
            self._eager = pending
        else:
            self._by_graph[ops.get_default_graph()] = pending

    def _find(self) -> Pending | None:
        if tf.executing_eagerly():
            return self._eager
        graph = ops.get_default_graph()
        while graph is not None:
            if graph in self._by_graph:
                return self._by_graph[graph]
            graph = getattr(graph, "outer_graph", None)
        return None

    def _pending(self, caller: str) -> Pending:
        pending = self._find()
        if pending is None:
            raise RuntimeError(
                f"TPUEmbedding.{caller}: nothing enqueued {_where()}. Call enqueue first; "
                "on CPU, enqueue and the dequeue and apply_gradients of its batch run in "
                "the same tf.function (or all eagerly)."
            )
        return pending

    def for_dequeue(self) -> Pending:
        """Returns the batch for `dequeue` and marks it read.

        Raises:
          RuntimeError: nothing enqueued here, or the batch was dequeued already.
        """
        pending = self._pending("dequeue")
        if pending.dequeued:
            raise RuntimeError(
                "TPUEmbedding.dequeue: the batch enqueued last was dequeued already; each "
                "enqueue feeds one dequeue (a TPU would wait for another enqueue)."
            )
        pending.dequeued = True
        return pending

    def for_update(self) -> Pending:
        """Returns the batch for `apply_gradients`, which must then be applied.

        Raises:
          RuntimeError: nothing enqueued here, a batch enqueued with
            `training=False`, or one whose gradients were applied already.
        """
        pending = self._pending("apply_gradients")
        if not pending.training:
            raise RuntimeError(
                "TPUEmbedding.apply_gradients: the batch enqueued last had training=False; "
                "enqueue with training=True to train on it."
            )
        if pending.applied:
            raise RuntimeError(
                "TPUEmbedding.apply_gradients: the gradients of the batch enqueued last were "
                "applied already; each training enqueue takes one apply_gradients."
            )
        return pending
