"""`reference.adam_update` against an independent float64 oracle, over several steps.

The oracle below is written from docs/semantics.md alone, element by element
in float64 Python loops, sharing nothing with `reference.py`: the TPU-specific
branches (epsilon inside the square root by default, gradient and weight
clipping, decoupled weight decay with and without the learning rate, gradient
accumulation off, lazy and non-lazy) are checked against it, not only against
fast paths that follow the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tpu_embed_adam import AdamParameters
from tpu_embed_adam.reference import adam_update


def _f32(x, unset):
    # The TPU (and the proto) holds each parameter as float32; the oracle
    # computes with those values in float64.
    return unset if x is None else float(np.float32(x))


def _oracle_row(w, m, v, g, p, lr):
    """One TPU Adam step of one row (lists of floats), per docs/semantics.md."""
    lo_g, hi_g = _f32(p.clip_gradient_min, -math.inf), _f32(p.clip_gradient_max, math.inf)
    lo_w, hi_w = _f32(p.clip_weight_min, -math.inf), _f32(p.clip_weight_max, math.inf)
    b1, b2, eps = _f32(p.beta1, None), _f32(p.beta2, None), _f32(p.epsilon, None)
    decay = _f32(p.weight_decay_factor, 0.0)
    if p.multiply_weight_decay_factor_by_learning_rate:
        decay *= lr
    for k in range(len(w)):
        gk = min(max(g[k], lo_g), hi_g)
        wk = w[k] * (1.0 - decay)
        m[k] = b1 * m[k] + (1.0 - b1) * gk
        v[k] = b2 * v[k] + (1.0 - b2) * gk * gk
        denom = math.sqrt(v[k] + eps**2) if p.sum_inside_sqrt else math.sqrt(v[k]) + eps
        w[k] = min(max(wk - lr * m[k] / denom, lo_w), hi_w)


def oracle_step(table, m, v, ids, grads, p, lr):
    """One step over a table, float64, returning new (table, m, v) as lists of rows."""
    table, m, v = ([list(map(float, row)) for row in a] for a in (table, m, v))
    dim = len(table[0])
    if p.use_gradient_accumulation:
        summed: dict[int, list[float]] = {}
        for r, g in zip(ids, grads, strict=True):
            acc = summed.setdefault(int(r), [0.0] * dim)
            for k in range(dim):
                acc[k] += float(g[k])
        steps = list(summed.items())
        if not p.lazy_adam:
            steps += [(r, [0.0] * dim) for r in range(len(table)) if r not in summed]
    else:
        steps = [(int(r), [float(x) for x in g]) for r, g in zip(ids, grads, strict=True)]
    for r, g in steps:
        _oracle_row(table[r], m[r], v[r], g, p, lr)
    return table, m, v


CASES = {
    "defaults": AdamParameters(0.05),
    "epsilon_outside_sqrt": AdamParameters(0.05, epsilon=1e-3, sum_inside_sqrt=False),
    "large_epsilon_inside": AdamParameters(0.05, epsilon=0.1),
    "gradient_and_weight_clipping": AdamParameters(
        0.1,
        clip_gradient_min=-0.3,
        clip_gradient_max=0.2,
        clip_weight_min=-0.6,
        clip_weight_max=0.5,
    ),
    "decay": AdamParameters(0.05, weight_decay_factor=0.02),
    "decay_times_learning_rate": AdamParameters(
        0.05, weight_decay_factor=0.5, multiply_weight_decay_factor_by_learning_rate=True
    ),
    "non_lazy": AdamParameters(
        0.05, lazy_adam=False, weight_decay_factor=0.01, clip_weight_max=0.7
    ),
    "accumulation_off": AdamParameters(0.05, use_gradient_accumulation=False, beta1=0.5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_float64_oracle_over_steps(name):
    params = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    rows, dim, steps = 9, 3, 6
    table = rng.normal(scale=0.5, size=(rows, dim)).astype(np.float32)
    m = np.zeros_like(table)
    v = np.zeros_like(table)
    want = (table.tolist(), m.tolist(), v.tolist())
    absent = table[rows - 2 :].copy()
    for step in range(steps):
        ids = rng.integers(0, rows - 2, size=7)  # duplicates; the last rows never appear
        grads = rng.normal(size=(7, dim)).astype(np.float32)
        lr = 0.05 / (1 + step)
        table, m, v = adam_update(table, m, v, ids, grads, params, learning_rate=lr)
        want = oracle_step(*want, ids, grads, params, float(np.float32(lr)))
        for got, expected, what in zip((table, m, v), want, ("table", "m", "v"), strict=True):
            np.testing.assert_allclose(
                got, np.array(expected), rtol=1e-5, atol=1e-6, err_msg=f"{name} step {step} {what}"
            )
    # Rows never in the batch: untouched when lazy; stepped with g = 0 (decay
    # moves them, the moments stay 0) when not.
    np.testing.assert_array_equal(v[rows - 2 :], 0)
    if params.lazy_adam:
        np.testing.assert_array_equal(table[rows - 2 :], absent)
    else:
        assert np.all(table[rows - 2 :] != absent)


def test_oracle_is_not_the_reference():
    """The oracle disagrees with a deliberately wrong rule (epsilon outside the root)."""
    params = AdamParameters(0.1, epsilon=0.5)
    table = np.ones((1, 1), np.float32)
    zeros = np.zeros_like(table)
    got, _, _ = adam_update(
        table,
        zeros,
        zeros,
        np.array([0]),
        np.ones((1, 1), np.float32),
        params.replace(sum_inside_sqrt=False),
    )
    want, _, _ = oracle_step(table, zeros, zeros, [0], [[1.0]], params, 0.1)
    assert abs(float(got[0, 0]) - want[0][0]) > 1e-3
