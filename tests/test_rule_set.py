"""One rule set: every entry point gives a configuration the same verdict, naming the same argument.

The rules for Adam's hyper-parameters live in Python (`AdamParameters`,
`from_tf_proto`) and in C++ (`cc/core/adam_config.cc`, read by the fused op's
attribute and by the engine's ConfigureTPUEmbedding). These tests run every
reader on the same inputs, the fuzzer's OptimizationParameters corpus and the
disagreements found by hand, and require the same verdict and, when refused,
the same first "Argument `...`" in the message.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as opt_pb2
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as cfg_pb2

from tpu_embed_adam import AdamParameters, _library, engine, estimator, reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz_targets  # noqa: E402

pytestmark = pytest.mark.skipif(
    _library.load_library() is None, reason="kernel library not built"
)

_ARGUMENT = re.compile(r"Arguments? `([^`]+)`")


def _argument(message: str) -> str:
    found = _ARGUMENT.search(message)
    assert found, f"no `argument` named in: {message}"
    return found.group(1)


def _python_verdict(data: bytes) -> str | None:
    """None if `from_tf_proto` accepts the bytes, else the argument it names."""
    try:
        AdamParameters.from_tf_proto(data)
    except (TypeError, ValueError) as e:
        return _argument(str(e))
    return None


def _engine_verdict(data: bytes) -> str | None:
    """The same for the engine: the bytes as a one-table configuration's parameters."""
    params = opt_pb2.OptimizationParameters()
    params.ParseFromString(data)
    cfg = cfg_pb2.TPUEmbeddingConfiguration(
        num_hosts=1, num_tensor_cores=1, mode=cfg_pb2.TPUEmbeddingConfiguration.TRAINING
    )
    table = cfg.table_descriptor.add(name="t", vocabulary_size=4, dimension=2)
    table.optimization_parameters.CopyFrom(params)
    cfg.feature_descriptor.add(table_id=0, input_shape=[1])
    engine.reset()
    try:
        tf.raw_ops.ConfigureTPUEmbedding(config=cfg.SerializeToString())
    except tf.errors.InvalidArgumentError as e:
        assert not engine.info()["configured"]
        return _argument(e.message)
    finally:
        engine.reset()
    return None


def _fused_verdict(data: bytes) -> str | None:
    """The same for the fused op's `optimization_parameters` attribute."""
    variables = [tf.Variable(tf.zeros([4, 2])) for _ in range(3)]
    try:
        _library.load_library().tpu_embed_adam_apply(
            var=variables[0].handle, m=variables[1].handle, v=variables[2].handle,
            ids=np.array([1], np.int64), grads=np.ones([1, 2], np.float32),
            learning_rate=np.float32(0.1), optimization_parameters=data,
        )
    except tf.errors.InvalidArgumentError as e:
        return _argument(e.message)
    return None


def _corpus(n: int, seed: int) -> list[bytes]:
    """Fuzzer inputs that parse as TF's message (the engine's reader needs a parse)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        data = fuzz_targets.proto_input(rng)
        try:
            opt_pb2.OptimizationParameters().ParseFromString(data)
        except Exception:  # noqa: BLE001 (a DecodeError: not a message at all)
            continue
        out.append(data)
    return out


def _proto(**fields) -> bytes:
    msg = AdamParameters(0.1).to_tf_proto()
    for path, value in fields.items():
        *parents, leaf = path.split("__")
        owner = msg
        for name in parents:
            owner = getattr(owner, name)
        setattr(owner, leaf, value)
    return msg.SerializeToString()


# The disagreements issue 16 listed, and their neighbours.
_CASES = {
    "beta1=1.5": _proto(adam__beta1=1.5),
    "beta2 nan": _proto(adam__beta2=float("nan")),
    "non-lazy without accumulation": _proto(
        adam__use_non_lazy_adam=True, gradient_accumulation_status=2
    ),
    "gradient clipping without accumulation": _proto(
        gradient_clipping_limits__upper__value=1.0, gradient_accumulation_status=2
    ),
    "accumulation status 7": _proto(gradient_accumulation_status=7),
    "multiply flag without decay": _proto(multiply_weight_decay_factor_by_learning_rate=True),
    "infinite weight clip": _proto(clipping_limits__lower__value=float("-inf")),
    "crossed clip": _proto(clipping_limits__lower__value=2.0, clipping_limits__upper__value=1.0),
    "subnormal learning rate": _proto(learning_rate__constant=1e-40),
    "subnormal epsilon": _proto(adam__epsilon=1e-40, adam__use_sum_inside_sqrt=False),
    "negative subnormal decay": _proto(weight_decay_factor=-1e-40),
    "simulated quantization": _proto(simulated_quantization__enabled=True),
    "negative dynamic tag": _proto(learning_rate__dynamic__tag=-1),
    "valid": _proto(),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_every_reader_gives_the_listed_cases_one_verdict(name):
    data = _CASES[name]
    python = _python_verdict(data)
    assert _engine_verdict(data) == python
    assert _fused_verdict(data) == python
    assert (python is None) == (name == "valid")


def test_the_fuzz_corpus_gets_one_verdict_from_python_and_the_engine():
    disagreements = []
    verdicts = set()
    for data in _corpus(400, seed=16):
        python, engine_says = _python_verdict(data), _engine_verdict(data)
        verdicts.add(python)
        if python != engine_says:
            disagreements.append((data, python, engine_says))
    assert not disagreements, disagreements[:5]
    # The corpus reaches both verdicts and several rules.
    assert None in verdicts and len(verdicts) >= 5, verdicts


def test_beta_and_learning_rate_errors_are_the_same_from_every_python_entry():
    for call in (
        lambda: AdamParameters(0.1, beta1=1.5),
        lambda: reference.bias_corrected_learning_rate(0.1, 1.5, 0.9, 1),
    ):
        with pytest.raises(ValueError, match=r"Argument `beta1` must be >= 0 and < 1"):
            call()
    for call in (
        lambda: AdamParameters(-1.0),
        lambda: reference.bias_corrected_learning_rate(-1.0, 0.9, 0.9, 1),
    ):
        with pytest.raises(ValueError, match=r"Argument `learning_rate` must be > 0"):
            call()


def test_the_estimator_refuses_a_bad_flag_with_the_class_error_type(tmp_path):
    from tensorflow.python.tpu import tpu_embedding as tf_te

    with pytest.raises(TypeError, match="Argument `lazy_adam` must be a bool"):
        AdamParameters(0.1, lazy_adam=1)
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        table_to_config_dict={"t": tf_te.TableConfig(4, 2)},
        feature_to_config_dict={"f": tf_te.FeatureConfig("t")},
        optimization_parameters=tf_te.AdamParameters(0.1, lazy_adam=1),
    )
    with pytest.raises(TypeError, match="Argument `lazy_adam` must be a bool"):
        estimator.TPUEstimator(
            model_fn=lambda features, labels, mode, params: None,
            config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(tmp_path)),
            use_tpu=False,
            embedding_config_spec=spec,
            train_batch_size=4,
        )
