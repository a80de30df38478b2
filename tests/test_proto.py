"""The OptimizationParameters wire form, against TF 2.15.1's own config_proto."""

import importlib.util
import pathlib
import subprocess
import sys
import typing

import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as tf_pb2
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

from tpu_embed_adam import AdamParameters, DynamicLearningRate, optimization_parameters_pb2

_ROOT = pathlib.Path(__file__).resolve().parents[1]


@st.composite
def _params(draw):
    """Random valid AdamParameters with every optional field set or unset."""
    def maybe(strategy):
        return draw(st.one_of(st.none(), strategy))

    unit = st.floats(0.0, 1 - 2**-10, width=32)
    accumulation = draw(st.booleans())
    bounds = []
    for kind in ("weight", "gradient"):
        low = maybe(st.floats(-10, 0, width=32))
        high = maybe(st.floats(0, 10, width=32))
        if kind == "gradient" and not accumulation:
            low = high = None
        bounds += [low, high]
    decay = maybe(st.floats(2**-20, 1, width=32))
    return AdamParameters(
        learning_rate=draw(st.floats(2**-20, 8, width=32)),
        beta1=draw(unit),
        beta2=draw(unit),
        epsilon=draw(st.floats(2**-30, 1, width=32)),
        lazy_adam=draw(st.booleans()) or not accumulation,
        sum_inside_sqrt=draw(st.booleans()),
        use_gradient_accumulation=accumulation,
        clip_weight_min=bounds[0],
        clip_weight_max=bounds[1],
        weight_decay_factor=decay,
        multiply_weight_decay_factor_by_learning_rate=(
            maybe(st.booleans()) if decay is not None else None
        ),
        clip_gradient_min=bounds[2],
        clip_gradient_max=bounds[3],
    )


def _tf_config_proto(optimization_parameters, learning_rate_fn=None):
    tables = {
        "a": tf_tpu_embedding.TableConfig(16, 4, learning_rate_fn=learning_rate_fn),
        "b": tf_tpu_embedding.TableConfig(8, 2),
    }
    features = {name: tf_tpu_embedding.FeatureConfig(name[1]) for name in ("fa", "fb")}
    with tf.Graph().as_default():
        embedding = tf_tpu_embedding.TPUEmbedding(
            tables, features, 4, tf_tpu_embedding.TRAINING, master=None,
            optimization_parameters=optimization_parameters,
            device_config=tf_tpu_embedding.DeviceConfig(1, 1, "/job:worker"),
        )
        return embedding.config_proto


@settings(max_examples=60, deadline=None)
@given(params=_params())
def test_equals_tf_config_proto(params):
    config = _tf_config_proto(params)
    for table in config.table_descriptor:
        assert table.optimization_parameters == params.to_tf_proto()
    wire = params.to_proto().SerializeToString()
    assert wire == params.to_tf_proto().SerializeToString()
    assert tf_pb2.OptimizationParameters.FromString(wire) == params.to_tf_proto()
    tf_wire = config.table_descriptor[0].optimization_parameters.SerializeToString()
    assert optimization_parameters_pb2.OptimizationParameters.FromString(tf_wire) == (
        params.to_proto()
    )
    # Reading back gives the same message, byte for byte, from either side.
    assert AdamParameters.from_proto(wire).to_proto().SerializeToString() == wire
    assert AdamParameters.from_tf_proto(tf_wire).to_tf_proto().SerializeToString() == tf_wire


def test_round_trip_recovers_decimal_values():
    params = AdamParameters(0.1, beta1=0.85, epsilon=1e-7, clip_weight_min=-0.3,
                            weight_decay_factor=0.01,
                            multiply_weight_decay_factor_by_learning_rate=True)
    assert AdamParameters.from_proto(params.to_proto()) == params
    assert AdamParameters.from_tf_proto(params.to_tf_proto()) == params


def test_dynamic_learning_rate_round_trips():
    config = _tf_config_proto(AdamParameters(0.1), learning_rate_fn=lambda step: 0.01)
    by_name = {t.name: t.optimization_parameters for t in config.table_descriptor}
    assert by_name["a"].learning_rate.WhichOneof("learning_rate") == "dynamic"
    params = AdamParameters.from_tf_proto(by_name["a"])
    assert params.learning_rate == DynamicLearningRate(by_name["a"].learning_rate.dynamic.tag)
    assert params.to_tf_proto() == by_name["a"]
    assert AdamParameters.from_proto(params.to_proto()) == params
    assert AdamParameters.from_json(params.to_json()) == params


