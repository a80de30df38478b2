"""Configuring the software engine through TF's raw ops: ConfigureTPUEmbedding,
the table parameters it refuses (read by the same C++ reader as the fused op),
and system fields and limits that must fail without changing the engine.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from harness_raw_ops import (
    adam_params,
    assert_engine_unchanged,
    embedding_config,
    engine_snapshot,
    load_all,
    random_slots,
    raw,
    retrieve_all,
    system_config,
)
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2

from tpu_embed_adam import engine


def test_configure_is_initialized_and_reset() -> None:
    cfg = embedding_config([("t", 4, 2, adam_params())], [(0, [1])])
    assert not raw.IsTPUEmbeddingInitialized().numpy()
    raw.ConfigureTPUEmbedding(config=cfg)
    assert raw.IsTPUEmbeddingInitialized().numpy()
    full = random_slots(np.random.default_rng(2), 4, 2)
    load_all(b"", "t", full, 1, False)
    raw.ConfigureTPUEmbedding(config=cfg)  # same config again: state kept
    np.testing.assert_array_equal(retrieve_all("t", 4, 2, 1, False)[0], full[0])
    other = embedding_config([("u", 5, 2, adam_params())], [(0, [1])])
    raw.ConfigureTPUEmbedding(config=other)  # an explicit re-initialisation
    assert [t["name"] for t in engine.tables()] == ["u"]
    engine.reset()
    assert not raw.IsTPUEmbeddingInitialized().numpy()
    assert engine.info()["tables"] == []


def test_contradicting_config(loaded: bytes) -> None:
    before = engine_snapshot()
    other = embedding_config([("a", 11, 4, adam_params())], [(0, [2])], num_hosts=2)
    with pytest.raises(tf.errors.FailedPreconditionError, match="config differs"):
        raw.RetrieveTPUEmbeddingADAMParameters(
            num_shards=2, shard_id=0, table_name="a", config=other
        )
    with pytest.raises(tf.errors.FailedPreconditionError, match="config differs"):
        raw.RecvTPUEmbeddingActivations(num_outputs=1, config=other)
    raw.RetrieveTPUEmbeddingADAMParameters(
        num_shards=2, shard_id=0, table_name="a", config=loaded
    )  # identical: fine
    assert_engine_unchanged(before)


def test_non_adam_table() -> None:
    cfg = embedding_config([("ada", 4, 2, adam_params())], [(0, [1])], optimizer="adagrad")
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="table 'ada': Argument `message` configures the 'adagrad' optimizer, not 'adam'",
    ):
        raw.ConfigureTPUEmbedding(config=cfg)
    assert not engine.info()["configured"]


def _set_lr_none(o) -> None:
    o.learning_rate.Clear()


def _set(path: str, value: float):
    def apply(o) -> None:
        *parents, leaf = path.split(".")
        for name in parents:
            o = getattr(o, name)
        setattr(o, leaf, value)

    return apply


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (_set_lr_none, r"Argument `message` has no learning_rate \(constant or dynamic\)"),
        (_set("learning_rate.dynamic.tag", -1),
         r"Argument `tag` must be in \[0, 2\*\*31\); received: -1"),
        (_set("learning_rate.constant", float("inf")),
         "Argument `learning_rate` must be finite in float32; received: inf"),
        (_set("learning_rate.constant", 0.0), "Argument `learning_rate` must be > 0; received: 0"),
        (_set("learning_rate.constant", -0.5),
         "Argument `learning_rate` must be > 0; received: -0.5"),
        (_set("learning_rate.constant", 1e-40),
         "Argument `learning_rate` must be a normal float32"),
        (_set("adam.epsilon", 1e-23),
         r"Argument `epsilon` vanishes in float32: with sum_inside_sqrt=True, epsilon\^2"),
        (_set("adam.beta1", 1.0),
         r"Argument `beta1` must be >= 0 and < 1 \(also in float32\); received: 1\."),
        (_set("adam.beta2", -0.1), r"Argument `beta2` must be >= 0 and < 1"),
        (_set("adam.beta1", float("nan")),
         "Argument `beta1` must be finite in float32; received: nan"),
        (_set("adam.epsilon", 0.0), r"Argument `epsilon` must be > 0 \(also in float32\)"),
        (_set("adam.epsilon", float("inf")), "Argument `epsilon` must be finite in float32"),
        (_set("weight_decay_factor", -1.0),
         "Argument `weight_decay_factor` must be >= 0; received: -1"),
        (_set("clipping_limits.lower.value", 2.0), None),  # with upper 1 below
        (_set("gradient_clipping_limits.upper.value", float("nan")),
         r"Argument `clip_gradient_max` must be finite in float32 \(use None for no bound\)"),
        (_set("gradient_accumulation_status", 7),
         "Argument `message` has an unknown gradient_accumulation_status 7"),
        (_set("multiply_weight_decay_factor_by_learning_rate", True),
         "Argument `multiply_weight_decay_factor_by_learning_rate` is True but"),
        (_set("simulated_quantization.enabled", True),
         "Argument `simulated_quantization` is not supported"),
    ],
)
def test_invalid_table_parameters(mutate, pattern: str | None) -> None:
    serialized = embedding_config([("t", 4, 2, adam_params())], [(0, [1])])
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(serialized)
    o = cfg.table_descriptor[0].optimization_parameters
    mutate(o)
    if pattern is None:
        o.clipping_limits.upper.value = 1.0
        pattern = r"Argument `clip_weight_min` must be <= `clip_weight_max`; received: 2 > 1\."
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"table 't': {pattern}"):
        raw.ConfigureTPUEmbedding(config=cfg.SerializeToString())
    assert not engine.info()["configured"]


def test_vanishing_epsilon_outside_the_square_root() -> None:
    # AdamParameters refuses this epsilon: set it in the proto, as a user of
    # TF's own classes could.
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(
        embedding_config([("t", 4, 2, adam_params(sum_inside_sqrt=False))], [(0, [1])])
    )
    cfg.table_descriptor[0].optimization_parameters.adam.epsilon = 1e-39
    serialized = cfg.SerializeToString()
    # A subnormal epsilon: TF's threads treat it as 0 (denormals-are-zero), so
    # the message may come from the positivity check instead.
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"table 't': Argument `epsilon` (vanishes in float32|must be > 0)",
    ):
        raw.ConfigureTPUEmbedding(config=serialized)
    assert not engine.info()["configured"]


_BIG = 2**31 - 1


_BAD_SYSTEMS = [
    (dict(num_hosts=-3), r"num_hosts -3 is outside \[1, 4096\]"),
    (dict(num_hosts=_BIG, num_tensor_cores=_BIG), rf"num_hosts {_BIG} is outside"),
    (dict(num_tensor_cores=0), r"num_tensor_cores 0 must be num_hosts \(1\) times"),
    (dict(num_hosts=2, num_tensor_cores=3), "num_tensor_cores 3 must be num_hosts"),
    (dict(num_tensor_cores=_BIG), f"num_tensor_cores {_BIG} must be"),
    (dict(sharding_strategy=7), "sharding_strategy 7 is neither DIV_DEFAULT"),
    (dict(mode=9), "Argument `mode` must be TRAINING or INFERENCE.*; received: 9"),
    (dict(mode=0), "Argument `mode` must be TRAINING or INFERENCE.*; received: 0"),
    (dict(input_shape=[_BIG, 64]), r"input_shape \[2147483647, 64\] must be .* at most 16777216"),
    (dict(input_shape=[2**24], dim=2**7), "at most 16777216 slots and 1073741824 activation"),
    (dict(num_features=_BIG), f"the configuration has {_BIG} features; at most 65536"),
    (dict(num_hosts=4096, num_tensor_cores=4096, extra_tables=299),
     r"300 tables x num_hosts 4096 = 1228800 shards; at most 1048576"),
]


def _in_fresh_process(calls: list[tuple[str, dict]]) -> list[str]:
    """Runs raw ops in a child process; returns "ErrorClass: message" (or "ok") per call.

    For inputs that once killed the process: a regression fails the test,
    not the whole suite.
    """
    script = """
