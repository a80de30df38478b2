"""The pure-TF path against the numpy reference, in every execution mode."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from _ops_helpers import (
    BETA1S,
    BETA2S,
    EPSILONS,
    LEARNING_RATES,
    assert_state_close,
    assert_state_equal,
    flag_sets,
    params_of,
    problems,
    random_state,
    reference_steps,
)
from hypothesis import HealthCheck, given, settings

from tpu_embed_adam.ops.tf_path import tf_apply_adam
from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update

MODES = ("eager", "function", "jit", "tf1")
_GRAD_CLIPS = {"none": (None, None), "min": (-0.5, None), "max": (None, 0.5),
               "both": (-0.3, 0.4)}
_WEIGHT_CLIPS = {"none": (None, None), "both": (-0.9, 0.8)}
_DECAYS = {"none": {}, "plain": {"weight_decay_factor": 0.05},
           "by_lr": {"weight_decay_factor": 0.5,
                     "multiply_weight_decay_factor_by_learning_rate": True}}


def _flags(lazy, inside, accumulate, grad_clip, weight_clip, decay, **rates):
    """params_of for one combination; `rates` sets the learning rate, betas, epsilon."""
    return params_of(
        lazy_adam=lazy, sum_inside_sqrt=inside, use_gradient_accumulation=accumulate,
        clip_gradient_min=_GRAD_CLIPS[grad_clip][0], clip_gradient_max=_GRAD_CLIPS[grad_clip][1],
        clip_weight_min=_WEIGHT_CLIPS[weight_clip][0],
        clip_weight_max=_WEIGHT_CLIPS[weight_clip][1], **_DECAYS[decay], **rates,
    )


def _every_combination():
    """Every flag combination that AdamParameters (and so every path) accepts:
    TF's rules refuse non-lazy Adam and gradient clipping without gradient
    accumulation. Each takes the next (learning rate, beta1, beta2, epsilon)
    of their product, so that every value of each is met by many flag
    settings."""
    rates = itertools.cycle(itertools.product(LEARNING_RATES, BETA1S, BETA2S, EPSILONS))
    for lazy, inside, accumulate, grad_clip, *rest in itertools.product(
        (True, False), (True, False), (True, False), _GRAD_CLIPS, _WEIGHT_CLIPS, _DECAYS
    ):
        if not accumulate and (not lazy or grad_clip != "none"):
            continue
        lr, beta1, beta2, epsilon = next(rates)
        yield _flags(lazy, inside, accumulate, grad_clip, *rest,
                     learning_rate=lr, beta1=beta1, beta2=beta2, epsilon=epsilon)


def _run_tf1(state, batches, params, lrs):
    """A TF1 graph with placeholders of unknown length, run in a Session."""
    ids0, grads0 = batches[0]
    with tf.Graph().as_default():
        variables = [tf.Variable(x) for x in state]
        ids = tf.compat.v1.placeholder(tf.as_dtype(ids0.dtype), [None])
        grads = tf.compat.v1.placeholder(tf.float32, [None, grads0.shape[1]])
        lr = None if lrs[0] is None else tf.compat.v1.placeholder(tf.float32, [])
        update = tf_apply_adam(*variables, ids, grads, params, lr)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for (step_ids, step_grads), step_lr in zip(batches, lrs, strict=True):
                feed = {ids: step_ids, grads: step_grads}
                if lr is not None:
                    feed[lr] = step_lr
                sess.run(update, feed)
            return sess.run(variables)


def _run(mode, state, batches, params, lrs):
    """Runs the TF path for every batch in `mode`; returns the final (w, m, v)."""
    if mode == "tf1":
        return _run_tf1(state, batches, params, lrs)
    variables = [tf.Variable(x) for x in state]

    def step(ids, grads, lr):
        tf_apply_adam(*variables, ids, grads, params, lr)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "jit")
    for (ids, grads), lr in zip(batches, lrs, strict=True):
        step(tf.constant(ids), tf.constant(grads), None if lr is None else tf.constant(lr))
    return [x.numpy() for x in variables]


def _assert_matches(got, want, mode="eager"):
    # Outside XLA: the reference's float32 operations in its order, bit for bit.
    (assert_state_close if mode == "jit" else assert_state_equal)(got, want)


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@pytest.mark.parametrize(
    ("mode", "examples"), [("eager", 60), ("function", 10), ("jit", 8), ("tf1", 8)]
)
def test_matches_reference(mode, examples):
    @settings(max_examples=examples, **_SETTINGS)
    @given(problems(), flag_sets)
    def check(problem, flags):
        state, batches, lrs = problem
        _assert_matches(_run(mode, state, batches, flags, lrs),
                        reference_steps(state, batches, flags, lrs), mode)

    check()


@pytest.mark.parametrize("params", list(_every_combination()),
                         ids=lambda p: ",".join(f"{k}={v}" for k, v in
                                                p.to_dict().items()
                                                if v not in (None, False)))
def test_every_flag_combination(params):
    rng = np.random.default_rng(0)
    state = random_state(rng, 5, 3)
    ids = np.array([3, 1, 3, 0, 3, 1, 4], np.int64)
    batches = [(ids, rng.standard_normal((7, 3)).astype(np.float32)) for _ in range(2)]
    lrs = [0.05, 0.02]
    _assert_matches(_run("eager", state, batches, params, lrs),
                    reference_steps(state, batches, params, lrs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "params",
    [_flags(True, True, True, "both", "both", "by_lr"),
     _flags(False, False, True, "min", "both", "plain"),
     _flags(True, False, False, "none", "both", "by_lr")],
    ids=["lazy", "non_lazy", "no_accumulation"],
)
def test_every_mode_on_duplicate_heavy_ids(mode, params):
    rng = np.random.default_rng(5)
    state = random_state(rng, 6, 3)
    batches = [(rng.integers(0, 3, 9), rng.standard_normal((9, 3)).astype(np.float32))
               for _ in range(3)]
    lrs = [0.05, 0.03, 0.01]
    _assert_matches(_run(mode, state, batches, params, lrs),
                    reference_steps(state, batches, params, lrs), mode)


def test_nan_gradients_propagate_by_default():
    state = random_state(np.random.default_rng(1), 3, 2)
    grads = np.array([[np.nan, 1.0]], np.float32)
    w, m, v = _run("eager", state, [(np.array([1]), grads)], AdamParameters(0.1), [None])
    assert np.isnan(w[1, 0]) and np.isnan(m[1, 0]) and np.isnan(v[1, 0])
    np.testing.assert_array_equal(w[[0, 2]], state[0][[0, 2]])


def test_ref_variables_in_a_tf1_graph():
    state = random_state(np.random.default_rng(2), 4, 2)
    ids, grads = np.array([2, 0, 2]), np.ones((3, 2), np.float32)
    params = AdamParameters(0.1, lazy_adam=False)
    with tf.Graph().as_default():
        variables = [tf.compat.v1.Variable(x, use_resource=False) for x in state]
        update = tf_apply_adam(*variables, ids, grads, params)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(update)
            got = sess.run(variables)
    _assert_matches(got, adam_update(*state, ids, grads, params))


# Bad input: the error, and nothing written.
_PARAMS = AdamParameters(0.1)


def _eager_variables(rows=4, dim=2):
    return [tf.Variable(x) for x in random_state(np.random.default_rng(3), rows, dim)]


def _assert_raises_unchanged(mode, ids, grads, error, match, check_numerics=False):
    variables = _eager_variables()
    before = [x.numpy() for x in variables]

    def step():
        tf_apply_adam(*variables, ids, grads, _PARAMS, check_numerics=check_numerics)

    with pytest.raises(error, match=match):
        (step if mode == "eager" else tf.function(step))()
    for x, b in zip(variables, before, strict=True):
        np.testing.assert_array_equal(x.numpy(), b)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize(
    ("ids", "match"),
    [([1, 4, 7], r"`ids` must lie in \[0, 4\) \(the rows of `var`\); first bad id: 4 at pos"),
     ([0, -2, 1], r"`ids` must lie in \[0, 4\).*first bad id: -2 at position 1")],
)
def test_ids_out_of_range(mode, ids, match):
    grads = np.ones((3, 2), np.float32)
    for dtype in (np.int32, np.int64):
        _assert_raises_unchanged(mode, np.array(ids, dtype), grads,
                                 tf.errors.InvalidArgumentError, match)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_check_numerics(mode):
    grads = np.array([[1.0, np.inf]], np.float32)
    _assert_raises_unchanged(mode, np.array([0]), grads, tf.errors.InvalidArgumentError,
                             r"`grads` or `learning_rate` has NaN or Inf", check_numerics=True)


@pytest.mark.parametrize(
    ("ids", "grads", "match"),
    [
        (np.array([0, 9]), np.ones((2, 2), np.float32), r"first bad id: 9 at position 1"),
        (np.array([0, 1]), np.ones((3, 2), np.float32), r"`grads` must be \[len\(ids\)"),
        (np.array([[0]]), np.ones((1, 2), np.float32), r"`ids` must have rank 1"),
    ],
)
def test_tf1_runtime_errors_write_nothing(ids, grads, match):
    state = random_state(np.random.default_rng(4), 4, 2)
    with tf.Graph().as_default():
        variables = [tf.Variable(x) for x in state]
        ids_ph = tf.compat.v1.placeholder(tf.int64, None)  # unknown rank
        grads_ph = tf.compat.v1.placeholder(tf.float32, [None, None])
        update = tf_apply_adam(*variables, ids_ph, grads_ph, AdamParameters(0.1, lazy_adam=False))
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            with pytest.raises(tf.errors.InvalidArgumentError, match=match):
                sess.run(update, {ids_ph: ids, grads_ph: grads})
            for got, want in zip(sess.run(variables), state, strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("accumulate", [True, False])
def test_jit_bad_input_writes_nothing(accumulate):
    """Under XLA the checks cannot raise; the update is masked off instead."""
    variables = _eager_variables()
    before = [x.numpy() for x in variables]
    params = AdamParameters(0.1, use_gradient_accumulation=accumulate)

    @tf.function(jit_compile=True)
    def step(ids, grads):
        tf_apply_adam(*variables, ids, grads, params, check_numerics=True)

    step(tf.constant([1, 4, 1]), tf.ones([3, 2]))
    step(tf.constant([1, 2]), tf.constant([[1.0, 1.0], [np.nan, 0.0]]))
    for x, b in zip(variables, before, strict=True):
        np.testing.assert_array_equal(x.numpy(), b)