def _other_optimizer_bytes():
    msg = tf_pb2.OptimizationParameters()
    msg.learning_rate.constant = 0.1
    msg.stochastic_gradient_descent.SetInParent()
    return msg


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m: setattr(m.adam, "beta1", 1.0), "`beta1`"),
        (lambda m: setattr(m.adam, "epsilon", float("nan")), "`epsilon`.*nan"),
        (lambda m: setattr(m.learning_rate, "constant", -1.0), "`learning_rate`"),
        (lambda m: setattr(m.learning_rate, "constant", 1e-40),
         "`learning_rate` must be a normal float32"),
        (lambda m: m.ClearField("learning_rate"), "no learning_rate"),
        (lambda m: m.ClearField("adam"), "None.*not 'adam'"),
        (lambda m: setattr(m, "multiply_weight_decay_factor_by_learning_rate", True),
         "`weight_decay_factor`"),
        (lambda m: m.clipping_limits.lower.CopyFrom(
            type(m.clipping_limits.lower)(value=float("inf"))), "`clip_weight_min`"),
    ],
)
@pytest.mark.parametrize("ours", [True, False])
def test_from_proto_rejects_invalid_values(mutate, pattern, ours):
    params = AdamParameters(0.1)
    msg = params.to_proto() if ours else params.to_tf_proto()
    mutate(msg)
    read = AdamParameters.from_proto if ours else AdamParameters.from_tf_proto
    with pytest.raises(ValueError, match=pattern):
        read(msg)


def test_from_proto_names_an_empty_message():
    for read, message_class in (
        (AdamParameters.from_proto, optimization_parameters_pb2.OptimizationParameters),
        (AdamParameters.from_tf_proto, tf_pb2.OptimizationParameters),
    ):
        for empty in (b"", message_class()):
            with pytest.raises(ValueError, match=r"^Argument `message` is empty \(no field"):
                read(empty)


def test_from_proto_rejects_other_optimizers_and_types():
    other = _other_optimizer_bytes()
    with pytest.raises(ValueError, match="'stochastic_gradient_descent'"):
        AdamParameters.from_tf_proto(other)
    with pytest.raises(ValueError, match="not 'adam'"):
        AdamParameters.from_proto(other.SerializeToString())
    with pytest.raises(TypeError, match="tpu_embed_adam.OptimizationParameters"):
        AdamParameters.from_proto(other)
    with pytest.raises(TypeError, match="tensorflow.tpu.OptimizationParameters"):
        AdamParameters.from_tf_proto("not a message")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


_TF_OPTIMIZERS = [
    f for f in tf_pb2.OptimizationParameters.DESCRIPTOR.oneofs_by_name["parameters"].fields
    if f.name != "adam"
]


@pytest.mark.parametrize("field", _TF_OPTIMIZERS, ids=lambda f: f.name)
def test_bytes_tf_reads_as_another_optimizer_are_refused(field):
    # An Adam message, then an empty `field` submessage: ours keeps `field` as
    # an unknown field and would read Adam; TF reads the last oneof member.
    adam = AdamParameters(0.1).to_proto().SerializeToString()
    other = _varint(field.number << 3 | 2) + b"\x00"
    data = adam + other
    assert tf_pb2.OptimizationParameters.FromString(data).WhichOneof("parameters") == field.name
    ours = optimization_parameters_pb2.OptimizationParameters.FromString(data)
    assert ours.WhichOneof("parameters") == "adam"
    for message in (data, ours):
        with pytest.raises(ValueError, match=f"configures the '{field.name}' optimizer"):
            AdamParameters.from_proto(message)
    with pytest.raises(ValueError, match=f"configures the '{field.name}' optimizer"):
        AdamParameters.from_tf_proto(data)
    # In the other order TF reads Adam too, and so do we. Parsed into our
    # message, the unknown field moves last: TF would read that as `field`.
    assert tf_pb2.OptimizationParameters.FromString(other + adam).WhichOneof("parameters") == "adam"
    assert AdamParameters.from_proto(other + adam) == AdamParameters(0.1)
    reordered = optimization_parameters_pb2.OptimizationParameters.FromString(other + adam)
    with pytest.raises(ValueError, match=f"configures the '{field.name}' optimizer"):
        AdamParameters.from_proto(reordered)


@pytest.mark.parametrize("corrupt", [b"\xff\xff\xff", b"\x0a\x05\x01", b"\x6a\x80"])
def test_from_proto_rejects_corrupt_bytes(corrupt):
    with pytest.raises(ValueError, match="do not parse"):
        AdamParameters.from_proto(corrupt)
    with pytest.raises(ValueError, match="do not parse"):
        AdamParameters.from_tf_proto(corrupt)


