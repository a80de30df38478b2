"""The TPU embedding sparse Adam update, in plain numpy: the project's oracle.

Every fast path (the fused C++ op, the pure-TF path, the software embedding
engine) is tested against `adam_update`. The rules, with their sources and the
reasons for the [inferred] choices, are in `docs/semantics.md`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from tpu_embed_adam.learning_rates import constant_learning_rate
from tpu_embed_adam.rules import decay_rate

__all__ = ["Float32Constants", "adam_update", "bias_corrected_learning_rate", "float32_constants"]

_F32 = np.float32


def bias_corrected_learning_rate(
    learning_rate: float, beta1: float, beta2: float, step: int
) -> float:
    """Returns `learning_rate * sqrt(1 - beta2^t) / (1 - beta1^t)` for step `t`.

    The TPU applies no bias correction; pass this as the dynamic learning rate
    of step `t` (counted from 1) to get Kingma & Ba's corrected Adam (with
    epsilon left unscaled, as TF's own `AdamOptimizer` does).

    Args:
      learning_rate: the base learning rate, a constant rate as
        `AdamParameters` takes it.
      beta1: decay rate of the first moment, in [0, 1).
      beta2: decay rate of the second moment, in [0, 1).
      step: the 1-based step number.

    Returns:
      The corrected learning rate as a Python float.

    Raises:
      TypeError: `learning_rate` or a beta is a bool or not a real number.
      ValueError: if `step` < 1, a beta is outside [0, 1)
        (`rules.decay_rate`), or `learning_rate` is not a normal float32 > 0
        (`learning_rates.constant_learning_rate`).
    """
    try:
        # float(step) bounds it: `beta**step` needs a float exponent, and an
        # int beyond every float (10**400) or inf would raise OverflowError.
        valid = not isinstance(step, bool) and int(step) == step and float(step) >= 1
    except OverflowError:
        valid = False
    if not valid:
        raise ValueError(f"`step` must be an integer >= 1 that fits a float; got {step!r}.")
    beta1, beta2 = decay_rate("beta1", beta1), decay_rate("beta2", beta2)
    rate = constant_learning_rate(learning_rate)
    return float(rate * np.sqrt(1.0 - beta2 ** float(step)) / (1.0 - beta1 ** float(step)))


class Float32Constants(NamedTuple):
    """A step's constants that do not depend on the learning rate, in float32.

    Every implementation takes them from here, so that each rounds them (and
    fills in unset parameters) exactly as the reference does.
    """

    beta1: np.float32
    one_minus_beta1: np.float32
    beta2: np.float32
    one_minus_beta2: np.float32
    epsilon: np.float32
    weight_decay: np.float32  # 0 when unset: the decay term is always applied.
    gradient_bounds: tuple[np.float32, np.float32]  # -inf/+inf where unset.
    weight_bounds: tuple[np.float32, np.float32]


def _bounds(low: float | None, high: float | None) -> tuple[np.float32, np.float32]:
    """A clipping range; an unset (None) bound is -inf/+inf, as in the proto."""
    return _F32(-np.inf if low is None else low), _F32(np.inf if high is None else high)


def float32_constants(params: Any) -> Float32Constants:
    """Reads `params` (ours or TF's `AdamParameters`, by attribute) into float32."""
    beta1, beta2 = _F32(params.beta1), _F32(params.beta2)
    return Float32Constants(
        beta1=beta1,
        one_minus_beta1=_F32(1) - beta1,
        beta2=beta2,
        one_minus_beta2=_F32(1) - beta2,
        epsilon=_F32(params.epsilon),
        weight_decay=_F32(params.weight_decay_factor or 0.0),
        gradient_bounds=_bounds(params.clip_gradient_min, params.clip_gradient_max),
        weight_bounds=_bounds(params.clip_weight_min, params.clip_weight_max),
    )


def adam_update(
    table: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    ids: np.ndarray,
    grads: np.ndarray,
    params: Any,
    learning_rate: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""One step of TPU embedding sparse Adam; returns new (table, m, v).

    For each row `r` updated, with `a` the learning rate, all in float32::

        g = clip(g_r, clip_gradient_min, clip_gradient_max)
        w = w - d * w        d = wd * a if multiply_..._by_learning_rate else wd
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - a * m / sqrt(v + epsilon^2)     if sum_inside_sqrt
        w = w - a * m / (sqrt(v) + epsilon)     otherwise
        w = clip(w, clip_weight_min, clip_weight_max)

    Unset clipping bounds are -inf/+inf and an unset decay factor is 0. The
    decay term is applied even then: it is the identity for a finite weight,
    but turns an infinite one into NaN (`0 * inf`), in every implementation.

    Which rows, and with which `g_r`:

    * gradient accumulation on: `g_r` is the float32 sum, in input order, of
      the gradients of every occurrence of `r` in `ids`; one step per row.
    * gradient accumulation off: one step per occurrence, in input order, with
      that occurrence's gradient.
    * lazy: only rows in `ids` change (a present row with a zero gradient
      still moves). Non-lazy: every row steps; absent rows with `g_r = 0`,
      exactly as a present row with a zero gradient would (decay and clipping
      included).

    No bias correction is applied; see `bias_corrected_learning_rate`.

    Args:
      table: [rows, dim] float32 embedding table.
      m: [rows, dim] float32 first-moment slot.
      v: [rows, dim] float32 second-moment slot.
      ids: [n] integer row ids in [0, rows), duplicates allowed.
      grads: [n, dim] float32 gradient, one row per id.
      params: an `AdamParameters` (ours or TF's: read by attribute).
      learning_rate: this step's learning rate; defaults to
        `params.learning_rate`.

    Returns:
      New arrays `(table, m, v)`; the inputs are not modified.

    Raises:
      ValueError: on shape mismatches or ids outside [0, rows).
    """
    w = np.array(table, dtype=_F32, copy=True)
    m = np.array(m, dtype=_F32, copy=True)
    v = np.array(v, dtype=_F32, copy=True)
    ids = np.asarray(ids).reshape(-1)
    grads = np.asarray(grads, dtype=_F32).reshape(len(ids), w.shape[1])
    if m.shape != w.shape or v.shape != w.shape:
        raise ValueError(f"m {m.shape} and v {v.shape} must match table {w.shape}.")
    if len(ids) and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"ids must lie in [0, {w.shape[0]}); got {ids.min()}..{ids.max()}.")

    lr = _F32(params.learning_rate if learning_rate is None else learning_rate)
    c = float32_constants(params)
    decay = c.weight_decay
    if params.multiply_weight_decay_factor_by_learning_rate:
        decay = decay * lr

    def step(r: np.ndarray | int, g: np.ndarray) -> None:
        g = np.clip(g, *c.gradient_bounds)
        w[r] = w[r] - decay * w[r]
        m[r] = c.beta1 * m[r] + c.one_minus_beta1 * g
        v[r] = c.beta2 * v[r] + c.one_minus_beta2 * g * g
        if params.sum_inside_sqrt:
            w[r] = w[r] - lr * m[r] / np.sqrt(v[r] + c.epsilon * c.epsilon)
        else:
            w[r] = w[r] - lr * m[r] / (np.sqrt(v[r]) + c.epsilon)
        w[r] = np.clip(w[r], *c.weight_bounds)

    if not params.use_gradient_accumulation:
        for i, r in enumerate(ids):
            step(int(r), grads[i])
        return w, m, v

    acc = np.zeros_like(w)
    for i, r in enumerate(ids):
        acc[r] += grads[i]
    rows = np.arange(w.shape[0]) if not params.lazy_adam else np.unique(ids)
    step(rows, acc[rows])
    return w, m, v
