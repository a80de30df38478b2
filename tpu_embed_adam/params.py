"""`AdamParameters`: the TPU embedding Adam configuration, validated and immutable.

A drop-in for `tf.compat.v1.tpu.experimental.AdamParameters`: TF's signature
(and two keyword-only TPU layout hints after it), TF's attributes, and an
instance of TF's class, so TF's own
`EmbeddingConfigSpec`, `TPUEstimator` and `tpu_embedding.TPUEmbedding` accept it.
It rejects everything TF rejects and more (see `AdamParameters.__init__`), and
behaves as a value: immutable, comparable, hashable, picklable, serializable.
"""

import functools
import json
import reprlib
import typing
from collections.abc import Collection
from typing import Any, Literal

import numpy as np
from tensorflow.python.tpu import tpu_embedding as _tf_tpu_embedding

from tpu_embed_adam import proto
from tpu_embed_adam.learning_rates import DynamicLearningRate, constant_learning_rate
from tpu_embed_adam.rules import decay_rate, real

__all__ = [
    "AdamParameters",
    "DynamicLearningRate",
    "HotIdReplicationStatus",
    "LowDimensionalPackingStatus",
    "as_adam_parameters",
]

# The names of the proto's enums, without UNSPECIFIED (which is None).
HotIdReplicationStatus = Literal["ENABLED", "DISABLED", "MIGRATION_ONLY"]
LowDimensionalPackingStatus = Literal["ENABLED", "DISABLED"]

# The 13 constructor arguments, in TF's order, with TF's defaults.
_DEFAULTS: dict[str, Any] = {
    "beta1": 0.9,
    "beta2": 0.999,
    "epsilon": 1e-08,
    "lazy_adam": True,
    "sum_inside_sqrt": True,
    "use_gradient_accumulation": True,
    "clip_weight_min": None,
    "clip_weight_max": None,
    "weight_decay_factor": None,
    "multiply_weight_decay_factor_by_learning_rate": None,
    "clip_gradient_min": None,
    "clip_gradient_max": None,
}
_FIELDS = ("learning_rate", *_DEFAULTS)
_BOOL_FIELDS = ("lazy_adam", "sum_inside_sqrt", "use_gradient_accumulation")
# Keyword-only arguments beyond TF's 13: TPU layout hints of the proto. They
# change where a TPU keeps rows, not the update, so a proto that sets them is
# read and written back with them rather than refused; None is UNSPECIFIED.
_HINTS: dict[str, Any] = {
    "hot_id_replication_status": HotIdReplicationStatus,
    "low_dimensional_packing_status": LowDimensionalPackingStatus,
}
_ARGUMENTS = (*_FIELDS, *_HINTS)
# What `json.loads` returns, by the JSON type's name, for messages.
_JSON_TYPES = {
    dict: "object", list: "array", str: "string", int: "number", float: "number",
    bool: "boolean", type(None): "null",
}


def _flag(name: str, value: Any, optional: bool = False) -> bool | None:
    if optional and value is None:
        return None
    if not isinstance(value, bool | np.bool_):
        kind = "a bool or None" if optional else "a bool"
        raise TypeError(
            f"Argument `{name}` must be {kind}; received: {value!r} ({type(value).__name__})."
        )
    return bool(value)


def _hint(name: str, value: Any) -> str | None:
    if value is None:
        return None
    allowed = typing.get_args(_HINTS[name])
    if not isinstance(value, str):
        raise TypeError(
            f"Argument `{name}` must be None or one of {allowed}; received: {value!r} "
            f"({type(value).__name__})."
        )
    if value not in allowed:
        raise ValueError(
            f"Argument `{name}` must be None (UNSPECIFIED) or one of {allowed}; "
            f"received: {value!r}."
        )
    return str(value)