def test_unknown_tf_fields_survive_our_message():
    msg = AdamParameters(0.1).to_tf_proto()
    msg.hot_id_replication_configuration.status = 1
    ours = optimization_parameters_pb2.OptimizationParameters.FromString(msg.SerializeToString())
    assert tf_pb2.OptimizationParameters.FromString(ours.SerializeToString()) == msg


# Every field of TF's message (Adam's own included), set in an Adam message:
# read and written back (kept), or refused naming it. Nothing is dropped.
def _set(**values):
    def mutate(msg):
        for name, value in values.items():
            setattr(msg, name, value)

    return mutate


_KEPT = {
    "learning_rate": lambda m: setattr(m.learning_rate, "constant", 0.5),
    "clipping_limits": lambda m: (setattr(m.clipping_limits.lower, "value", -1.0),
                                  setattr(m.clipping_limits.upper, "value", 2.0)),
    "gradient_clipping_limits": lambda m: setattr(m.gradient_clipping_limits.upper, "value", 3.0),
    "weight_decay_factor": _set(weight_decay_factor=0.25),
    "multiply_weight_decay_factor_by_learning_rate": _set(
        weight_decay_factor=0.25, multiply_weight_decay_factor_by_learning_rate=True),
    "gradient_accumulation_status": _set(
        gradient_accumulation_status=tf_pb2.GradientAccumulationStatus.DISABLED),
    "low_dimensional_packing_status": _set(
        low_dimensional_packing_status=tf_pb2.LowDimensionalPackingStatus.DISABLED),
    "hot_id_replication_configuration": lambda m: setattr(
        m.hot_id_replication_configuration, "status",
        tf_pb2.HotIdReplicationConfiguration.MIGRATION_ONLY),
    "adam.beta1": lambda m: setattr(m.adam, "beta1", 0.5),
    "adam.beta2": lambda m: setattr(m.adam, "beta2", 0.75),
    "adam.epsilon": lambda m: setattr(m.adam, "epsilon", 0.125),
    "adam.use_non_lazy_adam": lambda m: setattr(m.adam, "use_non_lazy_adam", True),
    "adam.use_sum_inside_sqrt": lambda m: setattr(m.adam, "use_sum_inside_sqrt", False),
}
_REFUSED = {
    "simulated_quantization": (
        lambda m: (setattr(m.simulated_quantization, "enabled", True),
                   setattr(m.simulated_quantization, "num_buckets", 256)),
        r"Argument `simulated_quantization` is not supported.*received: enabled: true "
        r"num_buckets: 256"),
    **{f.name: (lambda m, name=f.name: getattr(m, name).SetInParent(),
                f"configures the '{f.name}' optimizer") for f in _TF_OPTIMIZERS},
}


def test_every_tf_field_is_covered():
    top = {f.name for f in tf_pb2.OptimizationParameters.DESCRIPTOR.fields} - {"adam"}
    adam = {f"adam.{f.name}" for f in tf_pb2.AdamParameters.DESCRIPTOR.fields}
    assert set(_KEPT) | set(_REFUSED) == top | adam


@pytest.mark.parametrize("field", list(_KEPT))
@pytest.mark.parametrize("ours", [True, False])
def test_every_field_is_kept_through_a_round_trip(field, ours):
    msg = AdamParameters(0.1).to_tf_proto()
    _KEPT[field](msg)
    wire = msg.SerializeToString()
    params = AdamParameters.from_proto(wire) if ours else AdamParameters.from_tf_proto(msg)
    assert params.to_tf_proto() == msg
    assert params.to_proto().SerializeToString() == params.to_tf_proto().SerializeToString()
    assert AdamParameters.from_json(params.to_json()) == params


@pytest.mark.parametrize("field", list(_REFUSED))
def test_fields_that_change_the_update_are_refused_naming_them(field):
    mutate, pattern = _REFUSED[field]
    msg = AdamParameters(0.1).to_tf_proto()
    mutate(msg)
    for read in (lambda: AdamParameters.from_tf_proto(msg),
                 lambda: AdamParameters.from_tf_proto(msg.SerializeToString()),
                 lambda: AdamParameters.from_proto(msg.SerializeToString())):
        with pytest.raises(ValueError, match=pattern):
            read()


