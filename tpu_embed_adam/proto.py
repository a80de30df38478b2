"""Conversions between `AdamParameters` and its wire and TF2 forms.

One writer (`to_proto`) and one reader (`from_proto`) serve both our
`tpu_embed_adam.OptimizationParameters` and TF's
`tensorflow.tpu.OptimizationParameters`: the two share field names and
numbers, so the same code fills either, and the bytes are interchangeable.
The fields are filled exactly as TF 2.15's `TPUEmbedding._create_config_proto`
and `_AdamHandler` fill them. This module does not import `params`: it reads
parameters by attribute and builds the class it is given (`params` imports it).

The reader drops nothing silently. Every field of TF's message is read into
the parameters (the two TPU layout hints included), or is refused with a
`ValueError` naming it: another optimizer, simulated quantization that is
enabled, enum values and fields that TF 2.15 does not know. What it
normalises has no effect: an empty `clipping_limits`, a disabled
`simulated_quantization`, a gradient accumulation status of UNSPECIFIED
(which means ENABLED).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import text_format, unknown_fields

from tpu_embed_adam import optimization_parameters_pb2 as _pb2
from tpu_embed_adam.learning_rates import DynamicLearningRate

__all__ = [
    "from_proto",
    "from_tpu_embedding_v2",
    "our_message_class",
    "tf_message_class",
    "to_proto",
    "to_tpu_embedding_v2",
]

_ENABLED = _pb2.GradientAccumulationStatus.ENABLED
_DISABLED = _pb2.GradientAccumulationStatus.DISABLED


def our_message_class() -> type:
    """Returns `tpu_embed_adam.OptimizationParameters`."""
    return _pb2.OptimizationParameters


def tf_message_class() -> type:
    """Returns TF's `tensorflow.tpu.OptimizationParameters`."""
    from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as tf_pb2

    return tf_pb2.OptimizationParameters


def to_proto(params: Any, message_class: type | None = None) -> Any:
    """Fills an `OptimizationParameters` message from `params`.

    Args:
      params: the parameters.
      message_class: ours (default) or TF's message class.

    Returns:
      A new message of `message_class`.
    """
    msg = (message_class or our_message_class())()
    if isinstance(params.learning_rate, DynamicLearningRate):
        msg.learning_rate.dynamic.tag = params.learning_rate.tag
    else:
        msg.learning_rate.constant = params.learning_rate
    msg.gradient_accumulation_status = (
        _ENABLED if params.use_gradient_accumulation else _DISABLED
    )
    for limits, kind in (("gradient_clipping_limits", "gradient"), ("clipping_limits", "weight")):
        for bound, suffix in (("lower", "min"), ("upper", "max")):
            value = getattr(params, f"clip_{kind}_{suffix}")
            if value is not None:
                getattr(getattr(msg, limits), bound).value = value
    if params.weight_decay_factor:
        msg.weight_decay_factor = params.weight_decay_factor
        if params.multiply_weight_decay_factor_by_learning_rate:
            msg.multiply_weight_decay_factor_by_learning_rate = True
    msg.adam.beta1 = params.beta1
    msg.adam.beta2 = params.beta2
    msg.adam.epsilon = params.epsilon
    msg.adam.use_non_lazy_adam = not params.lazy_adam
    msg.adam.use_sum_inside_sqrt = params.sum_inside_sqrt
    if params.hot_id_replication_status is not None:
        hot_id = msg.hot_id_replication_configuration
        hot_id.status = _enum_number(hot_id, "status", params.hot_id_replication_status)
    if params.low_dimensional_packing_status is not None:
        msg.low_dimensional_packing_status = _enum_number(
            msg, "low_dimensional_packing_status", params.low_dimensional_packing_status
        )
    return msg


def _enum_number(owner: Any, field: str, name: str) -> int:
    return int(owner.DESCRIPTOR.fields_by_name[field].enum_type.values_by_name[name].number)


def _enum_name(owner: Any, field: str, where: str) -> str | None:
    """The name of an enum field's value; None for UNSPECIFIED (0).

    Raises:
      ValueError: a number the enum does not name (proto3 keeps it as is).
    """
    number = getattr(owner, field)
    value = owner.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number.get(number)
    if value is None:
        raise ValueError(f"Argument `message` has an unknown {where} {number}.")
    return None if number == 0 else str(value.name)


def _parsed(message: Any, message_class: Any) -> Any:
    if isinstance(message, bytes | bytearray | memoryview):
        parsed = message_class()
        try:
            parsed.ParseFromString(bytes(message))
        except _message.DecodeError as e:
            raise ValueError(
                f"Argument `message`: bytes do not parse as "
                f"{message_class.DESCRIPTOR.full_name}: {e}"
            ) from e
        return parsed
    if not isinstance(message, message_class):
        raise TypeError(
            f"Argument `message` must be a {message_class.DESCRIPTOR.full_name} or its "
            f"bytes; received: {type(message).__name__}."
        )
    return message


