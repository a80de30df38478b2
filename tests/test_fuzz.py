"""Short fuzz runs of every `tools/fuzz.py` target, under hypothesis (a few hundred inputs each).

The property (`tools/fuzz_targets.py`): each input either succeeds, and then
round-trips (params) or equals `reference.adam_update` bit for bit
(`apply_adam`), or raises a documented error type (TypeError, ValueError,
tf.errors.InvalidArgumentError; for the engine's configuration, an OpError
such as InvalidArgument), and a rejected call changes no state: not the
caller's input, not the table and slots, not the engine. Never
OverflowError, RecursionError, AttributeError, KeyError, nor a crash: the
engine target runs `ConfigureTPUEmbedding` in a child process, and a dead
child fails the test with the input that killed it.

Inputs come from hypothesis's own strategies (hostile dicts, JSON trees,
byte edits of valid messages) and from the structure-aware generator that
`tools/fuzz.py` uses (field-level protobuf edits), driven by hypothesis's
random source. `make fuzz` runs the long version.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))

import fuzz_targets as ft  # noqa: E402

FAST = settings(
    max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def _generated(target: str) -> st.SearchStrategy:
    return st.randoms(use_true_random=False).map(lambda r: ft.generate(target, r))


_FIELDS = st.sampled_from(ft.FIELDS)
_VALUES = st.one_of(
    st.sampled_from(ft.hostile_values()),
    st.floats(),
    st.floats(width=32),
    st.integers(),
    st.integers(min_value=2**1000, max_value=2**1100),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.fixed_dictionaries({"dynamic_tag": st.one_of(st.integers(), st.floats(), st.none())}),
)


@st.composite
def _dicts(draw: st.DrawFn) -> dict:
    base = ft.random_valid_dict(draw(st.randoms(use_true_random=False)))
    edits = draw(st.dictionaries(st.one_of(_FIELDS, st.text(max_size=3)), _VALUES, max_size=3))
    drops = draw(st.sets(_FIELDS, max_size=2))
    return {k: v for k, v in {**base, **edits}.items() if k not in drops}


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=8,
)


@st.composite
def _json_texts(draw: st.DrawFn) -> str | bytes:
    config = draw(_dicts())
    if draw(st.booleans()):
        config = {**config, draw(_FIELDS): draw(_JSON)}
    text = json.dumps(config, default=repr)  # NaN/Infinity are what Python writes
    cut = draw(st.integers(0, len(text)))
    if draw(st.integers(0, 4)) == 0:
        text = text[:cut] + draw(st.text(max_size=4)) + text[cut:]
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


@st.composite
def _proto_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(ft.seed_proto(draw(st.randoms(use_true_random=False))))
    for op, pos, chunk in draw(st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 64), st.binary(min_size=1, max_size=6)),
            max_size=3)):
        pos = min(pos, len(data))
        if op == 0:
            data[pos:pos] = chunk
        elif op == 1:
            data[pos:pos + len(chunk)] = chunk
        else:
            del data[pos:pos + len(chunk)]
    return bytes(data)


def _check(target: str, value: object) -> None:
    try:
        ft.check(target, value)
    except ft.PropertyViolation as e:
        pytest.fail(f"{e}\nreproduce: {ft.repro(target, value)}")


@FAST
@given(st.one_of(_proto_bytes(), _generated("from_proto")))
def test_from_proto(value):
    _check("from_proto", value)


@FAST
@given(st.one_of(_proto_bytes(), _generated("from_tf_proto")))
def test_from_tf_proto(value):
    _check("from_tf_proto", value)


@FAST
@given(st.one_of(_json_texts(), _generated("from_json")))
def test_from_json(value):
    _check("from_json", value)


@FAST
@given(st.one_of(_dicts(), _generated("from_dict"), _VALUES))
def test_from_dict(value):
    _check("from_dict", value)


@settings(FAST, max_examples=60)
@given(_generated("apply_adam"))
def test_apply_adam(value):
    _check("apply_adam", value)


@pytest.fixture(scope="module")
def engine_worker():
    worker = ft.EngineWorker()
    yield worker
    worker.close()


_ENGINE_SEEDS: list[bytes] = []


@st.composite
def _engine_inputs(draw: st.DrawFn) -> tuple[int, bytes]:
    if not _ENGINE_SEEDS:
        _ENGINE_SEEDS.extend(ft.seed_engine_configs())
    rng = draw(st.randoms(use_true_random=False))
    return rng.randrange(len(_ENGINE_SEEDS)), ft.engine_input(rng, _ENGINE_SEEDS)


@settings(FAST, max_examples=120)
@given(_engine_inputs())
def test_engine_config(engine_worker, value):
    try:
        engine_worker.run(*value)
    except ft.PropertyViolation as e:
        pytest.fail(f"{e}\nreproduce: tools/fuzz_targets.py EngineWorker().run{value!r}")


# Stands in for the engine child: answers "ok", and aborts (after a line on
# stderr) on the input b"die".
_DYING_CHILD = """
import os, struct, sys
print("ready", flush=True)
while len(header := sys.stdin.buffer.read(8)) == 8:
    data = sys.stdin.buffer.read(struct.unpack("<II", header)[1])
    if data == b"die":
        sys.stderr.write("about to abort\\n")
        sys.stderr.flush()
        os.abort()
    print("ok " + data.decode(), flush=True)
