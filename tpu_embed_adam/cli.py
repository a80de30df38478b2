"""The `tpu-embed-adam` command line.

    tpu-embed-adam params --learning_rate=0.05 --clip_gradient_max=1 --format=text
    tpu-embed-adam decode params.pb                  # binary OptimizationParameters -> JSON
    tpu-embed-adam convert params.json --to=binary --out=params.pb
    tpu-embed-adam inspect /tmp/model/ckpt --plot=tables.png
    tpu-embed-adam info                              # version, kernel library, kernels
    tpu-embed-adam cluster --hosts=2 --cores_per_host=2  # worker processes here, until Ctrl-C
    tpu-embed-adam worker --cluster_spec='{"worker": ["h0:2222", "h1:2222"]}' --task=0
    TF_CONFIG='{"cluster": {...}, "task": {"type": "worker", "index": 0}}' tpu-embed-adam worker

Exit status: 0 success, 1 bad input (a file that is missing or does not parse)
or a worker that could not start or exited, 2 usage error (unknown command or
flag, a flag value out of range). Errors are one line on stderr. TF's C++ log
lines are off unless `--verbosity` asks: the console script's entry point,
`tpu_embed_adam_cli.run`, sets their level before anything imports
TensorFlow, then calls `run` here.

Modules imported by the commands import TensorFlow, so they are imported when
a command runs, not at the top of this module.
"""

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from absl import app
from absl import logging as absl_logging

if TYPE_CHECKING:
    import tensorflow as tf

    from tpu_embed_adam.params import AdamParameters

_PROG = "tpu-embed-adam"
_OK, _BAD_INPUT, _USAGE = 0, 1, 2
_EXIT_CODES = "exit status: 0 success, 1 bad input (missing or unparsable file), 2 usage error"
_ALL_EXIT_CODES = (
    "exit status: 0 success, 1 bad input (missing or unparsable file) or a worker that could "
    "not start or exited, 2 usage error"
)
_CLUSTER_EXIT_CODES = (
    "exit status: 0 stopped by Ctrl-C or SIGTERM, 1 a worker could not start or exited, "
    "2 usage error"
)
_WORKER_EXIT_CODES = (
    "runs until killed (SIGINT and SIGTERM end it at once); exit status: 1 the worker could "
    "not start (its port is taken, no kernel library, its parent is gone), 2 usage error"
)
# How often `cluster` checks that its workers still run.
_CLUSTER_POLL_S = 1.0
# TF's own ops that the software embedding engine serves on CPU.
class _UsageError(Exception):
    """A command line that asks for something impossible (exit status 2)."""


class _InputError(Exception):
    """An input that is missing or does not parse (exit status 1)."""


class _WorkerError(Exception):
    """A worker that could not start or exited (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that exit with `_USAGE`."""

    def error(self, message: str) -> NoReturn:
        _print_error(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(_USAGE)


def _print_error(prog: str, message: str) -> None:
    # One line, whatever the underlying error printed (protobuf's span lines).
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)


def _print_warning(prog: str, message: str) -> None:
    print(f"{prog}: warning: {' '.join(message.split())}", file=sys.stderr)


