"""Fuzz targets and their property, shared by `tools/fuzz.py` and `tests/test_fuzz.py`.

The property, for every target: each input either succeeds (and the result
is sound: it round-trips, or equals the reference update) or raises one of
the documented error types, and a rejected call changes no state (the
caller's input, the table and slots, the engine). Anything else is a defect:
another exception type (OverflowError, RecursionError, AttributeError,
KeyError, ...), a changed state after a rejection, or, for the engine, a
crashed process.

Each target has two ways in: `decode(data: bytes)` turns raw fuzzer bytes
into one input (for atheris, and for a plain random byte stream), and a
hypothesis strategy (`strategy(name)`) draws structured inputs. Both feed the
same `check(name, value)`.

Targets:
  from_proto, from_tf_proto: serialized `OptimizationParameters` bytes,
    mutated from valid ones (byte edits and field-level edits of TF's message).
  from_json: JSON text (bytes or str) mutated from `to_json()` output.
  from_dict: `to_dict()` output with keys dropped, added or given hostile values.
  apply_adam: `tpu_embed_adam.apply_adam` with random ids, gradients, shapes,
    dtypes, aliasing, learning rates and implementations.
  engine_config: serialized `TPUEmbeddingConfiguration` bytes mutated from
    valid ones, fed to `ConfigureTPUEmbedding` (`tf.raw_ops`) in a child
    process (`EngineWorker`), so that a crash is detected and reported with
    its input instead of killing the runner.
"""

from __future__ import annotations

import collections
import copy
import io
import itertools
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np

FIELDS = (
    "learning_rate", "use_gradient_accumulation", "clip_weight_min", "clip_weight_max",
    "weight_decay_factor", "multiply_weight_decay_factor_by_learning_rate", "beta1", "beta2",
    "epsilon", "lazy_adam", "sum_inside_sqrt", "clip_gradient_min", "clip_gradient_max",
    "hot_id_replication_status", "low_dimensional_packing_status",
)
_HINT_NAMES = ("ENABLED", "DISABLED", "MIGRATION_ONLY")
PARAM_TARGETS = ("from_proto", "from_tf_proto", "from_json", "from_dict")
TARGETS = (*PARAM_TARGETS, "apply_adam", "engine_config")

# What `AdamParameters.from_*` may raise (docs: TypeError/ValueError; JSON and
# decode errors are ValueError subclasses).
PARAM_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError)
# Engine op errors a bad configuration may produce.
ENGINE_ERRORS = ("InvalidArgumentError", "ResourceExhaustedError", "UnimplementedError",
                 "FailedPreconditionError", "OutOfRangeError")


class PropertyViolation(AssertionError):
    """An input broke the property; the message names the input and what happened."""


# --------------------------------------------------------------------------------------
# Hostile values.

INTERESTING_FLOATS = (
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-3, 1e-19, 1.1e-19, 1.2e-38, 1e-38, 1e-45, 5e-324,
    3.4028234663852886e38, 3.4028235677973366e38, 3.5e38, 1e308, 1.7976931348623157e308,
    math.inf, -math.inf, math.nan, 0.9999999, 1.0000001, 2.0**-126, 2.0**-149,
)
INTERESTING_INTS = (0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31), 2**63, 2**64, 10**400, -(10**400))


class _Opaque:
    """An object that is neither a number nor a string."""

    def __repr__(self) -> str:
        return "_Opaque()"


def hostile_values() -> list[Any]:
    """Values of every kind a config or argument might wrongly hold."""
    return [
        *INTERESTING_FLOATS, *INTERESTING_INTS, True, False, None, "", "0.1", "nan", b"0.1",
        *_HINT_NAMES, "UNSPECIFIED", "enabled",
        [], [0.1], {}, {"dynamic_tag": 1}, {"dynamic_tag": -1}, {"dynamic_tag": 2**31},
        {"dynamic_tag": 1.5}, {"dynamic_tag": True}, {"dynamic_tag": None},
        {"dynamic_tag": 1, "x": 2}, {"dynamic_tag": 10**400},
        np.float32(0.1), np.float64(np.nan), np.float16(1e-5), np.int64(3), np.bool_(True),
        np.array(0.1), np.array([0.1]), Decimal("1e-5"), Decimal("NaN"), Decimal("1e999"),
        Fraction(1, 3), complex(0.1, 0), _Opaque(), float, "learning_rate",
    ]


_HOSTILE = hostile_values()
_JUNK_KEYS = ("", "learning_rate ", "lr", "LEARNING_RATE", "adam", "dynamic_tag", 1, None)


# --------------------------------------------------------------------------------------
# Valid starting points.


