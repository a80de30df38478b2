"""`apply_adam`: dispatch, argument checks, and the same behaviour on both paths."""

import numpy as np
import pytest
import tensorflow as tf
from _ops_helpers import assert_state_close, assert_state_equal, random_state
from tensorflow.python.ops import variables as variables_lib

from tpu_embed_adam import _library
from tpu_embed_adam.ops import apply, options
from tpu_embed_adam.ops.apply import apply_adam
from tpu_embed_adam.params import AdamParameters, DynamicLearningRate
from tpu_embed_adam.reference import adam_update

ROWS, DIM = 6, 3
_PARAMS = AdamParameters(0.1, clip_weight_max=0.9, weight_decay_factor=0.01)


@pytest.fixture(autouse=True)
def _fresh_options(monkeypatch):
    monkeypatch.setattr(options, "_disabled_by_code", None)
    monkeypatch.setattr(options, "_warned", set())
    monkeypatch.delenv(options.DISABLE_ENV_VAR, raising=False)


@pytest.fixture(params=["tf", "fused"])
def implementation(request):
    """Runs a test on both implementations; the fused one only where it is built."""
    if request.param == "fused" and _library.load_library() is None:
        pytest.skip(f"fused kernel library not loaded: {_library.load_error()}")
    return request.param


def _state(seed=0):
    return random_state(seed, ROWS, DIM)


def _variables(state):
    return [tf.Variable(x) for x in state]


_IDS = np.array([4, 1, 4, 0, 4])


@pytest.mark.parametrize(
    "params",
    [_PARAMS, _PARAMS.replace(lazy_adam=False, clip_gradient_min=-0.5),
     _PARAMS.replace(use_gradient_accumulation=False)],
    ids=["lazy", "non_lazy", "no_accumulation"],
)
@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_indexed_slices_from_gradient_tape(implementation, params, dtype):
    state = _state()
    variables = _variables(state)
    lookup_ids = tf.constant(_IDS, dtype)
    weights = tf.constant(np.arange(1, 6, dtype=np.float32)[:, None])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(weights * tf.gather(variables[0], lookup_ids))
    grads = tape.gradient(loss, variables[0])
    assert isinstance(grads, tf.IndexedSlices)
    apply_adam(*variables, None, grads, params, implementation=implementation)
    dense = np.repeat(np.arange(1, 6, dtype=np.float32)[:, None], DIM, axis=1)
    assert_state_equal(variables, adam_update(*state, _IDS, dense, params))


def test_embedding_lookup_gradient_in_tf1_session(implementation):
    state = _state(1)
    ids = np.array([[2, 5], [2, 0]])  # 2-D lookups: the gradient's indices are flat
    with tf.Graph().as_default():
        variables = _variables(state)
        loss = tf.reduce_sum(tf.nn.embedding_lookup(variables[0], ids))
        (grads,) = tf.compat.v1.gradients(loss, [variables[0]])
        lr = tf.compat.v1.placeholder(tf.float32, [])
        update = apply_adam(*variables, None, grads, _PARAMS, lr, implementation=implementation)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(update, {lr: 0.03})
            got = sess.run(variables)
    want = adam_update(*state, ids.reshape(-1), np.ones((4, DIM), np.float32), _PARAMS, 0.03)
    assert_state_equal(got, want)


def test_tf_function_with_dynamic_rate(implementation):
    state = _state(2)
    variables = _variables(state)
    grads = np.ones((len(_IDS), DIM), np.float32)

    @tf.function
    def step(lr):
        apply_adam(*variables, _IDS, grads, _PARAMS, lr, implementation=implementation)

    for lr in (0.1, 0.05):
        step(tf.constant(lr))
        state = adam_update(*state, _IDS, grads, _PARAMS, learning_rate=lr)
    assert_state_equal(variables, state)


def test_dynamic_params_rate_needs_learning_rate(implementation):
    state = _state()
    variables = _variables(state)
    params = AdamParameters(DynamicLearningRate(0))
    grads = np.ones((1, DIM), np.float32)
    with pytest.raises(ValueError, match=r"`learning_rate` must be given"):
        apply_adam(*variables, [0], grads, params, implementation=implementation)
    assert_state_equal(variables, state)
    apply_adam(*variables, [0], grads, params, 0.1, implementation=implementation)
    assert_state_equal(variables, adam_update(*state, [0], grads, params, learning_rate=0.1))


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_bad_ids_raise_and_write_nothing(implementation, mode):
    state = _state(3)
    variables = _variables(state)

    def step():
        apply_adam(*variables, [0, ROWS], np.ones((2, DIM), np.float32), _PARAMS,
                   implementation=implementation)

    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"(?s)ids.*{ROWS}"):
        (step if mode == "eager" else tf.function(step))()
    assert_state_equal(variables, state)