import base64, json, sys
import tensorflow as tf
import tpu_embed_adam  # registers the kernels
for name, kwargs in json.load(sys.stdin):
    kwargs = {k: base64.b64decode(v) if k == "config" else v for k, v in kwargs.items()}
    try:
        getattr(tf.raw_ops, name)(**kwargs)
        print("ok")
    except tf.errors.OpError as e:
        print(f"{type(e).__name__}: {e.message}".replace(chr(10), " "))
"""
    encoded = [
        (name, {k: base64.b64encode(v).decode() if k == "config" else v for k, v in kw.items()})
        for name, kw in calls
    ]
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(encoded), capture_output=True,
        text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-len(calls):]


def test_configuration_limits_are_errors_not_crashes() -> None:
    z = [[0.0, 0.0]] * 4
    calls = []
    for fields, _ in _BAD_SYSTEMS:
        config = system_config(**fields)
        calls.append(("ConfigureTPUEmbedding", {"config": config}))
        calls.append(("LoadTPUEmbeddingADAMParameters", dict(
            parameters=z, momenta=z, velocities=z, num_shards=1, shard_id=0, table_name="t",
            config=config)))
    calls.append(("ConfigureTPUEmbedding", {"config": system_config()}))
    lines = _in_fresh_process(calls)
    for i, (_, pattern) in enumerate(_BAD_SYSTEMS):
        for line in lines[2 * i : 2 * i + 2]:
            assert line.startswith("InvalidArgumentError: "), line
            assert re.search(pattern, line), (pattern, line)
    assert lines[-1] == "ok"


@pytest.mark.parametrize("fields,pattern", _BAD_SYSTEMS[:7], ids=lambda x: str(x)[:30])
def test_bad_system_fields_leave_the_engine_as_it_was(loaded: bytes, fields, pattern) -> None:
    before = engine_snapshot()
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.ConfigureTPUEmbedding(config=system_config(**fields))
    assert_engine_unchanged(before)


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda c: c.ClearField("table_descriptor"),
         "Argument `table_descriptor` must hold at least one table"),
        (lambda c: setattr(c.table_descriptor[0], "name", "t\x00x"),
         "Argument `name` of table 0 must not contain a NUL character"),
        (lambda c: setattr(c.table_descriptor[0].optimization_parameters.adam,
                           "use_non_lazy_adam", True)
         or setattr(c.table_descriptor[0].optimization_parameters,
                    "gradient_accumulation_status", 2),
         "Argument `lazy_adam` is False, which needs `use_gradient_accumulation=True`"),
    ],
)
def test_configurations_python_refuses_are_refused(mutate, pattern: str) -> None:
    cfg = cfg_pb2.TPUEmbeddingConfiguration.FromString(
        embedding_config([("t", 4, 2, adam_params())], [(0, [1])])
    )
    mutate(cfg)
    with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
        raw.ConfigureTPUEmbedding(config=cfg.SerializeToString())
    assert not engine.info()["configured"]