def random_valid_dict(rng: random.Random) -> dict[str, Any]:
    """A `to_dict()`-shaped config; usually valid, sometimes not (both are fine)."""
    out: dict[str, Any] = {
        "learning_rate": (
            {"dynamic_tag": rng.randrange(0, 8)} if rng.random() < 0.2
            else rng.choice((0.001, 0.05, 0.1, 1.0, rng.uniform(1e-6, 2.0)))
        ),
        "beta1": rng.choice((0.0, 0.9, rng.random() * 0.999)),
        "beta2": rng.choice((0.0, 0.999, rng.random() * 0.999)),
        "epsilon": rng.choice((1e-8, 1e-19, 1.1e-19, 1e-3, rng.uniform(1e-10, 1.0))),
        "lazy_adam": rng.random() < 0.7,
        "sum_inside_sqrt": rng.random() < 0.7,
        "use_gradient_accumulation": rng.random() < 0.8,
    }
    for kind in ("weight", "gradient"):
        if rng.random() < 0.3:
            lo = rng.uniform(-5, 0)
            out[f"clip_{kind}_min"] = lo
            out[f"clip_{kind}_max"] = lo + rng.uniform(0, 10)
        elif rng.random() < 0.2:
            out[f"clip_{kind}_{rng.choice(('min', 'max'))}"] = rng.uniform(-5, 5)
    if rng.random() < 0.3:
        out["weight_decay_factor"] = rng.choice((0.0, 1e-4, rng.random()))
        if rng.random() < 0.5:
            out["multiply_weight_decay_factor_by_learning_rate"] = rng.random() < 0.5
    for name in ("hot_id_replication_status", "low_dimensional_packing_status"):
        if rng.random() < 0.1:
            out[name] = rng.choice(_HINT_NAMES)  # MIGRATION_ONLY: hot IDs only
    if not out["lazy_adam"] or "clip_gradient_min" in out or "clip_gradient_max" in out:
        out["use_gradient_accumulation"] = True
    return out


def valid_params(rng: random.Random) -> Any:
    from tpu_embed_adam import AdamParameters

    for _ in range(20):
        try:
            return AdamParameters.from_dict(random_valid_dict(rng))
        except PARAM_ERRORS:
            continue
    return AdamParameters(0.1)


def _other_optimizer_bytes(rng: random.Random) -> bytes:
    """TF's `OptimizationParameters` of another optimizer (or none), as bytes."""
    from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as tf_pb

    msg = tf_pb.OptimizationParameters()
    msg.learning_rate.constant = 0.1
    which = rng.choice(("adagrad", "stochastic_gradient_descent", "ftrl", "rms_prop", "none"))
    if which != "none":
        getattr(msg, which).SetInParent()
    return msg.SerializeToString()


_SEED_PROTOS: list[bytes] = []


def seed_proto(rng: random.Random) -> bytes:
    """One of 128 valid serialized messages (10%: another optimizer's), built once."""
    if not _SEED_PROTOS:
        srng = random.Random(1234)
        _SEED_PROTOS.extend(
            _other_optimizer_bytes(srng) if i % 10 == 0
            else valid_params(srng).to_tf_proto().SerializeToString()
            for i in range(128)
        )
    return rng.choice(_SEED_PROTOS)