def _validated(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Checks and normalises the 15 arguments; returns them as plain Python values."""
    out: dict[str, Any] = {name: _hint(name, kwargs[name]) for name in _HINTS}
    lr = kwargs["learning_rate"]
    out["learning_rate"] = (
        lr if isinstance(lr, DynamicLearningRate) else constant_learning_rate(lr)
    )
    for name in ("beta1", "beta2"):
        out[name] = decay_rate(name, kwargs[name])
    for name in _BOOL_FIELDS:
        out[name] = _flag(name, kwargs[name])
    out["epsilon"] = real("epsilon", kwargs["epsilon"])
    if out["epsilon"] <= 0 or np.float32(out["epsilon"]) <= 0:
        raise ValueError(
            f"Argument `epsilon` must be > 0 (also in float32); received: {kwargs['epsilon']!r}."
        )
    # The update divides by sqrt(v + epsilon^2) (or sqrt(v) + epsilon), formed
    # in float32: a term that underflows, or is subnormal and flushed to zero
    # by TF's threads, turns rows with v = m = 0 into NaN.
    eps32 = np.float32(out["epsilon"])
    term = eps32 * eps32 if out["sum_inside_sqrt"] else eps32
    if term < np.finfo(np.float32).tiny:
        square = "epsilon^2" if out["sum_inside_sqrt"] else "epsilon"
        raise ValueError(
            f"Argument `epsilon` vanishes in float32: with sum_inside_sqrt="
            f"{out['sum_inside_sqrt']}, {square} must be at least "
            f"{np.finfo(np.float32).tiny:.4g}; received: {kwargs['epsilon']!r}."
        )
    for name in ("clip_weight_min", "clip_weight_max", "clip_gradient_min", "clip_gradient_max"):
        out[name] = None if kwargs[name] is None else real(name, kwargs[name])
    for kind in ("weight", "gradient"):
        low, high = out[f"clip_{kind}_min"], out[f"clip_{kind}_max"]
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"Argument `clip_{kind}_min` must be <= `clip_{kind}_max`; "
                f"received: {low!r} > {high!r}."
            )
    wd = kwargs["weight_decay_factor"]
    out["weight_decay_factor"] = None if wd is None else real("weight_decay_factor", wd)
    if out["weight_decay_factor"] is not None and out["weight_decay_factor"] < 0:
        raise ValueError(f"Argument `weight_decay_factor` must be >= 0; received: {wd!r}.")
    if out["weight_decay_factor"] and np.float32(out["weight_decay_factor"]) == 0:
        raise ValueError(
            "Argument `weight_decay_factor` must be 0, None or at least the smallest "
            f"float32 (about 1.4e-45): it is 0 in float32; received: {wd!r}."
        )
    if out["weight_decay_factor"] == 0:
        # A factor of 0 is no decay: TF writes no field for it, so it is
        # stored as None and reads back from the proto equal.
        out["weight_decay_factor"] = None
    multiply = "multiply_weight_decay_factor_by_learning_rate"
    # False is stored as None, as 0 decay is: the proto holds only True, and
    # both mean no scaling, so the two would not read back equal otherwise.
    out[multiply] = _flag(multiply, kwargs[multiply], optional=True) or None
    if out[multiply] and out["weight_decay_factor"] is None:
        raise ValueError(
            f"Argument `{multiply}` is True but `weight_decay_factor` is None (or 0); "
            "set a weight decay factor or leave the flag unset."
        )
    # TF's own two cross-argument rules, with its reasons in the messages.
    if not out["use_gradient_accumulation"] and not out["lazy_adam"]:
        raise ValueError(
            "Argument `lazy_adam` is False, which needs `use_gradient_accumulation=True`; "
            "received: use_gradient_accumulation=False."
        )
    if not out["use_gradient_accumulation"] and (
        out["clip_gradient_min"] is not None or out["clip_gradient_max"] is not None
    ):
        raise ValueError(
            "Arguments `clip_gradient_min`/`clip_gradient_max` need "
            "`use_gradient_accumulation=True`; received: use_gradient_accumulation=False."
        )
    return out


class AdamParameters(_tf_tpu_embedding.AdamParameters):
    """Optimization parameters for Adam with TPU embeddings; validated and immutable.

    Pass it wherever TF's `tf.compat.v1.tpu.experimental.AdamParameters` goes,
    e.g. `EmbeddingConfigSpec(optimization_parameters=AdamParameters(0.1))`.
    The update it configures is stated in `tpu_embed_adam.reference.adam_update`.

    Beyond TF's checks (betas in [0, 1), epsilon > 0, non-lazy Adam and
    gradient clipping need gradient accumulation), it requires: a constant
    learning rate that is a normal float32 > 0, at least about 1.18e-38
    (`learning_rates.constant_learning_rate`), or a `DynamicLearningRate`;
    every float finite in float32, where the proto and the kernels hold it;
    booleans to be bools; `clip_*_min <= clip_*_max`; `weight_decay_factor >= 0`;
    no multiply flag without a weight decay factor; and an epsilon that does
    not vanish in float32 (`epsilon^2` with `sum_inside_sqrt`, else `epsilon`,
    at least the smallest normal float32). Errors are `TypeError` or
    `ValueError` naming the argument and the value received.

    Beyond TF's arguments, it carries the proto's two TPU layout hints
    (`hot_id_replication_status`, `low_dimensional_packing_status`), so that
    a proto that sets them reads back and writes out with them. TF's
    `TPUEmbedding` builds its own config and does not read them from here.

    Example:
      >>> params = AdamParameters(0.01, clip_gradient_max=1.0)
      >>> params.replace(beta2=0.99).beta2
      0.99
    """

    _frozen: bool

    # The annotations are TF's, spelled as TF spells them, so that TF's
    # signature is the start of ours; ours adds keyword-only layout hints.
    def __init__(
        self,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-08,
        lazy_adam: bool = True,
        sum_inside_sqrt: bool = True,
        use_gradient_accumulation: bool = True,
        clip_weight_min: float | None = None,  # noqa: UP007
        clip_weight_max: float | None = None,  # noqa: UP007
        weight_decay_factor: float | None = None,  # noqa: UP007
        multiply_weight_decay_factor_by_learning_rate: bool | None = None,  # noqa: UP007
        clip_gradient_min: float | None = None,  # noqa: UP007
        clip_gradient_max: float | None = None,  # noqa: UP007
        *,
        hot_id_replication_status: HotIdReplicationStatus | None = None,
        low_dimensional_packing_status: LowDimensionalPackingStatus | None = None,
    ):
        """Validates the arguments and builds the parameters.

        Args:
          learning_rate: a float > 0 that is a normal float32 (>= 1.18e-38), or
            a `DynamicLearningRate`.
          beta1: decay rate of the first moment, in [0, 1).
          beta2: decay rate of the second moment, in [0, 1).
          epsilon: the stability constant, > 0; with `sum_inside_sqrt`,
            `epsilon^2` must be a normal float32 (epsilon >= 1.1e-19).
          lazy_adam: update only the rows in the batch (True) or every row.
          sum_inside_sqrt: epsilon inside the square root (`sqrt(v + eps^2)`).
          use_gradient_accumulation: sum a row's gradients before one step.
          clip_weight_min: lower bound of the weights after a step; None: none.
          clip_weight_max: upper bound of the weights after a step; None: none.
          weight_decay_factor: decoupled weight decay, >= 0; None (or 0, stored
            as None): no decay.
          multiply_weight_decay_factor_by_learning_rate: scale the decay by the
            learning rate; needs `weight_decay_factor`. None or False (stored
            as None, which the proto and TF treat alike): no scaling.
          clip_gradient_min: lower bound of the accumulated gradient; None: none.
          clip_gradient_max: upper bound of the accumulated gradient; None: none.
          hot_id_replication_status: the proto's TPU layout hint for rows that
            many samples look up (ENABLED, DISABLED, MIGRATION_ONLY); None:
            unspecified. The update does not depend on it.
          low_dimensional_packing_status: the proto's TPU layout hint for
            tables of dimension 1, 2 or 4 (ENABLED, DISABLED); None:
            unspecified. The update does not depend on it.

        Raises:
          TypeError: an argument of the wrong type.
          ValueError: an argument out of range, or arguments that contradict.
        """
        values = _validated(
            {name: value for name, value in locals().items() if name in _ARGUMENTS}
        )
        object.__setattr__(self, "_frozen", False)
        super().__init__(**{name: values[name] for name in _FIELDS})
        for name in _HINTS:
            setattr(self, name, values[name])
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(
                f"AdamParameters is immutable; use .replace({name}=...) to get a changed copy."
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"AdamParameters is immutable; cannot delete `{name}`.")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _ARGUMENTS)

    def _arguments(self) -> dict[str, Any]:
        return dict(zip(_ARGUMENTS, self._values(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdamParameters):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        args = [f"learning_rate={self.learning_rate!r}"]
        args += [
            f"{name}={getattr(self, name)!r}"
            for name, default in {**_DEFAULTS, **dict.fromkeys(_HINTS)}.items()
            if getattr(self, name) != default or type(getattr(self, name)) is not type(default)
        ]
        return f"tpu_embed_adam.AdamParameters({', '.join(args)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__ so unpickled and copied objects are validated
        # and frozen like any other (a partial: the hints are keyword-only).
        return (functools.partial(type(self), **self._arguments()), ())

    def replace(self, **changes: Any) -> "AdamParameters":
        """Returns a new, validated copy with `changes` applied.

        Args:
          **changes: constructor arguments to change.

        Returns:
          A new `AdamParameters`.

        Raises:
          TypeError: an unknown argument name, or a value of the wrong type.
          ValueError: a value out of range.
        """
        _check_names(changes, "replace")
        return type(self)(**{**self._arguments(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Returns the arguments by name: TF's 13, then the layout hints that are set.

        A dynamic rate is `{"dynamic_tag": tag}`. Unset hints are left out, so
        that parameters without them give TF's 13 names only, which readers
        that know nothing of the hints still read.
        """
        out = {
            name: value
            for name, value in self._arguments().items()
            if name in _FIELDS or value is not None
        }
        if isinstance(self.learning_rate, DynamicLearningRate):
            out["learning_rate"] = {"dynamic_tag": self.learning_rate.tag}
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "AdamParameters":
        """Builds parameters from `to_dict()`'s output (missing keys take defaults).

        Args:
          config: a mapping of argument names to values; `learning_rate` is
            required.

        Returns:
          A new `AdamParameters`.

        Raises:
          TypeError: `config` is not a dict, has keys that are not strings,
            unknown keys, a list or dict where a value belongs (however deep),
            or bad types.
          ValueError: a value out of range, or no learning rate.
        """
        if not isinstance(config, dict):
            raise TypeError(
                f"Argument `config` must be a dict; received: {type(config).__name__}."
            )
        not_names = [key for key in config if not isinstance(key, str)]
        if not_names:
            shown = ", ".join(f"{reprlib.repr(key)} ({type(key).__name__})" for key in not_names)
            raise TypeError(
                f"Argument `config` must have argument names (strings) as keys; received: "
                f"{shown}."
            )
        _check_names(config, "from_dict")
        if "learning_rate" not in config:
            raise ValueError("Argument `config` has no `learning_rate`.")
        kwargs = dict(config)
        lr = kwargs["learning_rate"]
        if isinstance(lr, dict):
            if set(lr) != {"dynamic_tag"}:
                raise ValueError(
                    "Argument `config['learning_rate']` as a dict must be "
                    f'{{"dynamic_tag": int}}; received: {reprlib.repr(lr)}.'
                )
            _check_single("config['learning_rate']['dynamic_tag']", lr["dynamic_tag"])
            kwargs["learning_rate"] = DynamicLearningRate(lr["dynamic_tag"])
        for name, value in kwargs.items():
            _check_single(name, value)
        return cls(**kwargs)

    def to_json(self, **json_kwargs: Any) -> str:
        """Returns `to_dict()` as JSON text; `json_kwargs` go to `json.dumps`."""
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> "AdamParameters":
        """Builds parameters from `to_json()`'s output.

        Args:
          text: JSON text of an object with the argument names as keys.

        Returns:
          A new `AdamParameters`.

        Raises:
          ValueError: text that is not JSON, or bad values.
          TypeError: a JSON value that is not an object, unknown keys, bad types.
        """
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as e:
            # ValueError covers decode errors, bad UTF-8 and integers past
            # Python's digit limit; RecursionError, nesting deeper than the stack.
            raise ValueError(f"Argument `text` is not valid JSON: {type(e).__name__}: {e}") from e
        if not isinstance(config, dict):
            raise TypeError(
                "Argument `text` must be a JSON object of argument names; received: "
                f"{reprlib.repr(config)} (a JSON {_JSON_TYPES[type(config)]})."
            )
        return cls.from_dict(config)

    def to_proto(self) -> Any:
        """Returns the `tpu_embed_adam.OptimizationParameters` message for these parameters."""
        return proto.to_proto(self)

    @classmethod
    def from_proto(cls, message: Any) -> "AdamParameters":
        """Builds parameters from a `tpu_embed_adam.OptimizationParameters` (or its bytes).

        Args:
          message: the message, or its serialized bytes.

        Returns:
          A new `AdamParameters`.

        Raises:
          TypeError: `message` is of another type.
          ValueError: corrupt bytes, another optimizer, or invalid values.
        """
        return proto.from_proto(cls, message, proto.our_message_class())

    def to_tf_proto(self) -> Any:
        """Returns TF's `tensorflow.tpu.OptimizationParameters` for these parameters."""
        return proto.to_proto(self, proto.tf_message_class())

    @classmethod
    def from_tf_proto(cls, message: Any) -> "AdamParameters":
        """Builds parameters from TF's `tensorflow.tpu.OptimizationParameters` (or its bytes).

        Args:
          message: the message, or its serialized bytes.

        Returns:
          A new `AdamParameters`.

        Raises:
          TypeError: `message` is of another type.
          ValueError: corrupt bytes, another optimizer, or invalid values.
        """
        return proto.from_proto(cls, message, proto.tf_message_class())

    def to_tpu_embedding_v2(self) -> Any:
        """Returns the equivalent TF2 `tf.tpu.experimental.embedding.Adam`."""
        return proto.to_tpu_embedding_v2(self)

    @classmethod
    def from_tpu_embedding_v2(cls, optimizer: Any) -> "AdamParameters":
        """Builds parameters from a TF2 `tf.tpu.experimental.embedding.Adam`.

        Args:
          optimizer: the TF2 optimizer; a callable learning rate is refused
            (its value is only known at run time).

        Returns:
          A new `AdamParameters`.

        Raises:
          TypeError: `optimizer` is not a TF2 Adam, or has a callable learning rate.
          ValueError: values that fail validation.
        """
        return proto.from_tpu_embedding_v2(cls, optimizer)