def test_check_numerics(implementation):
    state = _state(4)
    variables = _variables(state)
    grads = np.array([[0.0, np.nan, 1.0]], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)nan|not finite"):
        apply_adam(*variables, [2], grads, _PARAMS, implementation=implementation,
                   check_numerics=True)
    assert_state_equal(variables, state)
    apply_adam(*variables, [2], grads, _PARAMS, implementation=implementation)
    assert np.isnan(variables[0].numpy()[2, 1])


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize(
    "params",
    [AdamParameters(0.1), AdamParameters(0.1, lazy_adam=False, weight_decay_factor=0.2),
     AdamParameters(0.1, use_gradient_accumulation=False)],
    ids=["no_decay", "decay_non_lazy", "no_accumulation"],
)
def test_infinite_weights_as_in_the_reference(implementation, mode, params):
    # The decay term is applied even with no decay factor (d = 0), so an
    # infinite weight that steps becomes NaN (0 * inf) on every path.
    if mode == "jit" and implementation == "fused":
        pytest.skip("the fused op has no XLA kernel")
    state = _state(7)
    state[0][[0, 1, 4], 0] = [np.inf, -np.inf, np.inf]  # rows 0 and 4 step, row 1 only if dense
    variables = _variables(state)
    grads = np.ones((len(_IDS), DIM), np.float32)

    def step():
        apply_adam(*variables, _IDS, grads, params, implementation=implementation)

    (step if mode == "eager" else tf.function(step, jit_compile=mode == "jit"))()
    with np.errstate(invalid="ignore"):
        want = adam_update(*state, _IDS, grads, params)
    assert np.isnan(want[0][[0, 4], 0]).all()
    (assert_state_close if mode == "jit" else assert_state_equal)(variables, want)


# Dispatch.
class _Spy:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1


@pytest.fixture
def spies(monkeypatch):
    """Replaces both implementations with call counters: (tf, fused)."""
    tf_spy, fused_spy = _Spy(), _Spy()
    monkeypatch.setattr(apply, "tf_apply_adam", tf_spy)
    monkeypatch.setattr(apply.fused, "fused_apply_adam", fused_spy)
    return tf_spy, fused_spy


@pytest.fixture
def no_library(monkeypatch):
    monkeypatch.setattr(_library, "load_library", lambda: None)
    monkeypatch.setattr(_library, "load_error", lambda: "no .so in the test")


@pytest.fixture
def fake_library(monkeypatch):
    monkeypatch.setattr(_library, "load_library", lambda: object())


def _call(implementation="auto", variables=None, **kwargs):
    variables = variables or _variables(_state())
    return apply_adam(*variables, [1], np.ones((1, DIM), np.float32),
                      kwargs.pop("params", _PARAMS), implementation=implementation, **kwargs)


def test_auto_uses_fused_on_cpu(spies, fake_library):
    _call()
    assert (spies[0].calls, spies[1].calls) == (0, 1)


def test_tf_forces_tf_path(spies, fake_library):
    _call("tf")
    assert (spies[0].calls, spies[1].calls) == (1, 0)


def test_auto_without_library_falls_back_and_warns_once(spies, no_library, caplog):
    _call()
    _call()
    assert (spies[0].calls, spies[1].calls) == (2, 0)
    warnings = [r.getMessage() for r in caplog.records if "pure-TF" in r.getMessage()]
    assert len(warnings) == 1 and "no .so in the test" in warnings[0]


def test_fused_without_library_is_an_error(spies, no_library):
    with pytest.raises(RuntimeError, match=r"implementation='fused'.*no \.so in the test"):
        _call("fused")
    assert (spies[0].calls, spies[1].calls) == (0, 0)


@pytest.mark.parametrize("how", ["function", "environment"])
def test_auto_respects_the_switch(spies, fake_library, monkeypatch, how):
    if how == "function":
        options.disable_custom_kernel()
    else:
        monkeypatch.setenv(options.DISABLE_ENV_VAR, "1")
    _call()
    assert (spies[0].calls, spies[1].calls) == (1, 0)