# --------------------------------------------------------------------------------------
# Mutators (deterministic given `rng`).


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mutate_bytes(data: bytes, rng: random.Random, max_size: int = 4096) -> bytes:
    """Byte-level edits that keep some protobuf structure: flips, splices, tags."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an interesting value
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:  # delete a range
            end = min(len(buf), pos + rng.randint(1, 8))
            del buf[pos:end]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5:  # insert a field: random number and wire type, plausible payload
            field, wire = rng.randint(1, 40), rng.choice((0, 1, 2, 5, 3, 4, 6, 7))
            payload = {0: _varint(rng.choice((0, 1, 2**63, 2**64 - 1, rng.randrange(2**32)))),
                       1: struct.pack("<d", rng.choice(INTERESTING_FLOATS)),
                       5: struct.pack("<f", rng.choice((0.0, 1e-30, math.inf, math.nan, 1.0))),
                       2: _varint(rng.randint(0, 12)) + bytes(rng.randrange(256)
                                                            for _ in range(rng.randint(0, 12)))}
            buf[pos:pos] = _varint((field << 3) | wire) + payload.get(wire, b"")
        elif op == 6 and buf:  # duplicate a chunk (repeated / last-one-wins fields)
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 16)]
            buf[pos:pos] = chunk
        elif op == 7:  # deep nesting of length-delimited fields
            depth = rng.choice((1, 2, 3, 8, 100))
            inner = b""
            for _ in range(depth):
                inner = _varint((rng.randint(1, 30) << 3) | 2) + _varint(len(inner)) + inner
            buf[pos:pos] = inner
    return bytes(buf[:max_size])


def _random_scalar(field: Any, rng: random.Random) -> Any:
    from google.protobuf.descriptor import FieldDescriptor as F

    t = field.type
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice(INTERESTING_FLOATS + (rng.uniform(-10, 10),))
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return rng.choice((0, 1, -1, 2**31 - 1, -(2**31), rng.randint(-100, 5000)))
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice((0, 1, 2**32 - 1, rng.randint(0, 5000)))
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice((0, 1, -1, 2**63 - 1, -(2**63), 2**31, rng.randint(-100, 100000)))
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice((0, 1, 2**64 - 1, 2**32, rng.randint(0, 100000)))
    if t == F.TYPE_STRING:
        return rng.choice(("", "a", "users", "x" * 300, "\u00e9", "t\x00"))
    if t == F.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
    return None


def mutate_message(msg: Any, rng: random.Random, depth: int = 0) -> None:
    """Sets, clears, adds or removes one random field somewhere in `msg`, in place."""
    from google.protobuf.descriptor import FieldDescriptor as F

    fields = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    field = rng.choice(fields)
    repeated = field.label == F.LABEL_REPEATED
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return
        if repeated:
            items = getattr(msg, field.name)
            r = rng.random()
            if r < 0.3 or not len(items):
                sub = items.add()
                if len(items) > 1 and rng.random() < 0.5:
                    sub.CopyFrom(items[rng.randrange(len(items) - 1)])
                mutate_message(sub, rng, depth + 1)
            elif r < 0.45:
                del items[rng.randrange(len(items))]
            else:
                mutate_message(items[rng.randrange(len(items))], rng, depth + 1)
        elif rng.random() < 0.15:
            msg.ClearField(field.name)
        elif depth < 6:
            mutate_message(getattr(msg, field.name), rng, depth + 1)
        else:
            getattr(msg, field.name).SetInParent()
        return
    value = _random_scalar(field, rng)
    if value is None:
        return
    if repeated:
        items = getattr(msg, field.name)
        if len(items) and rng.random() < 0.3:
            del items[rng.randrange(len(items))]
        elif len(items) and rng.random() < 0.5:
            items[rng.randrange(len(items))] = value
        else:
            items.append(value)
    elif rng.random() < 0.1:
        msg.ClearField(field.name)
    else:
        setattr(msg, field.name, value)


def structured_mutation(data: bytes, message_class: Any, rng: random.Random) -> bytes:
    """Parses `data` as `message_class`, edits 1-3 fields, serializes; else byte edits."""
    msg = message_class()
    try:
        msg.ParseFromString(data)
    except Exception:  # noqa: BLE001 - any parse failure: fall back to byte edits
        return mutate_bytes(data, rng)
    for _ in range(rng.randint(1, 3)):
        mutate_message(msg, rng)
    out = msg.SerializeToString()
    if rng.random() < 0.2:
        out = mutate_bytes(out, rng)
    return out


def tf_optimization_parameters_class() -> Any:
    from tensorflow.core.protobuf.tpu import optimization_parameters_pb2 as tf_pb

    return tf_pb.OptimizationParameters


def tf_embedding_configuration_class() -> Any:
    from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2 as tf_pb

    return tf_pb.TPUEmbeddingConfiguration


def proto_input(rng: random.Random) -> bytes:
    """A mutated (or, 10% of the time, untouched) serialized OptimizationParameters."""
    data = seed_proto(rng)
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
        if rng.random() < 0.6:
            data = structured_mutation(data, tf_optimization_parameters_class(), rng)
        else:
            data = mutate_bytes(data, rng)
    return data


def json_input(rng: random.Random) -> str | bytes:
    """JSON text from `to_json()`, edited as a value tree or as text."""
    import json

    config: Any = random_valid_dict(rng)
    r = rng.random()
    if r < 0.4:
        config = dict_input(rng, config)
        try:
            text = json.dumps(config, default=repr)
        except (ValueError, TypeError):
            text = repr(config)
    else:
        text = json.dumps(config)
    r = rng.random()
    if r < 0.15:  # deep nesting
        depth = rng.choice((10, 1000, 20_000))
        if rng.random() < 0.5:
            text = "[" * depth + "]" * depth
        else:
            text = '{"a":' * depth + "1" + "}" * depth
    elif r < 0.25:  # very long numbers
        key = rng.choice(FIELDS)
        digits = rng.choice((20, 400, 5000, 20_000))
        num = rng.choice(("1" * digits, "0." + "0" * digits + "1", "1e" + "9" * min(digits, 50),
                          "-1" + "0" * digits))
        text = text[:-1] + f', "{key}": {num}' + "}" if text.endswith("}") else num
    elif r < 0.35:
        text = text.replace(rng.choice(("0.", "true", "false", ":", ",", '"')),
                            rng.choice(("NaN", "Infinity", "-Infinity", "1e400", "", "null",
                                        "\ud800", '"\\ud800"', "{}", "[]")), rng.randint(1, 3))
    elif r < 0.45:
        raw = mutate_bytes(text.encode("utf-8", "surrogatepass"), rng, 1 << 16)
        return raw if rng.random() < 0.5 else raw.decode("latin-1")
    if rng.random() < 0.3:
        return text.encode("utf-8", "surrogatepass") if rng.random() < 0.7 else text.encode(
            rng.choice(("utf-16", "utf-32", "latin-1")), "replace")
    return text


def dict_input(rng: random.Random, base: dict[str, Any] | None = None) -> Any:
    """A `to_dict()` config with some keys dropped, added or set to hostile values."""
    config: dict[Any, Any] = dict(base if base is not None else random_valid_dict(rng))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        r = rng.random()
        if r < 0.6:
            config[rng.choice(FIELDS)] = copy.copy(rng.choice(_HOSTILE))
        elif r < 0.75 and config:
            del config[rng.choice(list(config))]
        elif r < 0.85:
            config[rng.choice(_JUNK_KEYS)] = rng.choice(_HOSTILE)
        else:
            config[rng.choice(FIELDS)] = rng.choice(INTERESTING_FLOATS) * rng.choice(
                (1, -1, 1e-30, 1e30))
    if rng.random() < 0.03:
        return rng.choice((None, [], "{}", [("learning_rate", 0.1)], 0.1))
    return config


# --------------------------------------------------------------------------------------
# Properties of the AdamParameters readers.


def _check_params_result(p: Any, from_proto: bool) -> None:
    """An accepted value round-trips.

    JSON and dict forms are exact. The proto holds float32: its round trip
    gives the float32 rounding of `p` (`p` itself when `p` came from a
    proto), stable from then on, and ours and TF's bytes are identical.
    """
    from tpu_embed_adam import AdamParameters

    if not isinstance(p, AdamParameters):
        raise PropertyViolation(f"returned {type(p).__name__}, not AdamParameters")

    def back(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            raise PropertyViolation(f"accepted {p!r}, but {name} raises {e!r}") from e

    for name, fn in (
        ("from_json(to_json())", lambda: AdamParameters.from_json(p.to_json())),
        ("from_dict(to_dict())", lambda: AdamParameters.from_dict(p.to_dict())),
    ):
        if (q := back(name, fn)) != p:
            raise PropertyViolation(f"{name} of {p!r} gives {q!r}")
    ours, theirs = p.to_proto().SerializeToString(), p.to_tf_proto().SerializeToString()
    if ours != theirs:
        raise PropertyViolation(f"{p!r}: to_proto() bytes {ours!r} != to_tf_proto() {theirs!r}")
    q = back("from_proto(to_proto())", lambda: AdamParameters.from_proto(ours))
    if from_proto and q != p:
        raise PropertyViolation(f"from_proto(to_proto()) of {p!r} gives {q!r}")
    r = back("from_tf_proto(to_tf_proto(...))", lambda: AdamParameters.from_tf_proto(
        q.to_tf_proto()))
    if r != q:
        raise PropertyViolation(f"proto round trip of {q!r} is not stable: {r!r}")


def _global_state() -> tuple[Any, ...]:
    import tensorflow as tf

    return (tf.compat.v1.tpu.experimental.AdamParameters,)


def _snapshot(value: Any) -> Any:
    """A comparable picture of `value` (reprs survive NaN, which != itself)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString()
    return repr(value)