def as_adam_parameters(params: Any) -> AdamParameters:
    """Returns `params` as a `tpu_embed_adam.AdamParameters`, validated.

    Ours are returned as they are; TF's
    `tf.compat.v1.tpu.experimental.AdamParameters` (which checks less) is
    rebuilt from its 13 attributes, so it passes our validation: e.g. an
    epsilon that vanishes in float32 is refused here, whatever path follows.

    Raises:
      TypeError: `params` is neither, or an attribute of the wrong type.
      ValueError: an attribute our validation refuses.
    """
    if isinstance(params, AdamParameters):
        return params
    if not isinstance(params, _tf_tpu_embedding.AdamParameters):
        raise TypeError(
            "Argument `params` must be an AdamParameters (tpu_embed_adam's or "
            f"tf.compat.v1.tpu.experimental's); received: {type(params).__name__}."
        )
    return AdamParameters(**{name: getattr(params, name) for name in _FIELDS})


def _check_single(name: str, value: Any) -> None:
    # No argument takes a container. Refused here, a deeply nested one never
    # reaches the validators, whose messages would repr it past the stack.
    if isinstance(value, Collection) and not isinstance(value, str):
        raise TypeError(
            f"Argument `{name}` must be a single value (a number, bool, string or None), not "
            f"a {type(value).__name__}; received: {reprlib.repr(value)}."
        )


def _check_names(names: dict[str, Any], where: str) -> None:
    unknown = sorted(set(names) - set(_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"{where}: unknown argument(s) {unknown}; expected names among {list(_ARGUMENTS)}."
        )

