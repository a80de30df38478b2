"""A warning when a `Saver` saves while the engine holds tables trained since their last retrieve.

TF's `TPUEmbedding` variables get the engine's rows only when its retrieve
ops run; `tf.compat.v1.train.Saver().save(...)` without them silently writes
the tables as they were last loaded or retrieved. `RetrievingSaver` is the
safe path; this is the net under the other one.

Why importing the package wraps `tf.compat.v1.train.Saver.save`, a global
side effect: the programs this engine serves are TF's own, unchanged, so the
save that loses the training is TF's own `Saver.save`, and its method is the
one place where every such save (also by `CheckpointSaverHook` or a subclass)
can be seen. The wrapper changes nothing a save does (same arguments, result
and errors): before it, it asks this process's engine which shards have had
steps applied since their last load or retrieve (one small op: microseconds
eagerly, a throwaway session where eager execution is disabled) and logs one
warning when there are some. `warn_unretrieved_saves(False)` restores TF's
own method. `RetrievingSaver` is never warned about: it retrieves first, and
a step landing between its retrieve and its save (training in another
thread) is not the mistake this warns of.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from absl import logging
from tensorflow.python.training import saver as tf_saver

from tpu_embed_adam.engine._session import RetrievingSaver
from tpu_embed_adam.engine._state import tables

__all__ = ["unretrieved_tables", "warn_unretrieved_saves"]

_LOCK = threading.Lock()
# TF's own `Saver.save` while the wrapper is installed, else None.
_TF_SAVE: Any = None


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


def _warn_if_unretrieved() -> None:
    stale = unretrieved_tables()
    if stale:
        names = ", ".join(f"'{name}' ({steps} steps)" for name, steps in sorted(stale.items()))
        logging.warning(
            "Saver.save: the TPU embedding engine trained %s since the last retrieve; the "
            "checkpoint holds those tables as last loaded or retrieved, not as trained. Run the "
            "TPUEmbedding's retrieve_ops() before saving, or save with "
            "tpu_embed_adam.engine.RetrievingSaver(retrieve_ops), which retrieves first.",
            names,
        )


def _checked_save(tf_save: Any) -> Any:
    @functools.wraps(tf_save)
    def save(self: tf_saver.Saver, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, RetrievingSaver):
            _warn_if_unretrieved()
        return tf_save(self, *args, **kwargs)

    return save


def warn_unretrieved_saves(enabled: bool = True) -> None:
    """Turns the warning on unretrieved saves on (the package's import does) or off.

    On, `tf.compat.v1.train.Saver.save` logs a warning naming the tables when
    this process's engine holds shards trained since their last retrieve;
    off, `Saver.save` is TF's own function again. Idempotent.

    Args:
      enabled: whether saves are checked.

    Raises:
      TypeError: `enabled` is not a bool.
    """
    global _TF_SAVE
    if not isinstance(enabled, bool):
        raise TypeError(f"warn_unretrieved_saves: `enabled` must be a bool, got {enabled!r}")
    with _LOCK:
        if enabled and _TF_SAVE is None:
            _TF_SAVE = tf_saver.Saver.save
            tf_saver.Saver.save = _checked_save(_TF_SAVE)
        elif not enabled and _TF_SAVE is not None:
            tf_saver.Saver.save = _TF_SAVE
            _TF_SAVE = None
