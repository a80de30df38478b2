"""Make TF use ours, reversibly: `AdamParameters`, `TPUEstimator` and TF2's `TPUEmbedding`.

Importing `tpu_embed_adam` changes none of this (its one change to TF's
Python API is the unretrieved-save warning, `engine.warn_unretrieved_saves`);
`install()` does, and `uninstall()` (or leaving `installed()`) restores
exactly what was there.
Three things change: the public `AdamParameters` aliases
(`tf.compat.v1.tpu.experimental` and the `tf.tpu.experimental` of the v1
API) name ours, while TF's own class stays in place so TF's `isinstance`
checks keep accepting both; TF's `TPUEstimator` gets the methods of
`tpu_embed_adam.estimator.TPUEstimator`, so that with `use_tpu=False` its
embedding tables train on the software TPU embedding engine; and TF2's
`tf.tpu.experimental.embedding.TPUEmbedding` gets `build`, `enqueue`,
`dequeue` and `apply_gradients` of `tpu_embed_adam.TPUEmbedding`, which run
TF's originals under a `TPUStrategy` and train on CPU otherwise. Its
constructor stays TF's: a TF class made on CPU with another optimizer than
Adam (TF's documented way to restore tables for serving) still constructs,
and only training with it raises.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from tpu_embed_adam.params import AdamParameters

# TPUEstimator's methods that install() replaces (tpu_embed_adam.estimator's).
ENGINE_METHODS = (
    "__init__", "_augment_model_fn", "_add_meta_graph_for_mode", "train", "evaluate", "predict"
)

__all__ = ["install", "installed", "uninstall"]

_LOCK = threading.Lock()
# Module -> the attribute it held before install().
_SAVED: dict[ModuleType, type] = {}
# TPUEstimator's methods that install() replaced, by name.
_SAVED_ESTIMATOR: dict[str, Any] = {}
# TF2 TPUEmbedding's methods that install() replaced, by name.
_SAVED_EMBEDDING: dict[str, Any] = {}


def _api_modules() -> list[ModuleType]:
    import tensorflow.compat.v1 as tf_v1  # Loads the v1 API modules that hold the alias.

    modules = {id(m): m for m in (tf_v1.tpu.experimental,)}
    for name, module in list(sys.modules.items()):
        if name.startswith("tensorflow") and name.endswith("tpu.experimental") and module:
            if hasattr(module, "AdamParameters"):
                modules[id(module)] = module
    return list(modules.values())


def _estimator_classes() -> tuple[type, type]:
    """Ours and TF's `TPUEstimator`; imports tf.estimator, so only when asked."""
    from tpu_embed_adam.estimator import TPUEstimator

    return TPUEstimator, TPUEstimator.__mro__[1]


def _embedding_classes() -> tuple[type, type, tuple[str, ...]]:
    """Ours and TF2's `TPUEmbedding`, and the methods install() moves."""
    from tpu_embed_adam.tf2._embedding import CPU_METHODS, TF_TPU_EMBEDDING, TPUEmbedding

    return TPUEmbedding, TF_TPU_EMBEDDING, CPU_METHODS


def install() -> None:
    """Points TF's `AdamParameters` aliases at ours and trains TF's embedding APIs on CPU.

    After it, `tf.compat.v1.tpu.experimental.AdamParameters` is
    `tpu_embed_adam.AdamParameters`; TF's `TPUEstimator(use_tpu=False,
    embedding_config_spec=...)` behaves as `tpu_embed_adam.estimator.TPUEstimator`;
    and TF2's `tf.tpu.experimental.embedding.TPUEmbedding`, made outside a
    `TPUStrategy`, trains as `tpu_embed_adam.TPUEmbedding` (under a
    `TPUStrategy` its methods run TF's code). Idempotent: a second call
    changes nothing.
    """
    with _LOCK:
        if not _SAVED_ESTIMATOR:
            ours, tf_class = _estimator_classes()
            for name in ENGINE_METHODS:
                _SAVED_ESTIMATOR[name] = tf_class.__dict__[name]
                setattr(tf_class, name, ours.__dict__[name])
        if not _SAVED_EMBEDDING:
            ours, tf_class, methods = _embedding_classes()
            for name in methods:
                _SAVED_EMBEDDING[name] = tf_class.__dict__[name]
                setattr(tf_class, name, ours.__dict__[name])
        for module in _api_modules():
            current = getattr(module, "AdamParameters")  # noqa: B009 (mypy: dynamic module)
            if module not in _SAVED and current is not AdamParameters:
                _SAVED[module] = current
                setattr(module, "AdamParameters", AdamParameters)  # noqa: B010


def uninstall() -> None:
    """Restores what `install()` replaced; a no-op if not installed."""
    with _LOCK:
        if _SAVED_ESTIMATOR:
            _, tf_class = _estimator_classes()
            for name, original in _SAVED_ESTIMATOR.items():
                setattr(tf_class, name, original)
            _SAVED_ESTIMATOR.clear()
        if _SAVED_EMBEDDING:
            _, tf_class, _ = _embedding_classes()
            for name, original in _SAVED_EMBEDDING.items():
                setattr(tf_class, name, original)
            _SAVED_EMBEDDING.clear()
        for module, original in _SAVED.items():
            setattr(module, "AdamParameters", original)  # noqa: B010
        _SAVED.clear()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Context manager: `install()` on entry; on exit, `uninstall()` unless it was already on."""
    with _LOCK:
        was_installed = bool(_SAVED_ESTIMATOR)
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