def _read_input(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _InputError(f"{path}: {e.strerror}") from e


def _params(args: argparse.Namespace) -> str:
    from tpu_embed_adam import _params_flags

    try:
        params = _params_flags.params_from_flags(args)
    except (TypeError, ValueError) as e:
        raise _UsageError(str(e)) from e
    if args.format == "json":
        return params.to_json(indent=2)
    if args.format == "text":
        return str(params.to_proto()).rstrip()
    return params.to_proto().SerializeToString().hex()


def _parse_params(path: str, data: bytes, fmt: str | None) -> "AdamParameters":
    from tpu_embed_adam import _params_formats

    try:
        return _params_formats.read(data, fmt)
    except (TypeError, ValueError) as e:
        raise _InputError(f"{path}: {e}") from e


def _decode(args: argparse.Namespace) -> str:
    return _parse_params(args.file, _read_input(args.file), "binary").to_json(indent=2)


def _convert(args: argparse.Namespace) -> None:
    from tpu_embed_adam import _params_formats

    if args.to == "binary" and args.out is None and sys.stdout.isatty():
        raise _UsageError("--to=binary writes bytes: give --out=FILE or redirect stdout")
    params = _parse_params(args.input, _read_input(args.input), args.source_format)
    data = _params_formats.write(params, args.to)
    if args.out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        with open(args.out, "wb") as f:
            f.write(data)
    except OSError as e:
        raise _InputError(f"--out={args.out}: {e.strerror}") from e


def _inspect(args: argparse.Namespace) -> str:
    from tpu_embed_adam import _checkpoint_inspect

    try:
        tables = _checkpoint_inspect.read_tables(args.checkpoint)
    except ValueError as e:
        raise _InputError(f"{args.checkpoint}: {e}") from e
    if not tables:
        return f"no embedding tables (2-D variables) in {args.checkpoint}"
    if args.plot:
        try:
            from tpu_embed_adam import _checkpoint_plot

            _checkpoint_plot.write_png(tables, args.plot)
        except ImportError as e:
            raise _UsageError("--plot needs matplotlib: pip install matplotlib") from e
        except OSError as e:
            raise _InputError(f"--plot={args.plot}: {e.strerror}") from e
        except ValueError as e:
            raise _InputError(f"--plot={args.plot}: {e}") from e
    for table in tables:
        if table.missing_parts:
            gaps = "; ".join(
                f"{variable}: {', '.join(map(str, missing))}"
                for variable, missing in table.missing_parts.items()
            )
            _print_warning(
                f"{_PROG} inspect",
                f"{args.checkpoint}: table `{table.name}` lacks `/part_i` variables ({gaps}): "
                "its shape and statistics are those of the parts present",
            )
    return _checkpoint_inspect.format_tables(tables)


def _info(args: argparse.Namespace) -> str:
    import tpu_embed_adam
    from tpu_embed_adam import _library

    lines = [f"tpu_embed_adam {tpu_embed_adam.__version__}"]
    library = _library.load_library()
    lines.append(
        "kernel library: loaded"
        if library is not None
        else f"kernel library: not loaded ({_library.load_error()}); pure-TF path only"
    )
    if library is not None:
        tpu_ops, own_ops = _registered_cpu_kernels()
        lines.append(f"CPU kernels for TF's TPU ops ({len(tpu_ops)}): {', '.join(tpu_ops)}")
        lines.append(f"own ops ({len(own_ops)}): {', '.join(own_ops)}")
    return "\n".join(lines)


def _registered_cpu_kernels() -> tuple[list[str], list[str]]:
    """TF's TPU ops with a CPU kernel, and the library's own ops, sorted.

    Stock TF registers no CPU kernel for an op of `gen_tpu_ops`, so each one
    found came from the kernel library; read from TF's registry, the list
    cannot fall behind the library.
    """
    import tensorflow as tf
    from tensorflow.python.framework import kernels

    cpu = {k.op for k in kernels.get_all_registered_kernels().kernel if k.device_type == "CPU"}
    tpu_ops = sorted(
        op
        for op in cpu
        if getattr(getattr(tf.raw_ops, op, None), "__module__", "").endswith("gen_tpu_ops")
    )
    own_ops = sorted(op for op in cpu if op.startswith("TpuEmbedAdam"))
    return tpu_ops, own_ops


def _cluster(args: argparse.Namespace) -> None:
    from tpu_embed_adam import cluster

    # SIGTERM ends the wait as Ctrl-C does, so that the workers stop either way.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with cluster.LocalCluster(args.hosts, args.cores_per_host) as local:
            print(json.dumps(local.cluster_spec.as_dict()))
            for task, (address, pid) in enumerate(
                zip(local.cluster_spec.job_tasks("worker"), local.pids, strict=True)
            ):
                print(f"task {task}: {address} (pid {pid})")
            print(f"target: {local.target}", flush=True)
            while True:
                # Short sleeps: TF's threads may take the signal, and Python
                # runs its handler only once the main thread wakes.
                time.sleep(_CLUSTER_POLL_S)
                for task, status in enumerate(local.poll()):
                    if status is not None:
                        raise _WorkerError(
                            f"worker task {task} (pid {local.pids[task]}) exited with status "
                            f"{status}"
                        )
    except KeyboardInterrupt:
        return
    except (RuntimeError, TimeoutError) as e:
        raise _WorkerError(str(e)) from e
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker(args: argparse.Namespace) -> None:
    import tensorflow as tf

    from tpu_embed_adam import cluster

    if args.cluster_spec is None and args.task is None:
        try:
            args.cluster_spec, args.task = cluster.worker_task_from_tf_config()
        except ValueError as e:
            raise _UsageError(str(e)) from e
    elif args.cluster_spec is None or args.task is None:
        missing, given = ("cluster_spec", "task")[:: 1 if args.cluster_spec is None else -1]
        raise _UsageError(
            f"argument --{missing}: required with --{given}; give neither to read TF_CONFIG"
        )
    tasks = args.cluster_spec.num_tasks("worker")
    if args.task >= tasks:
        raise _UsageError(
            f"argument --task: must be in [0, {tasks - 1}] (the tasks of the cluster spec's "
            f"job 'worker'); received: {args.task}"
        )
    try:
        cluster.run_worker(
            args.cluster_spec, args.task, args.cores_per_host, parent_pid=args.parent_pid
        )
    except (RuntimeError, tf.errors.OpError) as e:
        raise _WorkerError(str(e)) from e


def _int_flag(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high] (no upper bound when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}; received: {value}")
        return value

    return parse


def _cluster_spec_flag(text: str) -> "tf.train.ClusterSpec":
    from tpu_embed_adam import cluster

    try:
        return cluster.parse_cluster_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _add_command(
    commands: "argparse._SubParsersAction[_Parser]",
    name: str,
    summary: str,
    handler: Callable[[argparse.Namespace], str | None],
    common: _Parser,
    epilog: str = _EXIT_CODES,
) -> _Parser:
    parser = commands.add_parser(
        name, help=summary, description=summary, epilog=epilog, parents=[common],
        allow_abbrev=False,
    )
    parser.set_defaults(handler=handler)
    return parser


def _parser() -> _Parser:
    from tpu_embed_adam import _params_flags, _params_formats, cluster

    # In every parser, so that it may come before or after the command;
    # SUPPRESS: a command's default must not overwrite a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbosity", type=int, default=argparse.SUPPRESS,
        help="log verbosity (absl's: 0 info, -1 warnings, -2 errors); also turns on TF's "
        "C++ log lines, which are off by default",
    )
    parser = _Parser(
        prog=_PROG,
        description="TPU embedding Adam: parameters, checkpoints, kernels, worker processes.",
        epilog=_ALL_EXIT_CODES, parents=[common], allow_abbrev=False,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    params = _add_command(
        commands, "params", "print AdamParameters built from flags (JSON, text proto or hex)",
        _params, common,
    )
    _params_flags.add_flags(params)
    params.add_argument("--format", choices=("json", "text", "hex"), default="json")

    decode = _add_command(
        commands, "decode", "print a binary OptimizationParameters (ours or TF's) as JSON",
        _decode, common,
    )
    decode.add_argument("file", help="the serialized proto ('-': stdin)")

    convert = _add_command(
        commands, "convert", "convert AdamParameters between JSON, text proto and binary proto",
        _convert, common,
    )
    convert.add_argument("input", help="the parameters file ('-': stdin)")
    convert.add_argument("--to", choices=_params_formats.FORMATS, required=True)
    convert.add_argument(
        "--from", dest="source_format", choices=_params_formats.FORMATS,
        help="the input's format (default: detected from its content)",
    )
    convert.add_argument("--out", metavar="FILE", help="write here (default: stdout)")

    inspect = _add_command(
        commands, "inspect", "summarize the embedding tables and Adam slots of a TF checkpoint",
        _inspect, common,
    )
    inspect.add_argument("checkpoint", help="a checkpoint prefix, or its directory")
    inspect.add_argument(
        "--plot", metavar="FILE.png", help="write row-norm and Adam v histograms (matplotlib)"
    )

    _add_command(
        commands, "info", "print the version, the kernel library and the kernels it registers",
        _info, common,
    )

    local = _add_command(
        commands, "cluster",
        "start one worker process per host on this machine, print the cluster, wait for Ctrl-C",
        _cluster, common, epilog=_CLUSTER_EXIT_CODES,
    )
    local.add_argument(
        "--hosts", type=_int_flag(1, cluster.MAX_LOCAL_HOSTS), required=True, metavar="N",
        help=f"worker processes (tasks of job 'worker'), 1 to {cluster.MAX_LOCAL_HOSTS}",
    )
    local.add_argument(
        "--cores_per_host", type=_int_flag(1, cluster.MAX_CORES_PER_HOST), default=1,
        metavar="K", help="logical CPU devices (TPU cores) per worker (default: 1)",
    )

    worker = _add_command(
        commands, "worker",
        "serve one host's engine as task --task of job 'worker' (run one on each host)",
        _worker, common, epilog=_WORKER_EXIT_CODES,
    )
    worker.add_argument(
        "--cluster_spec", type=_cluster_spec_flag, metavar="JSON",
        help='the whole cluster, e.g. \'{"worker": ["host0:2222", "host1:2222"]}\' '
        "(task i serves at the i-th address); the same on every host; without it and "
        "--task, TF_CONFIG's cluster and task (a TFJob's worker)",
    )
    worker.add_argument(
        "--task", type=_int_flag(0), metavar="I",
        help="this host's task index in job 'worker'",
    )
    worker.add_argument(
        "--cores_per_host", type=_int_flag(1, cluster.MAX_CORES_PER_HOST), default=1,
        metavar="K", help="logical CPU devices (TPU cores) of this worker (default: 1)",
    )
    worker.add_argument(
        "--parent_pid", type=_int_flag(1), metavar="PID",
        help="exit when this process, the worker's parent, exits (what LocalCluster passes)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Runs one command; returns the exit status.

    Args:
      argv: the command line, program name first.

    Returns:
      0 on success, 1 on bad input, 2 on a usage error (both printed to stderr
      as one line).
    """
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    if "verbosity" in args:
        absl_logging.set_verbosity(args.verbosity)
    prog = f"{_PROG} {args.command}"
    try:
        out = args.handler(args)
    except _UsageError as e:
        _print_error(prog, str(e))
        return _USAGE
    except (_InputError, _WorkerError) as e:
        _print_error(prog, str(e))
        return _BAD_INPUT
    if out is not None:
        print(out)
    return _OK


def run() -> None:
    """Runs the command line in `sys.argv` and exits with its status.

    TF's C++ log level is not set here: by now the package has imported
    TensorFlow. The console script enters through `tpu_embed_adam_cli.run`.
    """
    # absl parses no flags of its own: argparse (in `main`) owns the command line.
    app.run(main, flags_parser=_mark_absl_flags_parsed)


def _mark_absl_flags_parsed(argv: list[str]) -> list[str]:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    return argv


if __name__ == "__main__":
    run()