def test_layout_hints_from_tf_config_protos_round_trip():
    # v1: TableConfig(hot_id_replication=True); v2: Adam(low_dimensional_packing_status=True).
    tables = {"t": tf_tpu_embedding.TableConfig(16, 4, hot_id_replication=True)}
    with tf.Graph().as_default():
        config = tf_tpu_embedding.TPUEmbedding(
            tables, {"f": tf_tpu_embedding.FeatureConfig("t")}, 4, tf_tpu_embedding.TRAINING,
            master=None, optimization_parameters=AdamParameters(0.1),
            device_config=tf_tpu_embedding.DeviceConfig(1, 1, "/job:worker"),
        ).config_proto
    tf_wire = config.table_descriptor[0].optimization_parameters.SerializeToString()
    params = AdamParameters.from_tf_proto(tf_wire)
    assert params == AdamParameters(0.1, hot_id_replication_status="ENABLED")
    assert params.to_tf_proto().SerializeToString() == tf_wire
    assert AdamParameters.from_proto(params.to_proto()) == params

    optimizer = tf.tpu.experimental.embedding.Adam(0.1, low_dimensional_packing_status=True)
    filled = tf_pb2.OptimizationParameters()
    optimizer._set_optimization_parameters(filled)
    filled.learning_rate.constant = 0.1
    params = AdamParameters.from_tf_proto(filled)
    assert params.low_dimensional_packing_status == "ENABLED"
    assert params.to_tf_proto() == filled
    assert AdamParameters.from_tpu_embedding_v2(optimizer) == params
    assert params.to_tpu_embedding_v2().low_dimensional_packing_status is True


def test_disabled_simulated_quantization_is_accepted():
    # It has no effect: read, and not written back.
    msg = AdamParameters(0.1).to_tf_proto()
    msg.simulated_quantization.num_buckets = 256
    msg.simulated_quantization.clipping_limits.upper.value = 1.0
    assert AdamParameters.from_tf_proto(msg) == AdamParameters(0.1)
    assert AdamParameters.from_proto(msg.SerializeToString()) == AdamParameters(0.1)


def test_tf2_quantization_config_is_refused():
    msg = AdamParameters(0.1).to_tf_proto()
    tf.tpu.experimental.embedding.QuantizationConfig(256, -1.0, 1.0)._set_optimization_parameters(
        msg)
    with pytest.raises(ValueError, match="`simulated_quantization` is not supported"):
        AdamParameters.from_tf_proto(msg)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m: setattr(m, "low_dimensional_packing_status", 7),
         "unknown low_dimensional_packing_status 7"),
        (lambda m: setattr(m.hot_id_replication_configuration, "status", 9),
         "unknown hot_id_replication_configuration.status 9"),
    ],
)
def test_unknown_enum_values_are_refused(mutate, pattern):
    msg = AdamParameters(0.1).to_tf_proto()
    mutate(msg)
    with pytest.raises(ValueError, match=pattern):
        AdamParameters.from_tf_proto(msg)
    with pytest.raises(ValueError, match=pattern):
        AdamParameters.from_proto(msg.SerializeToString())


@pytest.mark.parametrize(
    "suffix, where",
    # Varint fields that TF 2.15 does not know; submessages on the wire twice merge.
    [(_varint(99 << 3) + b"\x01", "99"), (b"\x32\x02" + _varint(9 << 3) + b"\x01", "adam.9"),
     (b"\x6a\x02" + _varint(3 << 3) + b"\x01", "learning_rate.3")],
    ids=["top", "adam", "learning_rate"],
)
def test_fields_tf_does_not_know_are_refused(suffix, where):
    wire = AdamParameters(0.1).to_proto().SerializeToString() + suffix
    for read in (AdamParameters.from_proto, AdamParameters.from_tf_proto):
        with pytest.raises(ValueError, match=rf"not know \(field numbers, by path\): {where};"):
            read(wire)


def _generated_descriptor(tmp_path):
    from grpc_tools import protoc

    out = tmp_path / "gen"
    out.mkdir()
    include = pathlib.Path(importlib.util.find_spec("grpc_tools").origin).parent / "_proto"
    code = protoc.main(["protoc", f"-I{_ROOT / 'protos'}", f"-I{include}",
                        f"--python_out={out}", str(_ROOT / "protos/optimization_parameters.proto")])
    assert code == 0
    source = (out / "optimization_parameters_pb2.py").read_text()
    return source


def test_checked_in_module_is_not_stale(tmp_path):
    # Compare descriptors, not text: protoc versions format the module differently.
    source = _generated_descriptor(tmp_path)
    start = source.index("AddSerializedFile(") + len("AddSerializedFile(")
    serialized = eval(source[start : source.index(")\n", start)])
    fresh = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    checked_in = descriptor_pb2.FileDescriptorProto()
    optimization_parameters_pb2.DESCRIPTOR.CopyToProto(checked_in)
    assert fresh == checked_in, "run `make proto` to regenerate optimization_parameters_pb2.py"