def check_params(target: str, value: Any) -> str:
    """Runs one `AdamParameters.from_*` call; returns 'ok' or the error type's name."""
    from tpu_embed_adam import AdamParameters

    reader = getattr(AdamParameters, target)
    before, state = _snapshot(value), _global_state()
    try:
        p = reader(value)
    except PARAM_ERRORS as e:
        if _snapshot(value) != before:
            raise PropertyViolation(
                f"{target}({before!r}) raised {e!r} and changed its input") from e
        if _global_state() != state:
            raise PropertyViolation(
                f"{target}({before!r}) raised {e!r} and changed TF's class") from e
        return type(e).__name__
    except BaseException as e:  # noqa: BLE001 - the property is about exactly this
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PropertyViolation(
            f"{target}({_short(value)}) raised {type(e).__name__}: {_short(e)}"
        ) from e
    if _snapshot(value) != before:
        raise PropertyViolation(f"{target}({before!r}) changed its input")
    _check_params_result(p, from_proto=target in ("from_proto", "from_tf_proto"))
    return "ok"


def _short(x: Any, n: int = 300) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + f"... ({len(r)} chars)"


# --------------------------------------------------------------------------------------
# apply_adam.


def apply_input(rng: random.Random) -> dict[str, Any]:
    """One call of `apply_adam`, as plain data (built into tensors by `check_apply`).

    Each argument is valid most of the time and hostile now and then, so that
    about half the calls are accepted and the rest fail in one argument.
    """

    def pick(valid: Any, *bad: Any, p: float = 0.08) -> Any:
        return rng.choice(bad) if bad and rng.random() < p else valid

    rows = rng.choice((0, 1, 2, 3, 5, 8))
    dim = rng.choice((0, 1, 2, 3, 4))
    n = rng.choice((0, 1, 2, 3, 6))
    return {
        "rows": rows, "dim": dim, "n": n,
        "params": pick(random_valid_dict(rng), "tf", "none", "dict"),
        "seed": rng.randrange(2**31),
        "ids_dtype": pick(rng.choice(("int64", "int32")), "float32", "int8", "uint8", "string",
                          "list", "none"),
        "ids_values": pick(rng.choice(("in", "dup")), "neg", "big", "huge"),
        "ids_rank": pick(1, 0, 2),
        "grads_rows": pick(n, n + 1, max(n - 1, 0)),
        "grads_dim": pick(dim, dim + 1),
        "grads_rank": pick(2, 1, 3),
        "grads_dtype": pick("float32", "float64", "float16", "int32", "numpy", p=0.15),
        "grads_values": pick("normal", "zero", "nan", "inf", "huge", p=0.3),
        "indexed_slices": rng.random() < 0.15,
        "var_kind": pick("var", "float64", "tensor", "numpy", "alias", "rows_mismatch"),
        "lr": pick(None, 0.01, "tensor", 0.0, -1.0, math.nan, math.inf, "vector", "string",
                   10**400, p=0.3),
        "implementation": pick(rng.choice(("auto", "fused", "tf")), "bogus", p=0.03),
        "check_numerics": rng.random() < 0.3,
        "eager": rng.random() < 0.8,
    }


