"""One engine per process, shared by every TPUEstimator session in it.

The engine holds one configuration and its tables at a time. TRAIN and EVAL
configure different ones (TRAINING and INFERENCE, as TPUEstimator does on a
TPU), each session when it starts. An evaluation inside training
(`train_and_evaluate` evaluates after each checkpoint from inside `train`;
`InMemoryEvaluatorHook` from a training hook) therefore replaced the training
configuration and tables, and training's next step failed ("config differs");
two estimators of one configuration training in two threads silently trained
each other's tables.

So every engine session carries an `EngineSessionHook`: a session that finds
the engine taken by another session of this process takes it back before its
step or its save (`EngineSaver`), after the other's trained rows were copied
into that session's table variables, from which it reloads them when it takes
the engine back in turn. Sessions of one thread nest (an evaluation inside
training); engine estimators' `train` and `evaluate` calls in different
threads run one at a time (`ENGINE_CALLS`), since a session can hand the
engine over only between its own steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import tensorflow as tf

from tpu_embed_adam.engine import RetrievingSaver, configure_ops

# Held by an engine estimator's train() and evaluate(); reentrant, so a call
# nested in the same thread (an evaluation inside training) goes ahead.
ENGINE_CALLS = threading.RLock()


class EngineSessionHook(tf.compat.v1.train.SessionRunHook):
    """Keeps one session's tables in the engine while other sessions come and go.

    The session's local init op configures the engine and loads its tables
    (`engine.load_tables_at_session_start`); this hook claims the engine for
    the session just before (after saving what the previous owner trained),
    and before each step reloads the tables if another session took the
    engine meanwhile.
    """

    # The hook whose session last configured the engine, in this process.
    _owner: ClassVar[EngineSessionHook | None] = None

    def __init__(
        self,
        config_proto: Any,
        load_ops_fn: Callable[[], list[Any]],
        save_ops: list[Any],
        configure_devices: Sequence[str] | None = None,
    ):
        """Builds the hook's ops (in the session's graph, before it is finalized).

        Args:
          config_proto: the graph's `TPUEmbeddingConfiguration`.
          load_ops_fn: builds TF's load ops (`VariablesAndOps.load_ops`).
          save_ops: ops that copy the tables trained since their last load or
            retrieve into their variables (none for EVAL, which trains nothing).
          configure_devices: the engines to configure, one device per process
            (a cluster's workers); None: this process's.
        """
        configure = configure_ops(config_proto, configure_devices)
        with tf.control_dependencies(configure):
            self._reload = tf.group(*load_ops_fn(), name="tpu_embed_adam_reload_tables")
        self._save = tf.group(*save_ops) if save_ops else None
        self._session: Any = None

    def begin(self) -> None:
        # The session about to be created configures the engine: what the
        # current owner trained must reach its variables first.
        self._take_engine()

    def after_create_session(self, session: Any, coord: Any) -> None:
        del coord
        self._session = session

    def before_run(self, run_context: Any) -> None:
        self.take_engine(run_context.session)

    def take_engine(self, session: Any) -> None:
        """Reloads this session's tables if another session took the engine since.

        Args:
          session: this hook's session.
        """
        if EngineSessionHook._owner is not self:
            self._take_engine()
            session.run(self._reload)

    def end(self, session: Any) -> None:
        del session
        # The engine keeps the tables, but nothing needs them saved any more
        # (and the owner would keep this graph alive).
        if EngineSessionHook._owner is self:
            EngineSessionHook._owner = None

    def _take_engine(self) -> None:
        owner = EngineSessionHook._owner
        if owner is not None and owner is not self:
            owner._save_tables()
        EngineSessionHook._owner = self

    def _save_tables(self) -> None:
        # A closed session (ended, or failed) has nothing left to keep; TF's
        # Session says so only through `_closed`.
        if self._save is not None and self._session is not None and not self._session._closed:
            self._session.run(self._save)


class EngineSaver(RetrievingSaver):
    """A `RetrievingSaver` that first takes the engine back for its session.

    A save can come after another session took the engine without a step in
    between: the final checkpoint after an `InMemoryEvaluatorHook`'s last
    evaluation, whose hook ends before TF's `CheckpointSaverHook`.
    """

    def __init__(self, hook: EngineSessionHook, retrieve_ops: list[Any], **kwargs: Any):
        """Builds the saver.

        Args:
          hook: the session's `EngineSessionHook`.
          retrieve_ops: TF's retrieve ops of the graph's `TPUEmbedding`.
          **kwargs: passed to `tf.compat.v1.train.Saver`.
        """
        super().__init__(retrieve_ops, **kwargs)
        self._hook = hook

    def save(self, sess: Any, *args: Any, **kwargs: Any) -> Any:
        """Takes the engine back, retrieves the tables, then saves; as `Saver.save`."""
        self._hook.take_engine(sess)
        return super().save(sess, *args, **kwargs)
