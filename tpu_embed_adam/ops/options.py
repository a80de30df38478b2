"""Switches that choose between the fused kernel and the pure-TF path.

Modelled on tensorflow-addons' `options.py`: a process-wide switch, settable
from code or from the environment, and a one-time log line whenever the
pure-TF path is used in place of the fused kernel.
"""

from __future__ import annotations

import os

from absl import logging

__all__ = [
    "DISABLE_ENV_VAR",
    "disable_custom_kernel",
    "enable_custom_kernel",
    "is_custom_kernel_disabled",
    "warn_fallback",
]

DISABLE_ENV_VAR = "TPU_EMBED_ADAM_DISABLE_CUSTOM_KERNEL"

# None: follow the environment variable; a bool: set by code, which wins.
_disabled_by_code: bool | None = None
_warned: set[str] = set()


def disable_custom_kernel() -> None:
    """Makes `apply_adam(implementation="auto")` use the pure-TF path."""
    global _disabled_by_code
    _disabled_by_code = True


def enable_custom_kernel() -> None:
    """Lets `apply_adam(implementation="auto")` use the fused kernel again.

    This overrides `TPU_EMBED_ADAM_DISABLE_CUSTOM_KERNEL` for this process.
    """
    global _disabled_by_code
    _disabled_by_code = False


def is_custom_kernel_disabled() -> bool:
    """Returns whether the fused kernel is switched off.

    Returns:
      The last `disable_custom_kernel()`/`enable_custom_kernel()` choice if
      either was called, else whether `TPU_EMBED_ADAM_DISABLE_CUSTOM_KERNEL`
      is set to a value other than "", "0" or "false".
    """
    if _disabled_by_code is not None:
        return _disabled_by_code
    return os.environ.get(DISABLE_ENV_VAR, "").strip().lower() not in ("", "0", "false")


def warn_fallback(reason: str) -> None:
    """Logs, once per distinct `reason`, that the pure-TF path is used.

    Args:
      reason: why the fused kernel is not used, e.g. the loader's error.
    """
    if reason in _warned:
        return
    _warned.add(reason)
    logging.warning(
        "tpu_embed_adam: using the pure-TF sparse Adam path instead of the fused "
        "kernel (%s). Results are the same, but it is slower and does not serialise "
        "concurrent calls on the same variables (the fused kernel locks them).",
        reason,
    )
