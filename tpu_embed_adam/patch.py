"""Make TF's public `AdamParameters` names resolve to ours, reversibly.

Importing `tpu_embed_adam` never patches TensorFlow; `install()` does, and
`uninstall()` (or leaving `installed()`) restores exactly what was there.
Only the public API aliases change (`tf.compat.v1.tpu.experimental` and the
`tf.tpu.experimental` of the v1 API); TF's own class stays in place, so TF's
`isinstance` checks keep accepting both.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

from tpu_embed_adam.params import AdamParameters

__all__ = ["install", "installed", "uninstall"]

_LOCK = threading.Lock()
# Module -> the attribute it held before install().
_SAVED: dict[ModuleType, type] = {}


def _api_modules() -> list[ModuleType]:
    import tensorflow.compat.v1 as tf_v1  # Loads the v1 API modules that hold the alias.

    modules = {id(m): m for m in (tf_v1.tpu.experimental,)}
    for name, module in list(sys.modules.items()):
        if name.startswith("tensorflow") and name.endswith("tpu.experimental") and module:
            if hasattr(module, "AdamParameters"):
                modules[id(module)] = module
    return list(modules.values())


def install() -> None:
    """Points TF's public `AdamParameters` aliases at `tpu_embed_adam.AdamParameters`.

    Idempotent: a second call changes nothing.
    """
    with _LOCK:
        for module in _api_modules():
            current = getattr(module, "AdamParameters")  # noqa: B009 (mypy: dynamic module)
            if module not in _SAVED and current is not AdamParameters:
                _SAVED[module] = current
                setattr(module, "AdamParameters", AdamParameters)  # noqa: B010


def uninstall() -> None:
    """Restores the aliases that `install()` replaced; a no-op if not installed."""
    with _LOCK:
        for module, original in _SAVED.items():
            setattr(module, "AdamParameters", original)  # noqa: B010
        _SAVED.clear()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Context manager: `install()` on entry; on exit, `uninstall()` unless it was already on."""
    with _LOCK:
        was_installed = bool(_SAVED)
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