APPLY_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError)


def _build_apply_args(spec: dict[str, Any]) -> tuple[Any, ...]:
    import tensorflow as tf

    from tpu_embed_adam import AdamParameters

    nrng = np.random.default_rng(spec["seed"])
    rows, dim, n = spec["rows"], spec["dim"], spec["n"]
    w0 = nrng.normal(size=(rows, dim)).astype(np.float32)
    m0 = nrng.normal(size=(rows, dim)).astype(np.float32)
    v0 = np.abs(nrng.normal(size=(rows, dim))).astype(np.float32)
    var_kind = spec["var_kind"]
    var = tf.Variable(w0)
    m = tf.Variable(m0)
    v = tf.Variable(v0)
    if var_kind == "float64":
        m = tf.Variable(m0.astype(np.float64))
    elif var_kind == "tensor":
        v = tf.constant(v0)
    elif var_kind == "numpy":
        var = w0.copy()
    elif var_kind == "alias":
        m = var
    elif var_kind == "rows_mismatch":
        v = tf.Variable(np.zeros((rows + 1, dim), np.float32))
    # ids
    kind = spec["ids_values"]
    hi = max(rows, 1)
    ids = {
        "in": nrng.integers(0, hi, n), "dup": np.zeros(n, np.int64),
        "neg": nrng.integers(-3, hi, n), "big": nrng.integers(0, rows + 3, n),
        "huge": nrng.choice(np.array([0, 2**31 - 1, 2**40, -(2**40)], np.int64), n),
    }[kind]
    if spec["ids_rank"] == 0:
        ids = ids[:1].reshape(()) if n else np.int64(0)
    elif spec["ids_rank"] == 2:
        ids = ids.reshape(-1, 1)
    dtype = spec["ids_dtype"]
    if dtype == "string":
        ids = tf.constant(np.asarray(ids).astype(str))
    elif dtype == "list":
        ids = np.asarray(ids).tolist()
    elif dtype == "none":
        ids = None
    else:
        ids = tf.constant(np.asarray(ids).astype(dtype))
    gshape = [spec["grads_rows"], spec["grads_dim"]]
    if spec["grads_rank"] == 1:
        gshape = [spec["grads_rows"] * spec["grads_dim"]]
    elif spec["grads_rank"] == 3:
        gshape = [spec["grads_rows"], spec["grads_dim"], 1]
    g = {"normal": nrng.normal(size=gshape), "zero": np.zeros(gshape),
         "nan": np.full(gshape, np.nan), "inf": np.full(gshape, -np.inf),
         "huge": np.full(gshape, 3e38)}[spec["grads_values"]]
    gd = spec["grads_dtype"]
    grads: Any = g.astype(np.float32) if gd == "numpy" else tf.constant(g.astype(gd))
    if spec["indexed_slices"] and ids is not None and not isinstance(ids, list):
        grads = tf.IndexedSlices(grads, ids, dense_shape=tf.constant([rows, dim], tf.int64))
        ids = None
    p = spec["params"]
    if p == "tf":
        params: Any = tf.compat.v1.tpu.experimental.AdamParameters(0.05)
    elif p == "none":
        params = None
    elif p == "dict":
        params = {"learning_rate": 0.1}
    else:
        try:
            params = AdamParameters.from_dict(p)
        except PARAM_ERRORS:
            params = AdamParameters(0.1)
    lr = spec["lr"]
    if lr == "tensor":
        lr = tf.constant(0.02)
    elif lr == "vector":
        lr = tf.constant([0.02, 0.03])
    elif lr == "string":
        lr = "0.1"
    return var, m, v, ids, grads, params, lr, (w0, m0, v0)


def _read(x: Any) -> np.ndarray:
    return np.array(x.numpy() if hasattr(x, "numpy") else x, copy=True)


