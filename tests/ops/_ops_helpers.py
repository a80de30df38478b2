"""Shared by the tests of the fused kernel, the TF path and `apply_adam`.

A plain module rather than conftest fixtures: hypothesis strategies and
`params_of` are used at collection time, where fixtures do not reach.
Named after its directory so that it cannot shadow a helper module of another
test directory (pytest puts each one on `sys.path`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update


def params_of(learning_rate: float = 0.05, **kwargs: Any) -> AdamParameters:
    """`AdamParameters` with the tests' default learning rate, 0.05.

    What the class refuses (non-lazy Adam or gradient clipping without
    gradient accumulation, as TF does) every kernel refuses too
    (tests/test_rule_set.py), so no test feeds it to one.
    """
    return AdamParameters(learning_rate, **kwargs)


# The values the strategies draw from, also cycled through by the
# deterministic every-combination tests.
LEARNING_RATES = (0.05, 1.0)
BETA1S = (0.0, 0.5, 0.9)
BETA2S = (0.0, 0.9, 0.999)
EPSILONS = (1e-8, 0.1)
# No decay, or a factor with and without the learning rate (the class refuses
# the multiply flag without a factor).
DECAYS = (
    {},
    {"weight_decay_factor": 0.01},
    {"weight_decay_factor": 0.5},
    {"weight_decay_factor": 0.01, "multiply_weight_decay_factor_by_learning_rate": True},
    {"weight_decay_factor": 0.5, "multiply_weight_decay_factor_by_learning_rate": True},
)
BOUNDS = ((None, None), (-0.5, 0.5), (None, 0.3), (-0.2, None), (0.1, 0.4))


def with_bounds(
    params: AdamParameters, gradient: tuple[Any, Any], weight: tuple[Any, Any]
) -> AdamParameters:
    """`params` with weight clipping 4x `weight`, and gradient clipping `gradient`
    where gradient accumulation is on (TF refuses it without)."""
    if not params.use_gradient_accumulation:
        gradient = (None, None)
    return params.replace(
        clip_gradient_min=gradient[0],
        clip_gradient_max=gradient[1],
        clip_weight_min=None if weight[0] is None else weight[0] * 4,
        clip_weight_max=None if weight[1] is None else weight[1] * 4,
    )


@st.composite
def _drawn_params(draw: Any) -> AdamParameters:
    accumulate = draw(st.booleans())
    params = params_of(
        learning_rate=draw(st.sampled_from(LEARNING_RATES)),
        beta1=draw(st.sampled_from(BETA1S)),
        beta2=draw(st.sampled_from(BETA2S)),
        epsilon=draw(st.sampled_from(EPSILONS)),
        # Non-lazy Adam needs gradient accumulation (TF's rule).
        lazy_adam=draw(st.booleans()) or not accumulate,
        sum_inside_sqrt=draw(st.booleans()),
        use_gradient_accumulation=accumulate,
        **draw(st.sampled_from(DECAYS)),
    )
    return with_bounds(params, draw(st.sampled_from(BOUNDS)), draw(st.sampled_from(BOUNDS)))


flag_sets = _drawn_params()


def random_state(seed: Any, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float32 (table, m, v) with v >= 0; `seed` is an int or a numpy Generator."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, dim)).astype(np.float32),
        (0.1 * rng.standard_normal((rows, dim))).astype(np.float32),
        (0.01 * rng.random((rows, dim))).astype(np.float32),
    )


Batches = list[tuple[np.ndarray, np.ndarray]]


@st.composite
def problems(draw: Any, max_rows: int = 40, max_ids: int = 60) -> tuple[Any, Batches, list]:
    """(state, batches, learning rates): one to three steps of (ids, grads).

    The ids are duplicate-heavy (three rows), all distinct, or uniform over
    the whole table (duplicates and absent rows); a fifth of the gradient rows
    are zero (present rows that must still step). Learning rates are None
    (`params.learning_rate`) or drawn per step.
    """
    rows = draw(st.integers(1, max_rows))
    dim = draw(st.sampled_from([1, 3, 8, 13, 32]))
    kind = draw(st.sampled_from(["duplicates", "distinct", "uniform"]))
    n = draw(st.integers(0, rows if kind == "distinct" else max_ids))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    steps = draw(st.integers(1, 3))
    dynamic = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches = []
    for _ in range(steps):
        if kind == "duplicates":
            ids = rng.integers(0, min(rows, 3), n)
        elif kind == "distinct":
            ids = rng.permutation(rows)[:n]
        else:
            ids = rng.integers(0, rows, n)
        grads = rng.standard_normal((n, dim)).astype(np.float32)
        grads[rng.random(n) < 0.2] = 0
        batches.append((ids.astype(dtype), grads))
    lrs = [float(rng.uniform(0.01, 0.5)) if dynamic else None for _ in range(steps)]
    return random_state(rng, rows, dim), batches, lrs


def reference_steps(state: Any, batches: Batches, params: Any, lrs: list) -> tuple:
    """The reference's (table, m, v) after one step per batch."""
    for (ids, grads), lr in zip(batches, lrs, strict=True):
        state = adam_update(*state, ids, grads, params, learning_rate=lr)
    return state


def assert_state_equal(got: Any, want: Any) -> None:
    """Bit-for-bit equality of (table, m, v): NaN matches NaN, -0 matches +0.

    `got` holds arrays or variables.
    """
    for name, g, w in zip(("var", "m", "v"), got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


def assert_state_close(got: Any, want: Any) -> None:
    """Equality up to XLA's rounding, 1e-6 relative to each array's scale.

    XLA's fusions round a few operations differently (about 1 ulp). In
    `w - lr * m / sqrt(v)` with large terms, an element that cancels to a
    small value carries an error of the terms' size, so the bound is relative
    to the largest finite magnitude in the array, not to the element (seen: an
    element of -278555 off by 0.44 in a table whose values reach 4.5e6). NaN
    matches NaN.
    """
    for name, g, w in zip(("var", "m", "v"), got, want, strict=True):
        w = np.asarray(w)
        finite = np.abs(w[np.isfinite(w)])
        scale = float(finite.max()) if finite.size else 0.0
        np.testing.assert_allclose(
            np.asarray(g), w, rtol=1e-6, atol=max(1e-7, 1e-6 * scale), err_msg=name
        )
