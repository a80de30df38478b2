"""A warning when a `Saver` or `Checkpoint` saves tables trained since their last retrieve.

TF's `TPUEmbedding` variables get the engine's rows only when its retrieve
ops run; `tf.compat.v1.train.Saver().save(...)` without them silently writes
the tables as they were last loaded or retrieved. `RetrievingSaver` is the
safe path; this is the net under the other one.

Why importing the package wraps `tf.compat.v1.train.Saver.save`, a global
side effect: the programs this engine serves are TF's own, unchanged, so the
save that loses the training is TF's own `Saver.save`, and its method is the
one place where every such save (also by `CheckpointSaverHook` or a subclass)
can be seen. Object-based checkpoints (`tf.compat.v1.train.Checkpoint`,
`tf.train.Checkpoint`; `save` and `write`) all write through their class's
`_write`, which is wrapped the same way. The wrapper changes nothing a save
does (same arguments, result and errors): before it, it asks this process's
engine which shards have had steps applied since their last load or retrieve
(one small op: microseconds eagerly, a throwaway session where eager execution
is disabled) and logs one warning when there are some.
`warn_unretrieved_saves(False)` restores TF's own method. `RetrievingSaver` is
never warned about: it retrieves first, and a step landing between its
retrieve and its save (training in another thread) is not the mistake this
warns of."""

from __future__ import annotations

import functools
import threading
from typing import Any

from absl import logging
from tensorflow.python.checkpoint import checkpoint as tf_checkpoint
from tensorflow.python.training import saver as tf_saver

from tpu_embed_adam.engine._session import RetrievingSaver
from tpu_embed_adam.engine._state import tables

__all__ = ["unretrieved_tables", "warn_unretrieved_saves"]

_LOCK = threading.Lock()
# Each checked method: (class, attribute, what the warning calls it).
_CHECKED = (
    (tf_saver.Saver, "save", "Saver.save"),
    (tf_checkpoint.CheckpointV1, "_write", "tf.compat.v1.train.Checkpoint"),
    (tf_checkpoint.Checkpoint, "_write", "tf.train.Checkpoint"),
)
# TF's own methods, in `_CHECKED` order, while the wrappers are installed.
_TF_METHODS: list[Any] = []


def unretrieved_tables() -> dict[str, int]:
    """Returns the tables with steps applied since their last load or retrieve.

    Returns:
      Table name -> the most steps any of its shards held in this process has
      had applied since that shard's last Load or Retrieve op; tables whose
      shards are all up to date in their variables are left out.
    """
    out = {}
    for table in tables():
        steps = max((s["steps_since_retrieve"] for s in table["shards"]), default=0)
        if steps:
            out[table["name"]] = steps
    return out


def _warn_if_unretrieved(what: str) -> None:
    stale = unretrieved_tables()
    if stale:
        names = ", ".join(f"'{name}' ({steps} steps)" for name, steps in sorted(stale.items()))
        logging.warning(
            "%s: the TPU embedding engine trained %s since the last retrieve; the "
            "checkpoint holds those tables as last loaded or retrieved, not as trained. Run the "
            "TPUEmbedding's retrieve_ops() (or tpu_embed_adam.engine.retrieve_touched_ops) "
            "before saving, or save with tpu_embed_adam.engine.RetrievingSaver(retrieve_ops), "
            "which retrieves first.",
            what,
            names,
        )


def _checked(tf_method: Any, what: str) -> Any:
    @functools.wraps(tf_method)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, RetrievingSaver):
            _warn_if_unretrieved(what)
        return tf_method(self, *args, **kwargs)

    return method


def warn_unretrieved_saves(enabled: bool = True) -> None:
    """Turns the warning on unretrieved saves on (the package's import does) or off.

    On, `tf.compat.v1.train.Saver.save` and every write of a
    `tf.compat.v1.train.Checkpoint` or `tf.train.Checkpoint` log a warning
    naming the tables when this process's engine holds shards trained since
    their last retrieve; off, they are TF's own methods again. Idempotent.

    Args:
      enabled: whether saves are checked.

    Raises:
      TypeError: `enabled` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"warn_unretrieved_saves: `enabled` must be a bool, got {enabled!r}")
    with _LOCK:
        if enabled and not _TF_METHODS:
            for owner, name, what in _CHECKED:
                _TF_METHODS.append(getattr(owner, name))
                setattr(owner, name, _checked(_TF_METHODS[-1], what))
        elif not enabled and _TF_METHODS:
            for (owner, name, _), tf_method in zip(_CHECKED, _TF_METHODS, strict=True):
                setattr(owner, name, tf_method)
            _TF_METHODS.clear()