def check_apply(spec: dict[str, Any]) -> str:
    """Runs one `apply_adam`; returns 'ok' or the error type's name."""
    import tensorflow as tf

    from tpu_embed_adam import apply_adam, reference

    var, m, v, ids, grads, params, lr, (w0, m0, v0) = _build_apply_args(spec)
    variables = (var, m, v)
    before = [_read(x).tobytes() for x in variables]
    allowed = (*APPLY_ERRORS, tf.errors.InvalidArgumentError)
    kwargs = {"learning_rate": lr, "implementation": spec["implementation"],
              "check_numerics": spec["check_numerics"]}
    try:
        if spec["eager"]:
            apply_adam(var, m, v, ids, grads, params, **kwargs)
        else:
            @tf.function
            def step() -> None:
                apply_adam(var, m, v, ids, grads, params, **kwargs)

            step()
    except allowed as e:
        after = [_read(x).tobytes() for x in variables]
        if after != before:
            raise PropertyViolation(
                f"apply_adam({_short(spec)}) raised {type(e).__name__} and wrote state") from e
        return type(e).__name__
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PropertyViolation(
            f"apply_adam({_short(spec)}) raised {type(e).__name__}: {_short(e)}") from e
    # Accepted: it must equal the reference update, bit for bit.
    ids_np = np.asarray(grads.indices if isinstance(grads, tf.IndexedSlices) else ids)
    g_np = np.asarray(grads.values if isinstance(grads, tf.IndexedSlices) else grads)
    rate = None if lr is None else float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr))
    want = reference.adam_update(w0, m0, v0, ids_np.astype(np.int64), g_np.astype(np.float32),
                                 params, learning_rate=rate)
    for name, x, wnt in zip("wmv", variables, want, strict=True):
        got = _read(x)
        if not np.array_equal(got, wnt, equal_nan=True):
            raise PropertyViolation(
                f"apply_adam({_short(spec)}) accepted, but {name} differs from the reference: "
                f"{_short(got)} vs {_short(wnt)}")
    return "ok"


# --------------------------------------------------------------------------------------
# Engine configuration (ConfigureTPUEmbedding) in a child process.


def seed_engine_configs() -> list[bytes]:
    """Valid `TPUEmbeddingConfiguration`s that TF's v1 `TPUEmbedding` writes."""
    import tensorflow as tf
    from tensorflow.python.tpu import tpu_embedding as te

    out = []
    cases = [
        ({"t": te.TableConfig(8, 4)}, {"f": te.FeatureConfig("t")}, 1, 1, "div", None),
        ({"users": te.TableConfig(13, 4, combiner="sum"),
          "items": te.TableConfig(8, 3, combiner="mean")},
         {"user": te.FeatureConfig("users"), "item": te.FeatureConfig("items",
                                                                      max_sequence_length=3)},
         2, 2, "mod", None),
        ({"tiny": te.TableConfig(2, 2, combiner="sqrtn")}, {"a": te.FeatureConfig("tiny"),
                                                             "b": te.FeatureConfig("tiny")},
         3, 1, "div", te.AdamParameters(0.01, clip_gradient_max=1.0, weight_decay_factor=0.1)),
    ]
    for tables, features, hosts, cores, strategy, params in cases:
        with tf.Graph().as_default():
            emb = te.TPUEmbedding(
                tables, features, batch_size=4 * hosts * cores, mode=te.TRAINING,
                optimization_parameters=params or te.AdamParameters(0.05),
                partition_strategy=strategy,
                device_config=te.DeviceConfig(hosts, hosts * cores, "/job:worker"))
            out.append(emb.config_proto.SerializeToString())
    return out


def engine_input(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = rng.choice(seeds)
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3, 4))):
        if rng.random() < 0.75:
            data = structured_mutation(data, tf_embedding_configuration_class(), rng)
        else:
            data = mutate_bytes(data, rng)
    return data


# The most inputs the runner writes ahead of the child's answers. The child
# computes while the runner draws the next inputs; the answers of this many
# inputs (lines capped at _MAX_LINE) fit a pipe's buffer, so neither side
# blocks on a full pipe while the other waits for it.
PIPELINE_DEPTH = 16
_MAX_LINE = 2000
# The child clears TF's eager kernel cache after this many inputs.
_KERNEL_CACHE_INPUTS = 1000


