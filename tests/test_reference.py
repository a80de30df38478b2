"""The numpy oracle against hand-computed cases, and against peer optimizers."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update, bias_corrected_learning_rate

# Powers of two keep the float32 arithmetic of the hand cases nearly exact.
LR, B1, B2 = 0.125, 0.5, 0.75


def _one_row(g, ids=(0,), w=1.0, m=0.0, v=0.0, rows=1, **flags):
    """Runs the reference on a [rows, 1] table whose every row holds (w, m, v)."""
    table = np.full((rows, 1), w, np.float32)
    params = AdamParameters(LR, beta1=B1, beta2=B2, **flags)
    return adam_update(
        table,
        np.full_like(table, m),
        np.full_like(table, v),
        np.asarray(ids),
        np.asarray(g, np.float32).reshape(-1, 1),
        params,
    )


def _moments(g, m=0.0, v=0.0):
    return B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g


@pytest.mark.parametrize(
    ("flags", "g", "expected_w"),
    [
        # m = 0.5 * 0.5 = 0.25, v = 0.25 * 0.25 = 0.0625, w = 1 - lr * 0.25 / 0.25.
        ({}, 0.5, 1 - LR),
        # Epsilon outside the root: 0.25 / (0.25 + 0.25).
        ({"sum_inside_sqrt": False, "epsilon": 0.25}, 0.5, 1 - LR * 0.5),
        # Epsilon inside: 0.25 / sqrt(0.0625 + 0.0625).
        ({"sum_inside_sqrt": True, "epsilon": 0.25}, 0.5, 1 - LR * 0.25 / math.sqrt(0.125)),
        # Gradient clipped to +-0.25 before the moments (m/sqrt(v) is still +-1).
        ({"clip_gradient_max": 0.25}, 0.5, 1 - LR),
        ({"clip_gradient_min": -0.25}, -0.5, 1 + LR),
        # Decoupled decay before the step: w = 1 - 0.2 * 1.
        ({"weight_decay_factor": 0.2}, 0.5, 0.8 - LR),
        # Decay scaled by the learning rate: w = 1 - 0.2 * lr * 1.
        (
            {"weight_decay_factor": 0.2, "multiply_weight_decay_factor_by_learning_rate": True},
            0.5,
            1 - 0.2 * LR - LR,
        ),
        # Weight clipping after the step.
        ({"clip_weight_min": 0.9}, 0.5, 0.9),
        ({"clip_weight_max": 0.5}, -0.5, 0.5),
    ],
)
def test_single_row_step_per_flag(flags, g, expected_w):
    w, m, v = _one_row([g], **flags)
    g_used = float(np.clip(g, flags.get("clip_gradient_min", -np.inf),
                           flags.get("clip_gradient_max", np.inf)))
    expected_m, expected_v = _moments(g_used)
    np.testing.assert_allclose(w, [[expected_w]], rtol=1e-6)
    np.testing.assert_allclose(m, [[expected_m]], rtol=1e-6)
    np.testing.assert_allclose(v, [[expected_v]], rtol=1e-6)


def test_accumulation_sums_duplicates_into_one_step():
    w, m, v = _one_row([0.25, 0.25], ids=[0, 0])
    np.testing.assert_allclose([w[0, 0], m[0, 0], v[0, 0]], [1 - LR, 0.25, 0.0625], rtol=1e-6)


def test_accumulation_off_steps_once_per_occurrence_in_order():
    w, m, v = _one_row([0.5, -1.0], ids=[0, 0], use_gradient_accumulation=False)
    m1, v1 = _moments(0.5)
    w1 = 1 - LR * m1 / math.sqrt(v1 + 1e-16)
    m2, v2 = _moments(-1.0, m1, v1)
    w2 = w1 - LR * m2 / math.sqrt(v2 + 1e-16)
    np.testing.assert_allclose([w[0, 0], m[0, 0], v[0, 0]], [w2, m2, v2], rtol=1e-6)


def test_lazy_moves_present_zero_gradient_rows_only():
    w, m, v = _one_row([0.0], ids=[1], m=0.1, v=0.01, rows=3)
    expected_m, expected_v = _moments(0.0, 0.1, 0.01)
    expected_w = 1 - LR * expected_m / math.sqrt(expected_v + 1e-16)
    np.testing.assert_allclose(w[:, 0], [1, expected_w, 1], rtol=1e-6)
    np.testing.assert_allclose(m[:, 0], [0.1, expected_m, 0.1], rtol=1e-6)
    np.testing.assert_allclose(v[:, 0], [0.01, expected_v, 0.01], rtol=1e-6)


def test_non_lazy_absent_rows_step_with_zero_gradient_decay_and_clip():
    flags = {"lazy_adam": False, "weight_decay_factor": 0.5, "clip_weight_min": 0.45}
    w, m, v = _one_row([0.0], ids=[1], m=0.1, v=0.01, rows=3, **flags)
    present = _one_row([0.0], ids=[0], m=0.1, v=0.01, rows=1, **flags)
    # Every row equals a present row with a zero gradient: decay 1 -> 0.5,
    # Adam step below 0.45, clipped to 0.45.
    for got, want in zip((w, m, v), present, strict=True):
        np.testing.assert_array_equal(got, np.repeat(want, 3, axis=0))
    np.testing.assert_allclose(w, 0.45, rtol=1e-6)


def test_nan_gradient_propagates():
    w, m, v = _one_row([np.nan])
    assert np.isnan(w).all() and np.isnan(m).all() and np.isnan(v).all()


def test_decay_term_applies_when_unset():
    # w - 0 * w: the identity for a finite weight, NaN for an infinite one.
    with np.errstate(invalid="ignore"):
        w, _, _ = _one_row([0.5], ids=[1], w=np.inf, rows=3)
    assert np.isnan(w[1, 0]) and np.isinf(w[[0, 2], 0]).all()


def test_inputs_are_not_modified():
    table, slot = np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32)
    adam_update(table, slot, slot, np.array([1]), np.ones((1, 1), np.float32),
                AdamParameters(LR))
    np.testing.assert_array_equal(table, 1)
    np.testing.assert_array_equal(slot, 0)


def test_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 1\)"):
        _one_row([0.5], ids=[1])


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, LR * math.sqrt(1 - B2) / (1 - B1)), (2, LR * math.sqrt(1 - B2**2) / (1 - B1**2)),
     (1000, LR * math.sqrt(1 - B2**1000) / (1 - B1**1000))],
)
def test_bias_corrected_learning_rate(step, expected):
    assert bias_corrected_learning_rate(LR, B1, B2, step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "match"),
    [((0.9, 0.999, 0), "step"), ((0.9, 0.999, 1.5), "step"), ((0.9, 0.999, True), "step"),
     ((1.0, 0.999, 1), "beta1"), ((0.9, -0.1, 1), "beta2"),
     # Beyond every float: ValueError, not OverflowError.
     ((0.9, 0.999, 10**400), "`step`"), ((0.9, 0.999, float("inf")), "`step`")],
)
def test_bias_corrected_learning_rate_errors(args, match):
    with pytest.raises(ValueError, match=match):
        bias_corrected_learning_rate(LR, *args)


def test_bias_corrected_learning_rate_unbounded_rate():
    with pytest.raises(ValueError, match="`learning_rate` must be finite"):
        bias_corrected_learning_rate(10**400, 0.9, 0.999, 1)


@pytest.mark.parametrize(
    ("rate", "error", "match"),
    [(-1.0, ValueError, r"must be > 0; received: -1\.0"), (0, ValueError, "must be > 0"),
     (float("nan"), ValueError, "must be finite in float32"),
     (1e-40, ValueError, "must be a normal float32"),
     (True, TypeError, "must be a real number"), ("0.1", TypeError, "must be a real number")],
)
def test_bias_corrected_learning_rate_refuses_what_adam_parameters_refuses(rate, error, match):
    with pytest.raises(error, match=rf"Argument `learning_rate` {match}"):
        bias_corrected_learning_rate(rate, B1, B2, 1)
    with pytest.raises(error, match=rf"Argument `learning_rate` {match}"):
        AdamParameters(rate)


# Peer checks: with the bias-corrected dynamic rate and epsilon outside the root
# (no clipping, no decay), TPU Adam is Kingma & Ba's Adam as TF implements it.
# Betas exact in float32: TF's kernels compute 1 - beta2^t from float32 betas,
# bias_corrected_learning_rate from the Python floats (0.999 would differ by 2e-5).
_PEER = AdamParameters(LR, beta1=0.875, beta2=1 - 2**-10, sum_inside_sqrt=False, epsilon=1e-3)
_ROWS, _DIM, _STEPS = 6, 3, 4


def _peer_batches():
    rng = np.random.default_rng(7)
    for _ in range(_STEPS):
        ids = rng.choice(_ROWS, size=5)  # duplicates, some rows absent
        yield ids, rng.standard_normal((5, _DIM)).astype(np.float32)


def _reference_run(lazy):
    params = _PEER.replace(lazy_adam=lazy)
    state = (np.linspace(-1, 1, _ROWS * _DIM, dtype=np.float32).reshape(_ROWS, _DIM),
             np.zeros((_ROWS, _DIM), np.float32), np.zeros((_ROWS, _DIM), np.float32))
    for t, (ids, grads) in enumerate(_peer_batches(), start=1):
        lr = bias_corrected_learning_rate(LR, params.beta1, params.beta2, t)
        state = adam_update(*state, ids, grads, params, learning_rate=lr)
    return state[0]


def test_non_lazy_matches_tf1_adam_optimizer_on_dense_gradients():
    var = tf.Variable(np.linspace(-1, 1, _ROWS * _DIM, dtype=np.float32).reshape(_ROWS, _DIM))
    opt = tf.compat.v1.train.AdamOptimizer(LR, _PEER.beta1, _PEER.beta2, _PEER.epsilon)
    for ids, grads in _peer_batches():
        dense = tf.math.unsorted_segment_sum(grads, ids, _ROWS)
        opt.apply_gradients([(dense, var)])
    # TF's kernel rounds differently (m += (g - m) * (1 - b1); float32 beta powers).
    np.testing.assert_allclose(_reference_run(lazy=False), var.numpy(), rtol=1e-5, atol=1e-6)


def _lazy_adam_peer(var, m, v, ids, grads, t):
    """TF-Addons 0.23 `LazyAdam._resource_apply_sparse`, restated in TF ops."""
    rows, segment = tf.unique(ids)
    g = tf.math.unsorted_segment_sum(grads, segment, tf.size(rows))
    b1, b2 = _PEER.beta1, _PEER.beta2
    m_t = b1 * tf.gather(m, rows) + (1 - b1) * g
    v_t = b2 * tf.gather(v, rows) + (1 - b2) * tf.square(g)
    m.scatter_update(tf.IndexedSlices(m_t, rows))
    v.scatter_update(tf.IndexedSlices(v_t, rows))
    lr = LR * math.sqrt(1 - b2**t) / (1 - b1**t)
    var.scatter_sub(tf.IndexedSlices(lr * m_t / (tf.sqrt(v_t) + _PEER.epsilon), rows))


def test_lazy_matches_lazy_adam_on_present_rows():
    var = tf.Variable(np.linspace(-1, 1, _ROWS * _DIM, dtype=np.float32).reshape(_ROWS, _DIM))
    m, v = tf.Variable(tf.zeros_like(var)), tf.Variable(tf.zeros_like(var))
    for t, (ids, grads) in enumerate(_peer_batches(), start=1):
        _lazy_adam_peer(var, m, v, ids, grads, t)
    np.testing.assert_allclose(_reference_run(lazy=True), var.numpy(), rtol=1e-5, atol=1e-6)


def test_lazy_matches_tensorflow_addons_lazy_adam():
    tfa = pytest.importorskip("tensorflow_addons", reason="the `bench` extra is not installed")
    var = tf.Variable(np.linspace(-1, 1, _ROWS * _DIM, dtype=np.float32).reshape(_ROWS, _DIM))
    opt = tfa.optimizers.LazyAdam(LR, _PEER.beta1, _PEER.beta2, _PEER.epsilon)
    for ids, grads in _peer_batches():
        opt.apply_gradients([(tf.IndexedSlices(grads, ids, var.shape), var)])
    np.testing.assert_allclose(_reference_run(lazy=True), var.numpy(), rtol=1e-5, atol=1e-6)
