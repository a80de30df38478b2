"""The fused TpuEmbedAdamApply kernel against the numpy reference, bad input,
numerics checks, concurrency and the library loader."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf
from _ops_helpers import (
    assert_state_equal,
    flag_sets,
    params_of,
    problems,
    random_state,
    reference_steps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpu_embed_adam import _library
from tpu_embed_adam.ops.apply import apply_adam
from tpu_embed_adam.ops.fused import fused_apply_adam
from tpu_embed_adam.params import AdamParameters
from tpu_embed_adam.reference import adam_update, bias_corrected_learning_rate

pytestmark = pytest.mark.skipif(
    _library.load_library() is None, reason=f"kernel library not built: {_library.load_error()}"
)


def _variables(w, m, v):
    return tf.Variable(w), tf.Variable(m), tf.Variable(v)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), flags=flag_sets)
def test_matches_reference_eager(problem, flags):
    # Same float32 operations in the same order, no FMA: bit for bit, not merely close.
    state, batches, lrs = problem
    variables = _variables(*state)
    expected = state
    for (ids, g), lr in zip(batches, lrs, strict=True):
        assert fused_apply_adam(*variables, ids, g, flags, learning_rate=lr) is None
        expected = adam_update(*expected, ids, g, flags, learning_rate=lr)
        assert_state_equal(variables, expected)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), flags=flag_sets)
def test_matches_reference_in_tf_function(problem, flags):
    state, batches, lrs = problem
    variables = _variables(*state)

    @tf.function
    def step(ids, g, lr):
        fused_apply_adam(*variables, ids, g, flags, learning_rate=lr)

    for (ids, g), lr in zip(batches, lrs, strict=True):
        rate = tf.constant(flags.learning_rate if lr is None else lr, tf.float32)
        step(tf.constant(ids), tf.constant(g), rate)
    assert_state_equal(variables, reference_steps(state, batches, flags, lrs))


@st.composite
def large_problems(draw):
    """One step on 10k-40k ids over a few thousand rows: enough ids for the
    hash-partitioned grouping (over 8,192) and enough distinct rows for the
    multi-worker summed path (1,024 or more)."""
    rows = draw(st.integers(1_500, 4_000))
    n = draw(st.integers(10_000, 40_000))
    dim = draw(st.sampled_from([1, 3, 8]))
    skewed = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Zipf ids put thousands of duplicates on a few rows, uniform ones spread
    # out; both leave some rows absent.
    ids = (rng.zipf(1.2, n) - 1) % rows if skewed else rng.integers(0, rows, n)
    ids = ids.astype(draw(st.sampled_from([np.int32, np.int64])))
    grads = rng.standard_normal((n, dim)).astype(np.float32)
    lr = draw(st.sampled_from([None, 0.3]))
    return random_state(rng, rows, dim), ids, grads, lr


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=large_problems(), flags=flag_sets)
def test_matches_reference_on_many_ids(problem, flags):
    state, ids, grads, lr = problem
    assert len(np.unique(ids)) >= 1_024  # else the multi-worker path is not reached
    variables = _variables(*state)
    fused_apply_adam(*variables, ids, grads, flags, learning_rate=lr)
    assert_state_equal(variables, adam_update(*state, ids, grads, flags, learning_rate=lr))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_matches_reference_in_tf1_session(index_dtype):
    rng = np.random.default_rng(3)
    state = random_state(rng, 20, 5)
    ids = rng.integers(0, 20, 30).astype(index_dtype)
    grads = rng.standard_normal((30, 5)).astype(np.float32)
    params = AdamParameters(0.1, lazy_adam=False, weight_decay_factor=0.01)
    with tf.Graph().as_default() as graph:
        variables = [tf.compat.v1.Variable(x, use_resource=True) for x in state]
        lr = tf.compat.v1.placeholder(tf.float32, [])
        ids_in = tf.compat.v1.placeholder(index_dtype, [None])
        grads_in = tf.compat.v1.placeholder(tf.float32, [None, 5])
        op = fused_apply_adam(*variables, ids_in, grads_in, params, learning_rate=lr)
        assert isinstance(op, tf.Operation)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            expected = state
            for t in (1, 2, 3):
                rate = bias_corrected_learning_rate(0.1, 0.9, 0.999, t)
                sess.run(op, {lr: rate, ids_in: ids, grads_in: grads})
                expected = adam_update(*expected, ids, grads, params, learning_rate=rate)
            got = sess.run(variables)
    assert_state_equal(got, expected)


@pytest.mark.parametrize(
    "flags",
    [
        params_of(),
        params_of(lazy_adam=False),
        params_of(use_gradient_accumulation=False),
        params_of(sum_inside_sqrt=False, weight_decay_factor=0.1, clip_gradient_min=-0.1),
    ],
)
def test_many_ids_use_the_partitioned_path(flags):
    # Over 8192 ids the dedupe splits the ids into hash partitions.
    rng = np.random.default_rng(7)
    state = random_state(rng, 3000, 3)
    ids = ((rng.zipf(1.2, 20000) - 1) % 3000).astype(np.int64)
    grads = rng.standard_normal((20000, 3)).astype(np.float32)
    variables = _variables(*state)
    fused_apply_adam(*variables, ids, grads, flags)
    assert_state_equal(variables, adam_update(*state, ids, grads, flags))


@pytest.mark.parametrize("lazy", [True, False])
def test_huge_page_sized_variables_match_the_reference(lazy):
    # 2048 x 1024 float32 = 8 MB per variable: the kernel asks for huge pages
    # under each (and collapses the pages already there), which must leave
    # every value as it was, also for a variable given a new buffer later.
    rng = np.random.default_rng(11)
    state = random_state(rng, 2048, 1024)
    flags = params_of(lazy_adam=lazy)
    variables = _variables(*state)
    expected = state
    for step in range(3):
        ids = rng.integers(0, 2048, 300).astype(np.int64)
        grads = rng.standard_normal((300, 1024)).astype(np.float32)
        fused_apply_adam(*variables, ids, grads, flags)
        expected = adam_update(*expected, ids, grads, flags)
        assert_state_equal(variables, expected)
        if step == 0:
            # A dense write (copy-on-read mode: a new buffer, or the old one).
            variables[0].assign(expected[0] + np.float32(1))
            expected = (expected[0] + np.float32(1), *expected[1:])


@pytest.mark.parametrize(
    "params_class", [AdamParameters, tf.compat.v1.tpu.experimental.AdamParameters]
)
def test_accepts_our_and_tf_adam_parameters(params_class):
    params = params_class(
        0.1,
        clip_weight_min=-1.0,
        clip_gradient_max=0.5,
        weight_decay_factor=0.01,
        multiply_weight_decay_factor_by_learning_rate=True,
    )
    rng = np.random.default_rng(5)
    state = random_state(rng, 10, 4)
    ids = np.array([1, 3, 1, 9])
    grads = rng.standard_normal((4, 4)).astype(np.float32)
    variables = _variables(*state)
    # apply_adam converts TF's class to ours, which the fused wrapper takes.
    apply_adam(*variables, ids, grads, params, implementation="fused")
    assert_state_equal(variables, adam_update(*state, ids, grads, params))


def test_equals_tf_adam_optimizer_non_lazy_with_bias_correction():
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((6, 3)).astype(np.float32)
    params = AdamParameters(0.01, lazy_adam=False, sum_inside_sqrt=False)
    table, m, v = tf.Variable(w0), tf.Variable(tf.zeros([6, 3])), tf.Variable(tf.zeros([6, 3]))
    peer = tf.Variable(w0)
    optimizer = tf.compat.v1.train.AdamOptimizer(0.01, epsilon=params.epsilon)
    for t in (1, 2, 3, 4):
        ids = rng.integers(0, 6, 5)
        grads = rng.standard_normal((5, 3)).astype(np.float32)
        lr = bias_corrected_learning_rate(0.01, params.beta1, params.beta2, t)
        fused_apply_adam(table, m, v, ids, grads, params, learning_rate=lr)
        dense = tf.math.unsorted_segment_sum(grads, ids, 6)
        optimizer.apply_gradients([(dense, peer)])
    np.testing.assert_allclose(table.numpy(), peer.numpy(), rtol=1e-5, atol=1e-6)


def test_empty_ids():
    rng = np.random.default_rng(0)
    state = random_state(rng, 5, 2)
    empty_ids, empty_grads = np.zeros([0], np.int64), np.zeros([0, 2], np.float32)
    lazy = _variables(*state)
    fused_apply_adam(*lazy, empty_ids, empty_grads, params_of())
    assert_state_equal(lazy, state)
    dense = _variables(*state)
    non_lazy = params_of(lazy_adam=False)
    fused_apply_adam(*dense, empty_ids, empty_grads, non_lazy)
    assert_state_equal(dense, adam_update(*state, empty_ids, empty_grads, non_lazy))


# Bad input: the error names the argument and the bad value, and nothing moved.

_ROWS, _DIM = 6, 4


def _bad_call(**overrides):
    rng = np.random.default_rng(1)
    state = random_state(rng, _ROWS, _DIM)
    variables = _variables(*state)
    args = {
        "ids": np.array([0, 2, 5], np.int64),
        "grads": np.ones([3, _DIM], np.float32),
        "learning_rate": None,
        "check_numerics": False,
    }
    args.update(overrides)
    return state, variables, args


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"ids": np.array([0, 6, 1])}, r"ids\[1\] = 6 is out of range \[0, 6\)"),
        ({"ids": np.array([0, 1, -3], np.int32)}, r"ids\[2\] = -3 is out of range \[0, 6\)"),
        ({"ids": np.array([[0, 1, 2]])}, r"ids must be a vector; got shape \[1,3\]"),
        ({"grads": np.ones([3], np.float32)}, r"grads must be a matrix"),
        ({"grads": np.ones([2, _DIM], np.float32)}, r"grads must have one row per id"),
        ({"grads": np.ones([3, _DIM + 1], np.float32)}, r"grads must have the dim of var \[6,4\]"),
        (
            {
                "grads": np.array([[0, 0, 0, 0], [0, 0, np.nan, 0], [0] * 4], np.float32),
                "check_numerics": True,
            },
            r"grads\[1, 2\] = nan is not finite",
        ),
        (
            {"grads": np.full([3, _DIM], np.inf, np.float32), "check_numerics": True},
            r"grads\[0, 0\] = inf is not finite",
        ),
        (
            {"learning_rate": float("inf"), "check_numerics": True},
            r"learning_rate = inf is not finite",
        ),
    ],
)
def test_bad_input_raises_and_writes_nothing(overrides, pattern):
    state, variables, args = _bad_call(**overrides)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        fused_apply_adam(*variables, params=params_of(), **args)
    assert_state_equal(variables, state)


def test_non_scalar_learning_rate():
    state, variables, args = _bad_call()
    del args["learning_rate"]
    # A known shape fails in apply_adam, before the op is built...
    with pytest.raises(ValueError, match=r"`learning_rate` must be a scalar"):
        apply_adam(
            *variables,
            params=params_of(),
            learning_rate=tf.constant([0.1, 0.2]),
            implementation="fused",
            **args,
        )

    # ...an unknown one in the kernel, before it writes.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
    def step(lr):
        fused_apply_adam(*variables, params=params_of(), learning_rate=lr, **args)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"learning_rate must be a scalar"):
        step(tf.constant([0.1, 0.2]))
    assert_state_equal(variables, state)


@pytest.mark.parametrize(
    ("slot", "shape", "pattern"),
    [
        (1, [_ROWS, _DIM + 1], r"m must have the shape of var \[6,4\]; got \[6,5\]"),
        (2, [_ROWS + 1, _DIM], r"v must have the shape of var \[6,4\]; got \[7,4\]"),
        (0, [_ROWS * _DIM], r"var must be a matrix \[rows, dim\]; got shape \[24\]"),
    ],
)
def test_bad_variable_shapes(slot, shape, pattern):
    state, variables, args = _bad_call()
    variables = list(variables)
    variables[slot] = tf.Variable(np.zeros(shape, np.float32))
    before = [x.numpy() for x in variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        fused_apply_adam(*variables, params=params_of(), **args)
    for var, value in zip(variables, before, strict=True):
        np.testing.assert_array_equal(var.numpy(), value)


def test_bad_variable_dtype_and_aliasing():
    state, variables, args = _bad_call()
    # apply_adam refuses these before dispatch (tests/ops/test_apply.py); the
    # kernel's own checks are the last net for direct callers.
    with pytest.raises(tf.errors.InvalidArgumentError, match="m must be float32; got double"):
        fused_apply_adam(
            variables[0],
            tf.Variable(state[1].astype(np.float64)),
            variables[2],
            params=params_of(),
            **args,
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="three distinct variables"):
        fused_apply_adam(variables[0], variables[1], variables[1], params=params_of(), **args)
    with pytest.raises(TypeError, match="resource tf.Variable"):
        fused_apply_adam(state[0], *variables[1:], params=params_of(), **args)
    assert_state_equal(variables, state)


def test_static_shape_errors_in_tf_function():
    state, variables, args = _bad_call()

    @tf.function
    def step():
        fused_apply_adam(*variables, args["ids"], np.ones([2, _DIM], np.float32), params_of())

    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="one row per id"):
        step()
    assert_state_equal(variables, state)


def _raw_apply(variables, optimization_parameters: bytes):
    return _library.load_library().tpu_embed_adam_apply(
        var=variables[0].handle, m=variables[1].handle, v=variables[2].handle,
        ids=np.array([1], np.int64), grads=np.ones([1, _DIM], np.float32),
        learning_rate=np.float32(0.1), optimization_parameters=optimization_parameters,
    )


def test_parameters_are_read_as_the_engine_reads_them():
    # One C++ reader (cc/core/adam_config.h) for the op's attr and the engine's
    # tables: what AdamParameters refuses but a proto can hold is refused
    # with the engine's message, and nothing is written.
    state, variables, _ = _bad_call()
    msg = AdamParameters(0.1).to_tf_proto()
    msg.adam.epsilon = 1e-23
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"optimization_parameters: Argument `epsilon` vanishes in float32",
    ):
        _raw_apply(variables, msg.SerializeToString())
    msg.stochastic_gradient_descent.SetInParent()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="Argument `message` configures the 'stochastic_gradient_descent' optimizer",
    ):
        _raw_apply(variables, msg.SerializeToString())
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="Argument `message`: bytes do not parse"
    ):
        _raw_apply(variables, b"\xff\xff")
    assert_state_equal(variables, state)


def test_uninitialized_variable_in_session():
    with tf.Graph().as_default() as graph:
        variables = [tf.compat.v1.Variable(tf.zeros([4, 2]), use_resource=True) for _ in range(3)]
        op = fused_apply_adam(*variables, [1], [[1.0, 2.0]], params_of())
        with tf.compat.v1.Session(graph=graph) as sess:
            with pytest.raises(tf.errors.FailedPreconditionError, match="var not found: uninit"):
                sess.run(op)


def test_nan_propagates_without_check_numerics():
    rng = np.random.default_rng(4)
    state = random_state(rng, 4, 3)
    grads = np.array([[np.nan, 1, 2], [0, np.inf, 0]], np.float32)
    variables = _variables(*state)
    fused_apply_adam(*variables, np.array([1, 2]), grads, params_of())
    with np.errstate(invalid="ignore"):
        expected = adam_update(*state, np.array([1, 2]), grads, params_of())
    assert_state_equal(variables, expected)
    assert np.isnan(variables[0].numpy()[1, 0])


def test_concurrent_calls_serialise_without_torn_rows():
    # Identical calls give one sequence of states whatever their order; every
    # snapshot read during the run must be one of those states, row for row.
    threads, calls = 4, 5
    rng = np.random.default_rng(9)
    state = random_state(rng, 400, 64)
    ids = rng.integers(0, 400, 3000)
    grads = rng.standard_normal((3000, 64)).astype(np.float32)
    flags = params_of(weight_decay_factor=0.01)
    variables = _variables(*state)
    states = [state]
    for _ in range(threads * calls):
        states.append(adam_update(*states[-1], ids, grads, flags))
    ids_t, grads_t = tf.constant(ids), tf.constant(grads)
    snapshots, errors = [], []
    done = threading.Event()

    def writer():
        try:
            for _ in range(calls):
                fused_apply_adam(*variables, ids_t, grads_t, flags)
        except Exception as e:  # noqa: BLE001 - reported by the main thread.
            errors.append(e)

    def reader():
        while not done.is_set():
            snapshots.append(variables[0].numpy())

    workers = [threading.Thread(target=writer) for _ in range(threads)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    assert not errors
    assert_state_equal(variables, states[-1])
    tables = np.stack([s[0] for s in states])
    for snapshot in snapshots:
        same = np.all(tables == snapshot, axis=(1, 2))
        assert same.any(), "a read saw a table between two serial states"