def test_auto_uses_tf_path_for_gpu_and_ref_variables(spies, fake_library):
    with tf.Graph().as_default():
        with tf.device("/device:GPU:0"):
            _call()
        _call(variables=[tf.compat.v1.Variable(x, use_resource=False) for x in _state()])
    assert (spies[0].calls, spies[1].calls) == (2, 0)


@pytest.mark.parametrize("slot", ["m", "v"])
def test_auto_checks_the_slots_too(spies, fake_library, caplog, slot):
    # The kernel writes all three variables: a ref or non-CPU slot rules it out.
    index = "wmv".index(slot)
    with tf.Graph().as_default():
        ref = _variables(_state())
        ref[index] = tf.compat.v1.Variable(_state()[index], use_resource=False)
        _call(variables=ref)
        on_gpu = _variables(_state())
        with tf.device("/device:GPU:0"):
            on_gpu[index] = tf.Variable(_state()[index])
        _call(variables=on_gpu)
    assert (spies[0].calls, spies[1].calls) == (2, 0)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"`{slot}` is not a resource variable" in messages
    assert f"`{slot}` is on /device:GPU:0" in messages


def test_auto_under_jit_compile_uses_tf_path(fake_library):
    state = _state(5)
    variables = _variables(state)
    grads = np.ones((len(_IDS), DIM), np.float32)

    @tf.function(jit_compile=True)
    def step():
        apply_adam(*variables, _IDS, grads, _PARAMS)

    step()
    assert_state_close(variables, adam_update(*state, _IDS, grads, _PARAMS))


def test_unknown_implementation():
    with pytest.raises(ValueError, match=r"`implementation` must be one of.*'xla'"):
        _call("xla")


def test_params_type():
    with pytest.raises(TypeError, match=r"`params` must be an AdamParameters.*dict"):
        _call(params={"learning_rate": 0.1})


def test_tf_adam_parameters_accepted(implementation):
    params = tf.compat.v1.tpu.experimental.AdamParameters(
        0.1, lazy_adam=False, clip_gradient_max=0.1, weight_decay_factor=0.1
    )
    state = _state(6)
    variables = _variables(state)
    grads = np.ones((len(_IDS), DIM), np.float32)
    apply_adam(*variables, _IDS, grads, params, implementation=implementation)
    assert_state_equal(variables, adam_update(*state, _IDS, grads, params))


@pytest.mark.parametrize("implementation_name", ["auto", "tf", "fused"])
def test_tf_adam_parameters_go_through_our_validation(spies, fake_library, implementation_name):
    # TF's class takes an epsilon whose square vanishes in float32; ours does not.
    params = tf.compat.v1.tpu.experimental.AdamParameters(0.1, epsilon=1e-23)
    with pytest.raises(ValueError, match=r"`epsilon`"):
        _call(implementation_name, params=params)
    assert (spies[0].calls, spies[1].calls) == (0, 0)


@pytest.mark.parametrize(
    ("learning_rate", "error", "match"),
    [(True, TypeError, "Python number"), ("0.1", TypeError, "Python number"),
     (tf.constant([0.1, 0.2]), ValueError, "scalar"), (tf.constant(1), TypeError, "float")],
)
def test_learning_rate_errors(spies, learning_rate, error, match):
    with pytest.raises(error, match=rf"`learning_rate`.*{match}"):
        _call("tf", learning_rate=learning_rate)


def test_ids_with_indexed_slices_must_be_none(spies):
    grads = tf.IndexedSlices(tf.ones([1, DIM]), tf.constant([1]))
    variables = _variables(_state())
    with pytest.raises(ValueError, match=r"`ids` must be None"):
        apply_adam(*variables, [1], grads, _PARAMS)
    with pytest.raises(ValueError, match=r"`ids` is required"):
        apply_adam(*variables, None, np.ones((1, DIM), np.float32), _PARAMS)


# Bad input: checked once, before dispatch, so every implementation raises the
# same error (type and message) and nothing is written.