def _decimal(value: float) -> float:
    # The shortest decimal that rounds to the same float32 (0.1, not
    # 0.10000000149011612): what the user wrote, and the same bytes on re-encode.
    return float(str(np.float32(value)))


def _bound(limits: Any, bound: str) -> float | None:
    return _decimal(getattr(limits, bound).value) if limits.HasField(bound) else None


def from_proto(cls: type, message: Any, message_class: type) -> Any:
    """Reads `AdamParameters` back from an `OptimizationParameters` message.

    Args:
      cls: the class to build (`AdamParameters` or a subclass).
      message: a message of `message_class`, or its serialized bytes.
      message_class: ours or TF's message class.

    Returns:
      A new, validated `cls`.

    Raises:
      TypeError: `message` is of another type.
      ValueError: corrupt bytes, an empty message, another optimizer, no
        learning rate, enabled simulated quantization, fields or enum values
        that TF's message does not know, or values that fail
        `AdamParameters`' validation.
    """
    msg = _parsed(message, message_class)
    if message_class is not tf_message_class():
        # Read TF's message from the same bytes. Ours knows only Adam: another
        # optimizer's field, or simulated quantization, is an unknown field
        # here, and TF reads the last oneof member on the wire; so no bytes
        # read as Adam here and as something else there. A message is judged
        # by its own bytes, which put unknown fields last.
        wire = message if isinstance(message, bytes | bytearray | memoryview) else None
        msg = _parsed(wire if wire is not None else msg.SerializeToString(), tf_message_class())
    if not msg.ByteSize():
        # Said as such: "configures the None optimizer" does not say why.
        raise ValueError(
            "Argument `message` is empty (no field is set): it configures no optimizer and no "
            "learning rate."
        )
    optimizer = msg.WhichOneof("parameters")
    if optimizer != "adam":
        unknown = " (or one this message type does not know)" if optimizer is None else ""
        raise ValueError(
            f"Argument `message` configures the {optimizer!r} optimizer{unknown}, not 'adam'."
        )
    unknown_paths = _unknown_fields(msg)
    if unknown_paths:
        raise ValueError(
            f"Argument `message` has fields that {msg.DESCRIPTOR.full_name} does not know "
            f"(field numbers, by path): {', '.join(unknown_paths)}; refused rather than "
            "dropped, since they may change the update (a message from a newer TF?)."
        )
    if msg.simulated_quantization.enabled:
        # It quantizes the looked-up activations on a TPU; neither the engine
        # nor apply_adam does, so training with it would not match a TPU's.
        raise ValueError(
            "Argument `simulated_quantization` is not supported: the engine and "
            "apply_adam do not quantize activations; remove it or set enabled: false; "
            "received: "
            f"{text_format.MessageToString(msg.simulated_quantization, as_one_line=True)}."
        )
    kind = msg.learning_rate.WhichOneof("learning_rate")
    if kind is None:
        raise ValueError("Argument `message` has no learning_rate (constant or dynamic).")
    learning_rate: Any = (
        _decimal(msg.learning_rate.constant)
        if kind == "constant"
        else DynamicLearningRate(msg.learning_rate.dynamic.tag)
    )
    status = msg.gradient_accumulation_status
    if status not in (0, _ENABLED, _DISABLED):
        raise ValueError(
            f"Argument `message` has an unknown gradient_accumulation_status {status}."
        )
    wd = _decimal(msg.weight_decay_factor) if msg.weight_decay_factor else None
    multiply = msg.multiply_weight_decay_factor_by_learning_rate or None
    return cls(
        learning_rate=learning_rate,
        beta1=_decimal(msg.adam.beta1),
        beta2=_decimal(msg.adam.beta2),
        epsilon=_decimal(msg.adam.epsilon),
        lazy_adam=not msg.adam.use_non_lazy_adam,
        sum_inside_sqrt=msg.adam.use_sum_inside_sqrt,
        use_gradient_accumulation=status != _DISABLED,
        clip_weight_min=_bound(msg.clipping_limits, "lower"),
        clip_weight_max=_bound(msg.clipping_limits, "upper"),
        weight_decay_factor=wd,
        multiply_weight_decay_factor_by_learning_rate=multiply,
        clip_gradient_min=_bound(msg.gradient_clipping_limits, "lower"),
        clip_gradient_max=_bound(msg.gradient_clipping_limits, "upper"),
        hot_id_replication_status=_enum_name(
            msg.hot_id_replication_configuration, "status",
            "hot_id_replication_configuration.status",
        ),
        low_dimensional_packing_status=_enum_name(
            msg, "low_dimensional_packing_status", "low_dimensional_packing_status"
        ),
    )


def _unknown_fields(msg: Any, path: str = "") -> list[str]:
    """Where `msg` and its set submessages hold fields their types do not know.

    Returns:
      `path.number` of each, e.g. `adam.99` (the message has no repeated fields).
    """
    found = [f"{path}{field.field_number}" for field in unknown_fields.UnknownFieldSet(msg)]
    for field, value in msg.ListFields():
        if field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            found += _unknown_fields(value, f"{path}{field.name}.")
    return sorted(set(found))