def _engine_worker_main() -> None:  # pragma: no cover - runs in the child
    """Reads length-prefixed configs on stdin; answers one line each on stdout.

    Before each input the engine holds a valid seed configuration (installed
    by ConfigureTPUEmbedding; after an accepted input, the input's own seed
    afresh); after a rejection it must hold exactly that, as `info()` shows.
    Inputs are answered in order, each before the next is read, so the first
    unanswered input of a dead child is the one that killed it.
    """
    import resource

    limit = int(os.environ.get("FUZZ_ENGINE_MEMORY_LIMIT", str(8 << 30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from tensorflow.python import pywrap_tfe
    from tensorflow.python.eager import context

    # TF 2.15 runs every eager op as a one-op function: an attr value it has
    # not seen (every input here is a new `config`) costs a function
    # instantiation and its graph passes, about 1.5 ms, 15x the op. The
    # classic eager path only builds the kernel, whose construction (reading
    # the attr) and Compute are what the op runs in a graph too. Read once,
    # when the eager context starts: before the first op.
    set_op_as_function = pywrap_tfe.TFE_ContextOptionsSetRunEagerOpAsFunction
    pywrap_tfe.TFE_ContextOptionsSetRunEagerOpAsFunction = (
        lambda options, _enable: set_op_as_function(options, False))

    from tpu_embed_adam import engine
    from tpu_embed_adam.engine._state import library

    parse_library = library()
    seeds = seed_engine_configs()
    stdin, stdout = sys.stdin.buffer, sys.stdout

    def answer(line: str) -> None:
        stdout.write(line[:_MAX_LINE].replace("\n", " ") + "\n")
        stdout.flush()

    answer("ready")
    base_infos: dict[int, Any] = {}
    installed: int | None = None  # the seed the engine holds untouched, if any
    for served in itertools.count(1):
        header = stdin.read(8)
        if len(header) < 8:
            return
        if served % _KERNEL_CACHE_INPUTS == 0:
            # The kernel of each config seen stays cached (with its copy of
            # the config): without this the child grows with every input.
            context.context().clear_kernel_cache()
        base, size = struct.unpack("<II", header)
        data = stdin.read(size)
        base %= len(seeds)
        if installed is None:  # after an accepted input: reinstall a seed
            engine.reset()
            tf.raw_ops.ConfigureTPUEmbedding(config=seeds[base])
            info = engine.info()
            if base_infos.setdefault(base, info) != info:
                answer(f"BAD seed state differs: {info}")
                continue
            installed = base
        current, installed = installed, None
        before = base_infos[current]
        # The parser alone (no engine state) must give the verdict that
        # configuring gives.
        try:
            parse_library.tpu_embed_adam_parse_config(config=data)
            parsed = None
        except tf.errors.OpError as e:
            parsed = type(e).__name__
        try:
            tf.raw_ops.ConfigureTPUEmbedding(config=data)
        except tf.errors.OpError as e:
            name = type(e).__name__
            after = engine.info()
            if parsed != name:
                answer(f"BAD the parser says {parsed}, configuring {name}: {e.message[:200]!r}")
            elif name not in ENGINE_ERRORS:
                answer(f"BAD {name}: {str(e.message)[:300]!r}")
            elif after != before:
                answer(f"BAD rejected ({name}) but the engine changed: {before} -> {after}")
            else:
                installed = current  # a rejected input leaves the seed installed
                answer(f"rejected {name}")
            continue
        except Exception as e:  # noqa: BLE001
            answer(f"BAD {type(e).__name__}: {str(e)[:300]!r}")
            continue
        after = engine.info()
        if parsed is not None:
            answer(f"BAD the parser refuses ({parsed}) what configuring accepts")
            continue
        if not after.get("configured"):
            answer(f"BAD accepted but not configured: {after}")
            continue
        # Accepted: the engine answers its other ops sanely for it.
        try:
            tf.raw_ops.IsTPUEmbeddingInitialized()
        except Exception as e:  # noqa: BLE001
            answer(f"BAD accepted, then IsTPUEmbeddingInitialized raises {e!r}")
            continue
        answer("ok")


class EngineCrash(PropertyViolation):
    """The engine's child process died on an input."""


# The child that `EngineWorker` runs by default: `_engine_worker_main`.
ENGINE_CHILD = (sys.executable, "-c", "import fuzz_targets; fuzz_targets._engine_worker_main()")


class EngineWorker:
    """A child process running `ConfigureTPUEmbedding` on many inputs; restarts after a crash.

    One child serves every input (starting one costs a TensorFlow import,
    about a second); inputs are written ahead of the answers
    (`PIPELINE_DEPTH`), so the runner draws inputs while the child checks
    earlier ones. A child that dies is reported with the input it died on
    and the end of its stderr, and a fresh child takes the inputs that were
    still waiting.
    """

    def __init__(self, child: Sequence[str] = ENGINE_CHILD) -> None:
        """Prepares the worker; the child starts with the first input.

        Args:
          child: the child's command line: it prints "ready", then answers
            each length-prefixed input on stdin with one line
            (`_engine_worker_main`; tests give a child that crashes).
        """
        self.child = list(child)
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes = 0
        self._stderr_tail: collections.deque[bytes] = collections.deque(maxlen=16)
        self._drainer: threading.Thread | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.abspath(__file__)), *sys.path]))
        proc = subprocess.Popen(self.child, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if line.strip() != "ready":
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"engine worker did not start: {line!r} {err[-2000:]}")
        # Drain stderr in the background (protobuf logs every invalid UTF-8
        # string it parses), so that the child never blocks on it; its end
        # goes into a crash report.
        self._stderr_tail.clear()
        self._drainer = threading.Thread(
            target=_drain, args=(proc.stderr, self._stderr_tail), daemon=True)
        self._drainer.start()
        return proc

    def _send(self, base: int, data: bytes) -> None:
        if self.proc is None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(struct.pack("<II", base, len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is dead; the missing answer reports it

    def _answer(self, base: int, data: bytes) -> str:
        """The child's answer to the oldest unanswered input (`base`, `data`)."""
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line:
            code = self.proc.wait()
            if self._drainer is not None:
                self._drainer.join(timeout=10)
            stderr = b"".join(self._stderr_tail).decode(errors="replace")[-1000:]
            self.proc = None
            self.crashes += 1
            raise EngineCrash(f"engine child died (exit {code}) on input (base {base}, "
                              f"config bytes {data!r}); its stderr ends: {stderr!r}")
        line = line.strip()
        if line.startswith("BAD"):
            raise PropertyViolation(f"ConfigureTPUEmbedding({data!r}) on seed {base}: {line}")
        return line

    def run(self, base: int, data: bytes) -> str:
        """Checks one input; returns the child's outcome label.

        Raises:
          EngineCrash: the child died on it.
          PropertyViolation: the child reported a broken property.
        """
        self._send(base, data)
        return self._answer(base, data)

    def run_all(
        self, inputs: Iterable[tuple[Any, tuple[int, bytes]]]
    ) -> Iterator[tuple[Any, str | PropertyViolation]]:
        """Checks `(key, (base, data))` inputs in order, `PIPELINE_DEPTH` ahead.

        Yields `(key, outcome label or the violation)` per input, in input
        order; after a crash, the inputs sent behind the fatal one go to a
        fresh child.
        """
        pending: collections.deque[tuple[Any, tuple[int, bytes]]] = collections.deque()
        source = iter(inputs)
        while True:
            while len(pending) < PIPELINE_DEPTH:
                item = next(source, None)
                if item is None:
                    break
                pending.append(item)
                self._send(*item[1])
            if not pending:
                return
            key, value = pending.popleft()
            try:
                yield key, self._answer(*value)
            except EngineCrash as e:
                for _, waiting in pending:
                    self._send(*waiting)
                yield key, e
            except PropertyViolation as e:
                yield key, e

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _drain(stream: io.BufferedReader | None, tail: collections.deque[bytes]) -> None:
    if stream is None:
        return
    for chunk in iter(lambda: stream.read1(65536), b""):
        tail.append(chunk)


# --------------------------------------------------------------------------------------
# One entry point.


def generate(target: str, rng: random.Random, seeds: list[bytes] | None = None) -> Any:
    """Draws one input for `target` from `rng`."""
    if target in ("from_proto", "from_tf_proto"):
        data = proto_input(rng)
        if rng.random() < 0.1:  # a parsed message rather than bytes
            cls = (tf_optimization_parameters_class() if target == "from_tf_proto"
                   else _our_class())
            msg = cls()
            try:
                msg.ParseFromString(data)
                return msg
            except Exception:  # noqa: BLE001
                return data
        if rng.random() < 0.02:
            return rng.choice(_HOSTILE)
        return data
    if target == "from_json":
        return json_input(rng)
    if target == "from_dict":
        return dict_input(rng)
    if target == "apply_adam":
        return apply_input(rng)
    if target == "engine_config":
        assert seeds is not None
        return (rng.randrange(len(seeds)), engine_input(rng, seeds))
    raise ValueError(f"unknown target {target!r}")


def _our_class() -> Any:
    from tpu_embed_adam import optimization_parameters_pb2 as ours

    return ours.OptimizationParameters


def check(target: str, value: Any, worker: EngineWorker | None = None) -> str:
    """Checks the property for one input; returns an outcome label, raises on a violation."""
    if target in PARAM_TARGETS:
        return check_params(target, value)
    if target == "apply_adam":
        return check_apply(value)
    if target == "engine_config":
        assert worker is not None
        base, data = value
        return worker.run(base, data)
    raise ValueError(f"unknown target {target!r}")


def decode(target: str, data: bytes, seeds: list[bytes] | None = None) -> Any:
    """Turns fuzzer bytes into one input: the bytes seed the structure-aware generator.

    For the proto and engine targets the bytes are also used directly, as
    the message, half of the time, so that a coverage-guided fuzzer's own
    byte mutations reach the parser.
    """
    rng = random.Random(data)
    if target in ("from_proto", "from_tf_proto") and data[:1] == b"\x00":
        return data[1:]
    if target == "engine_config" and data[:1] == b"\x00":
        assert seeds is not None
        return (0, structured_mutation(data[1:], tf_embedding_configuration_class(), rng))
    return generate(target, rng, seeds)


def repro(target: str, value: Any) -> str:
    """Python source that reproduces `check(target, value)`."""
    data = pickle.dumps(value)
    return f"import pickle, fuzz_targets; fuzz_targets.check({target!r}, pickle.loads({data!r}))"