def test_field_numbers_match_tf():
    def numbers(descriptor):
        return {f.name: (f.number, f.type) for f in descriptor.fields}

    ours, theirs = optimization_parameters_pb2, tf_pb2
    for name in ("OptimizationParameters", "AdamParameters", "ClippingLimits", "LearningRate",
                 "DynamicLearningRate", "HotIdReplicationConfiguration"):
        mine = numbers(getattr(ours, name).DESCRIPTOR)
        assert mine.items() <= numbers(getattr(theirs, name).DESCRIPTOR).items(), name
    for name in ("GradientAccumulationStatus", "HotIdReplicationConfiguration",
                 "LowDimensionalPackingStatus"):
        mine = getattr(ours, name).Status.items()
        assert mine == getattr(theirs, name).Status.items(), name


def test_layout_hint_names_are_the_proto_enums():
    # AdamParameters' Literal types are the enums' names without UNSPECIFIED (None).
    from tpu_embed_adam import params as params_module

    for literal, enum in ((params_module.HotIdReplicationStatus,
                           tf_pb2.HotIdReplicationConfiguration.Status),
                          (params_module.LowDimensionalPackingStatus,
                           tf_pb2.LowDimensionalPackingStatus.Status)):
        assert list(typing.get_args(literal)) == [n for n in enum.keys() if n != "UNSPECIFIED"]


def test_to_tpu_embedding_v2_fills_the_same_proto():
    params = AdamParameters(0.2, beta1=0.5, clip_weight_max=3.0, clip_gradient_min=-1.0,
                            clip_gradient_max=2.0, weight_decay_factor=0.1,
                            multiply_weight_decay_factor_by_learning_rate=True,
                            lazy_adam=False, sum_inside_sqrt=False)
    optimizer = params.to_tpu_embedding_v2()
    assert isinstance(optimizer, tf.tpu.experimental.embedding.Adam)
    filled = tf_pb2.OptimizationParameters()
    optimizer._set_optimization_parameters(filled)
    filled.learning_rate.constant = optimizer.learning_rate  # TF2 sets it elsewhere.
    assert filled == params.to_tf_proto()
    assert AdamParameters.from_tpu_embedding_v2(optimizer) == params


def test_from_tpu_embedding_v2_names_and_errors():
    optimizer = tf.tpu.experimental.embedding.Adam(0.01, beta_1=0.7, clipvalue=2.0)
    params = AdamParameters.from_tpu_embedding_v2(optimizer)
    assert (params.beta1, params.epsilon) == (0.7, 1e-07)
    assert (params.clip_gradient_min, params.clip_gradient_max) == (-2.0, 2.0)
    with pytest.raises(TypeError, match="callable learning rate"):
        AdamParameters.from_tpu_embedding_v2(tf.tpu.experimental.embedding.Adam(lambda: 0.1))
    with pytest.raises(TypeError, match="`optimizer`"):
        AdamParameters.from_tpu_embedding_v2(tf.tpu.experimental.embedding.SGD(0.1))
    with pytest.raises(ValueError, match="dynamic learning rate"):
        AdamParameters(DynamicLearningRate(1)).to_tpu_embedding_v2()


def test_tpu_embedding_v2_conversions_drop_nothing():
    # TF2's Adam has a bool for low-dimensional packing and no hot-ID replication.
    for hints in (dict(hot_id_replication_status="ENABLED"),
                  dict(low_dimensional_packing_status="DISABLED")):
        (name,) = hints
        with pytest.raises(ValueError, match=rf"`params` has {name}=.*replace\({name}=None\)"):
            AdamParameters(0.1, **hints).to_tpu_embedding_v2()
    with pytest.raises(ValueError, match="`optimizer` has a slot_variable_creation_fn"):
        AdamParameters.from_tpu_embedding_v2(tf.tpu.experimental.embedding.Adam(
            0.1, slot_variable_creation_fn=lambda table, names, initializers: {}))
    with pytest.raises(TypeError, match="bool low_dimensional_packing_status; received: 2"):
        AdamParameters.from_tpu_embedding_v2(tf.tpu.experimental.embedding.Adam(
            0.1, low_dimensional_packing_status=2))


def test_generated_module_imports_in_a_fresh_interpreter():
    # The checked-in module must load under the installed protobuf (< 5).
    code = "import tpu_embed_adam.optimization_parameters_pb2 as m; print(m.DESCRIPTOR.package)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=_ROOT, check=True)
    assert out.stdout.strip() == "tpu_embed_adam"
