"""Loads the kernel library `_tpu_embed_adam_ops*.so` once, never raising.

The library registers our own ops (`TpuEmbedAdam...`) and CPU kernels for
TF's TPU embedding ops. A missing or broken library is not an error here: the
package then runs on its pure-TF path, and `load_error()` says why.
"""

from __future__ import annotations

import pathlib
import threading
import types

from absl import logging

__all__ = ["library_candidates", "load_error", "load_library"]

_PACKAGE_DIR = pathlib.Path(__file__).absolute().parent
_LIBRARY_NAME = "_tpu_embed_adam_ops"

_lock = threading.Lock()
_attempted = False
_module: types.ModuleType | None = None
_error: str | None = None


def library_candidates() -> list[pathlib.Path]:
    """Returns the library files to try, in order.

    `make lib` writes `_tpu_embed_adam_ops.so`; `setup.py build_ext` writes a
    name with the Python ABI tag (`_tpu_embed_adam_ops.cpython-311-...so`).

    Returns:
      The existing candidate paths in the package directory, the untagged
      name first.
    """
    exact = _PACKAGE_DIR / f"{_LIBRARY_NAME}.so"
    tagged = sorted(p for p in _PACKAGE_DIR.glob(f"{_LIBRARY_NAME}*.so") if p != exact)
    return [p for p in (exact, *tagged) if p.is_file()]


def load_library() -> types.ModuleType | None:
    """Loads the kernel library with `tf.load_op_library`, once per process.

    Thread-safe; later calls return the cached result. A failure is logged
    once as a warning and recorded for `load_error()`.

    Returns:
      The op module (with `tpu_embed_adam_apply` and the other generated op
      wrappers), or None when no library could be loaded.
    """
    global _attempted, _module, _error
    with _lock:
        if _attempted:
            return _module
        _attempted = True
        candidates = library_candidates()
        if not candidates:
            _error = (
                f"no {_LIBRARY_NAME}*.so in {_PACKAGE_DIR} (build it with `make lib` "
                "or `pip install --no-build-isolation .`)"
            )
        else:
            import tensorflow as tf

            failures = []
            for path in candidates:
                try:
                    _module = tf.load_op_library(str(path))
                    break
                except Exception as e:  # noqa: BLE001 - any failure means "not loaded".
                    failures.append(f"{path.name}: {type(e).__name__}: {e}")
            if _module is None:
                _error = "; ".join(failures)
        if _error is not None:
            logging.warning("tpu_embed_adam: kernel library not loaded: %s", _error)
        return _module


def load_error() -> str | None:
    """Returns why `load_library()` failed, or None if it succeeded or never ran."""
    with _lock:
        return _error