def to_tpu_embedding_v2(params: Any) -> Any:
    """Returns the equivalent `tf.tpu.experimental.embedding.Adam`.

    Args:
      params: the parameters; a `DynamicLearningRate` has no TF2 equivalent
        without the callable behind it, nor has a hot-ID replication status
        or a DISABLED low-dimensional packing status (TF2 takes a bool: True
        is ENABLED, False is UNSPECIFIED).

    Returns:
      A TF2 `Adam` whose `_set_optimization_parameters` fills the same fields.

    Raises:
      ValueError: `params` has something TF2's Adam cannot hold.
    """
    import tensorflow as tf

    if isinstance(params.learning_rate, DynamicLearningRate):
        raise ValueError(
            "Argument `params` has a dynamic learning rate (tag "
            f"{params.learning_rate.tag}); TF2's Adam needs the callable itself: "
            "use params.replace(learning_rate=...) first."
        )
    for name, representable in (
        ("hot_id_replication_status", (None,)),
        ("low_dimensional_packing_status", (None, "ENABLED")),
    ):
        if getattr(params, name) not in representable:
            raise ValueError(
                f"Argument `params` has {name}={getattr(params, name)!r}, which TF2's "
                f"Adam cannot hold; use params.replace({name}=None) first."
            )
    clipvalue = None
    if params.clip_gradient_min is not None or params.clip_gradient_max is not None:
        clipvalue = (params.clip_gradient_min, params.clip_gradient_max)
    return tf.tpu.experimental.embedding.Adam(
        learning_rate=params.learning_rate,
        beta_1=params.beta1,
        beta_2=params.beta2,
        epsilon=params.epsilon,
        lazy_adam=params.lazy_adam,
        sum_inside_sqrt=params.sum_inside_sqrt,
        use_gradient_accumulation=params.use_gradient_accumulation,
        clip_weight_min=params.clip_weight_min,
        clip_weight_max=params.clip_weight_max,
        weight_decay_factor=params.weight_decay_factor,
        multiply_weight_decay_factor_by_learning_rate=(
            params.multiply_weight_decay_factor_by_learning_rate
        ),
        clipvalue=clipvalue,
        low_dimensional_packing_status=params.low_dimensional_packing_status == "ENABLED",
    )


def from_tpu_embedding_v2(cls: type, optimizer: Any) -> Any:
    """Builds `cls` from a TF2 `tf.tpu.experimental.embedding.Adam`.

    Args:
      cls: the class to build.
      optimizer: the TF2 optimizer.

    Returns:
      A new, validated `cls`.

    Raises:
      TypeError: `optimizer` is not a TF2 `Adam`, its learning rate is a
        callable, or its `low_dimensional_packing_status` is not a bool.
      ValueError: a `slot_variable_creation_fn` (parameters cannot carry
        it), or values that fail validation.
    """
    import tensorflow as tf

    if not isinstance(optimizer, tf.tpu.experimental.embedding.Adam):
        raise TypeError(
            "Argument `optimizer` must be a tf.tpu.experimental.embedding.Adam; "
            f"received: {type(optimizer).__name__}."
        )
    if callable(optimizer.learning_rate):
        raise TypeError(
            "Argument `optimizer` has a callable learning rate, whose value is only "
            "known at run time; give it a float, or build AdamParameters with a "
            "DynamicLearningRate."
        )
    if optimizer.slot_variable_creation_fn is not None:
        raise ValueError(
            "Argument `optimizer` has a slot_variable_creation_fn, which AdamParameters "
            "cannot carry (TF's v1 TPUEmbedding starts the slots at 0); received: "
            f"{optimizer.slot_variable_creation_fn!r}."
        )
    packing = optimizer.low_dimensional_packing_status
    if not isinstance(packing, bool):
        raise TypeError(
            "Argument `optimizer` must have a bool low_dimensional_packing_status; "
            f"received: {packing!r} ({type(packing).__name__})."
        )
    return cls(
        learning_rate=optimizer.learning_rate,
        beta1=optimizer.beta_1,
        beta2=optimizer.beta_2,
        epsilon=optimizer.epsilon,
        lazy_adam=optimizer.lazy_adam,
        sum_inside_sqrt=optimizer.sum_inside_sqrt,
        use_gradient_accumulation=optimizer.use_gradient_accumulation,
        clip_weight_min=optimizer.clip_weight_min,
        clip_weight_max=optimizer.clip_weight_max,
        weight_decay_factor=optimizer.weight_decay_factor,
        multiply_weight_decay_factor_by_learning_rate=(
            optimizer.multiply_weight_decay_factor_by_learning_rate
        ),
        clip_gradient_min=optimizer.clip_gradient_min,
        clip_gradient_max=optimizer.clip_gradient_max,
        # TF2 writes True as ENABLED and False as UNSPECIFIED.
        low_dimensional_packing_status="ENABLED" if packing else None,
    )
