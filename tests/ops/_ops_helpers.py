"""Shared by the tests of the fused kernel, the TF path and `apply_adam`.

A plain module rather than conftest fixtures: hypothesis strategies and the
`Flags` class are used at collection time, where fixtures do not reach.
Named after its directory so that it cannot shadow a helper module of another
test directory (pytest puts each one on `sys.path`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from tensorflow.core.protobuf.tpu.optimization_parameters_pb2 import (
    GradientAccumulationStatus,
)

from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update


class Flags:
    """`AdamParameters`, plus gradient accumulation off where the class refuses it.

    TF (and so `AdamParameters`) refuses non-lazy Adam and gradient clipping
    without accumulation; every implementation still follows the reference
    for them, so the tests cover them too. The parameters are an
    `AdamParameters` built with accumulation on (so validated, with its
    normalisation: no decay is None); `use_gradient_accumulation` is kept
    beside it, and `to_tf_proto()` turns accumulation off in the proto, which
    is what the fused kernel reads. Every other attribute is the
    parameters'. `learning_rate` defaults to 0.05.
    """

    def __init__(
        self,
        learning_rate: float = 0.05,
        use_gradient_accumulation: bool = True,
        **kwargs: Any,
    ) -> None:
        self.params = AdamParameters(learning_rate, **kwargs)
        self.use_gradient_accumulation = use_gradient_accumulation

    def __getattr__(self, name: str) -> Any:
        if name == "params":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.params, name)

    def __repr__(self) -> str:
        return f"Flags({self.params!r}, use_gradient_accumulation={self.use_gradient_accumulation})"

    def replace(self, **changes: Any) -> Flags:
        accumulate = changes.pop("use_gradient_accumulation", self.use_gradient_accumulation)
        flags = Flags(use_gradient_accumulation=accumulate)
        flags.params = self.params.replace(**changes)
        return flags

    def to_tf_proto(self) -> Any:
        msg = self.params.to_tf_proto()
        if not self.use_gradient_accumulation:
            msg.gradient_accumulation_status = GradientAccumulationStatus.DISABLED
        return msg


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


def with_bounds(flags: Flags, gradient: tuple[Any, Any], weight: tuple[Any, Any]) -> Flags:
    """`flags` with gradient clipping `gradient` and weight clipping 4x `weight`."""
    return flags.replace(
        clip_gradient_min=gradient[0],
        clip_gradient_max=gradient[1],
        clip_weight_min=None if weight[0] is None else weight[0] * 4,
        clip_weight_max=None if weight[1] is None else weight[1] * 4,
    )


flag_sets = st.builds(
    Flags,
    learning_rate=st.sampled_from(LEARNING_RATES),
    beta1=st.sampled_from(BETA1S),
    beta2=st.sampled_from(BETA2S),
    epsilon=st.sampled_from(EPSILONS),
    lazy_adam=st.booleans(),
    sum_inside_sqrt=st.booleans(),
    use_gradient_accumulation=st.booleans(),
).flatmap(
    lambda f: st.tuples(
        st.sampled_from(DECAYS), st.sampled_from(BOUNDS), st.sampled_from(BOUNDS)
    ).map(lambda d: with_bounds(f.replace(**d[0]), d[1], d[2]))
)


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