"""


def test_engine_worker_reports_the_input_its_child_dies_on_and_goes_on():
    worker = ft.EngineWorker(child=(sys.executable, "-c", _DYING_CHILD))
    names = [b"a", b"b", b"die", *(b"c%d" % i for i in range(2 * ft.PIPELINE_DEPTH))]
    try:
        results = list(worker.run_all((i, (0, name)) for i, name in enumerate(names)))
    finally:
        worker.close()
    assert [i for i, _ in results] == list(range(len(names)))
    crash = results[2][1]
    assert isinstance(crash, ft.EngineCrash)
    assert "exit -6" in str(crash) and "b'die'" in str(crash)
    assert "about to abort" in str(crash)
    # Every other input, also those sent behind the fatal one, reached a fresh child.
    others = [outcome for i, outcome in results if i != 2]
    assert others == [f"ok {name.decode()}" for i, name in enumerate(names) if i != 2]
    assert worker.crashes == 1


def test_generators_are_deterministic():
    """The runner's reproducer (`--seed`, input index) depends on this."""
    for target in ft.PARAM_TARGETS:
        a = [ft.generate(target, random.Random(f"0:{target}:{i}")) for i in range(20)]
        b = [ft.generate(target, random.Random(f"0:{target}:{i}")) for i in range(20)]
        assert [ft._snapshot(x) for x in a] == [ft._snapshot(x) for x in b]


def test_fixed_defect_d1_weight_decay_that_vanishes_in_float32_is_refused():
    """Found by fuzzing: a factor that is 0 in float32 no longer writes an unreadable proto."""
    from tpu_embed_adam import AdamParameters

    with pytest.raises(ValueError, match="`weight_decay_factor`.*0 in float32"):
        AdamParameters(0.1, weight_decay_factor=1e-50,
                       multiply_weight_decay_factor_by_learning_rate=True)


@pytest.mark.parametrize("learning_rate", [10**400, float("inf"), float("nan"), 1e39])
def test_fixed_defect_d2_apply_adam_learning_rate_overflow(learning_rate):
    """Found by fuzzing: the same ValueError eagerly and in a graph, nothing written."""
    import tensorflow as tf

    from tpu_embed_adam import AdamParameters, apply_adam

    var, m, v = (tf.Variable(tf.zeros([2, 2])) for _ in range(3))

    @tf.function(autograph=False)
    def step():
        apply_adam(var, m, v, tf.constant([0]), tf.ones([1, 2]), AdamParameters(0.1),
                   learning_rate=learning_rate)

    with pytest.raises(ValueError, match="`learning_rate` must be finite in float32"):
        step()
    assert not tf.reduce_any(var != 0)