def _partitioned(state):
    parts = []
    for i, rows in enumerate(np.split(state[0], 2)):
        part = tf.Variable(rows)
        part._set_save_slice_info(
            variables_lib.Variable.SaveSliceInfo("p", [ROWS, DIM], [i * ROWS // 2, 0], rows.shape)
        )
        parts.append(part)
    return variables_lib.PartitionedVariable("p", [ROWS, DIM], tf.float32, parts, [2, 1])


def _with(**changes):
    """A call's arguments (var, m, v, ids, grads, params, learning_rate) with `changes`."""

    def build(state, variables):
        args = dict(zip("var m v".split(), variables, strict=True))
        args.update(ids=[1, 4], grads=np.ones((2, DIM), np.float32), params=_PARAMS,
                    learning_rate=None)
        for name, change in changes.items():
            args[name] = change(state, args) if callable(change) else change
        return args

    return build


_BAD_INPUTS = {
    "var_numpy": (_with(var=lambda s, a: s[0]), TypeError,
                  r"`var` must be a tf.Variable; received ndarray"),
    "var_tensor": (_with(var=lambda s, a: tf.constant(s[0])), TypeError,
                   r"`var` must be a tf.Variable; received EagerTensor"),
    "var_partitioned": (_with(var=lambda s, a: _partitioned(s)), TypeError,
                        r"`var` must be a tf.Variable; received PartitionedVariable \(apply"),
    "m_numpy": (_with(m=lambda s, a: s[1]), TypeError, r"`m` must be a tf.Variable"),
    "v_float64": (_with(v=lambda s, a: tf.Variable(s[2].astype(np.float64))), TypeError,
                  r"`v` must be float32; received float64"),
    "grads_float64": (_with(grads=np.ones((2, DIM))), TypeError,
                      r"`grads` must be float32; received float64"),
    "ids_float": (_with(ids=[1.0, 4.0]), TypeError,
                  r"`ids` must be int32 or int64; received float"),
    "all_aliased": (_with(m=lambda s, a: a["var"], v=lambda s, a: a["var"]), ValueError,
                    r"three distinct variables; `m` is `var`"),
    "m_is_v": (_with(v=lambda s, a: a["m"]), ValueError, r"three distinct variables; `v` is `m`"),
    "var_is_v": (_with(v=lambda s, a: a["var"]), ValueError, r"`v` is `var`"),
    "ids_rank": (_with(ids=[[1, 4]]), ValueError, r"`ids` must have rank 1"),
    "var_rank": (_with(var=lambda s, a: tf.Variable(s[0][0]), m=lambda s, a: tf.Variable(s[1][0]),
                       v=lambda s, a: tf.Variable(s[2][0])), ValueError, r"`var` must have rank 2"),
    "m_shape": (_with(m=lambda s, a: tf.Variable(s[1][:-1])), ValueError,
                r"`m` must have the shape of `var`"),
    "grads_rows": (_with(grads=np.ones((3, DIM), np.float32)), ValueError, r"one row per id"),
    "grads_width": (_with(grads=np.ones((2, DIM + 1), np.float32)), ValueError, r"row width"),
    "params_type": (_with(params={"learning_rate": 0.1}), TypeError,
                    r"`params` must be an AdamParameters"),
    "rate_type": (_with(learning_rate="0.1"), TypeError, r"`learning_rate` must be a Python"),
    # Constant rates: the rule of AdamParameters (learning_rates.constant_learning_rate).
    "rate_negative": (_with(learning_rate=-1.0), ValueError, r"`learning_rate` must be > 0.*-1\.0"),
    "rate_zero": (_with(learning_rate=0), ValueError, r"`learning_rate` must be > 0.*0"),
    "rate_nan": (_with(learning_rate=float("nan")), ValueError,
                 r"`learning_rate` must be finite in float32.*nan"),
    "rate_inf": (_with(learning_rate=-float("inf")), ValueError,
                 r"`learning_rate` must be finite in float32.*-inf"),
    "rate_subnormal": (_with(learning_rate=np.float32(1e-40)), ValueError,
                       r"`learning_rate` must be a normal float32.*1e-40"),
    "rate_tf_params_subnormal": (
        _with(params=tf.compat.v1.tpu.experimental.AdamParameters(1e-40)), ValueError,
        r"`learning_rate` must be a normal float32.*1e-40"),
}


@pytest.mark.parametrize("implementation", ["auto", "fused", "tf"])
@pytest.mark.parametrize("case", list(_BAD_INPUTS), ids=list(_BAD_INPUTS))
def test_bad_input_same_error_on_every_implementation(implementation, case):
    if implementation == "fused" and _library.load_library() is None:
        pytest.skip(f"fused kernel library not loaded: {_library.load_error()}")
    build, error, pattern = _BAD_INPUTS[case]
    state = _state(9)
    variables = _variables(state)
    args = build(state, variables)
    with pytest.raises(error, match=pattern):
        apply_adam(**args, implementation=implementation)
    assert_state_equal(variables, state)
