"""The `tpu-embed-adam` command line.

    tpu-embed-adam params --learning_rate=0.05 --clip_gradient_max=1 --format=text
    tpu-embed-adam decode params.pb          # a serialized OptimizationParameters
    tpu-embed-adam info                      # version, kernel library, registered kernels

`params` prints the configuration as JSON (the `to_json` form), proto text, or
the serialized proto in hex; `decode` reads a serialized proto (ours or TF's:
the bytes are the same) and prints it back as JSON, after validation.
"""

import sys

from absl import app, flags

from tpu_embed_adam.params import AdamParameters

_COMMANDS = ("params", "decode", "info")
# TF's own ops that the software embedding engine serves on CPU.
_ENGINE_OPS = (
    "ConfigureTPUEmbedding",
    "LoadTPUEmbeddingADAMParameters",
    "RetrieveTPUEmbeddingADAMParameters",
    "EnqueueTPUEmbeddingArbitraryTensorBatch",
    "RecvTPUEmbeddingActivations",
    "SendTPUEmbeddingGradients",
)

_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.001, "The learning rate.")
_BETA1 = flags.DEFINE_float("beta1", 0.9, "Decay rate of the first moment.")
_BETA2 = flags.DEFINE_float("beta2", 0.999, "Decay rate of the second moment.")
_EPSILON = flags.DEFINE_float("epsilon", 1e-08, "The stability constant.")
_LAZY_ADAM = flags.DEFINE_bool("lazy_adam", True, "Update only the rows in the batch.")
_SUM_INSIDE_SQRT = flags.DEFINE_bool("sum_inside_sqrt", True, "Epsilon inside the sqrt.")
_ACCUMULATION = flags.DEFINE_bool(
    "use_gradient_accumulation", True, "Sum a row's gradients before one step."
)
_CLIP_WEIGHT_MIN = flags.DEFINE_float("clip_weight_min", None, "Lower weight bound.")
_CLIP_WEIGHT_MAX = flags.DEFINE_float("clip_weight_max", None, "Upper weight bound.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay_factor", None, "Decoupled weight decay.")
_MULTIPLY = flags.DEFINE_bool(
    "multiply_weight_decay_factor_by_learning_rate", None, "Scale the decay by the rate."
)
_CLIP_GRADIENT_MIN = flags.DEFINE_float("clip_gradient_min", None, "Lower gradient bound.")
_CLIP_GRADIENT_MAX = flags.DEFINE_float("clip_gradient_max", None, "Upper gradient bound.")
_FORMAT = flags.DEFINE_enum("format", "json", ["json", "text", "hex"], "Output of `params`.")


def _params_from_flags() -> AdamParameters:
    return AdamParameters(
        learning_rate=_LEARNING_RATE.value,
        beta1=_BETA1.value,
        beta2=_BETA2.value,
        epsilon=_EPSILON.value,
        lazy_adam=_LAZY_ADAM.value,
        sum_inside_sqrt=_SUM_INSIDE_SQRT.value,
        use_gradient_accumulation=_ACCUMULATION.value,
        clip_weight_min=_CLIP_WEIGHT_MIN.value,
        clip_weight_max=_CLIP_WEIGHT_MAX.value,
        weight_decay_factor=_WEIGHT_DECAY.value,
        multiply_weight_decay_factor_by_learning_rate=_MULTIPLY.value,
        clip_gradient_min=_CLIP_GRADIENT_MIN.value,
        clip_gradient_max=_CLIP_GRADIENT_MAX.value,
    )


def _render(params: AdamParameters, fmt: str) -> str:
    if fmt == "json":
        return params.to_json(indent=2)
    if fmt == "text":
        return str(params.to_proto()).rstrip()
    return params.to_proto().SerializeToString().hex()


def main(argv: list[str]) -> int:
    """Runs one command; returns the exit status.

    Args:
      argv: the command line left after absl parsed the flags.

    Returns:
      0 on success, 2 on a usage or input error (printed to stderr).
    """
    if len(argv) < 2 or argv[1] not in _COMMANDS:
        print(f"usage: tpu-embed-adam {{{'|'.join(_COMMANDS)}}} [flags]", file=sys.stderr)
        return 2
    command, rest = argv[1], argv[2:]
    try:
        if command == "params":
            print(_render(_params_from_flags(), _FORMAT.value))
        elif command == "decode":
            if len(rest) != 1:
                print("usage: tpu-embed-adam decode FILE", file=sys.stderr)
                return 2
            with open(rest[0], "rb") as f:
                print(AdamParameters.from_proto(f.read()).to_json(indent=2))
        else:
            print(_info())
    except (TypeError, ValueError, OSError) as e:
        print(f"tpu-embed-adam {command}: {e}", file=sys.stderr)
        return 2
    return 0


def _info() -> str:
    import tpu_embed_adam
    from tpu_embed_adam.ops import _loader

    lines = [f"tpu_embed_adam {tpu_embed_adam.__version__}"]
    library = _loader.load_library()
    lines.append(
        "kernel library: loaded"
        if library is not None
        else f"kernel library: not loaded ({_loader.load_error()}); pure-TF path only"
    )
    if library is not None:
        from tensorflow.python.framework import kernels

        registered = [
            op
            for op in _ENGINE_OPS
            if any(k.device_type == "CPU" for k in kernels.get_registered_kernels_for_op(op).kernel)
        ]
        lines.append(f"CPU kernels for TF's TPU embedding ops: {', '.join(registered) or 'none'}")
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point."""
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
