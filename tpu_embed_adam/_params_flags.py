"""Command-line flags for `AdamParameters`, generated from its constructor.

The constructor's signature gives each flag's name, type, default and whether
it is required; its docstring's `Args:` section gives the help text. Nothing is
written out twice, so a new argument or a changed default reaches the CLI as is.
"""

import argparse
import inspect
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from tpu_embed_adam.params import AdamParameters

_TRUE = ("true", "t", "1", "yes")
_FALSE = ("false", "f", "0", "no")


class _BoolFlag(argparse.Action):
    """`--name`, `--name=true|false` and `--noname`, as absl spells booleans."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        negated = option_string is not None and option_string.startswith(f"--no{self.dest}")
        if values is None:
            setattr(namespace, self.dest, not negated)
        elif not negated and values.lower() in _TRUE + _FALSE:
            setattr(namespace, self.dest, values.lower() in _TRUE)
        else:
            parser.error(f"argument {option_string}: expected true or false, got {values!r}")


def _arg_docs(docstring: str) -> dict[str, str]:
    """Maps each name in a Google-style `Args:` section to its (one-line) text."""
    lines = inspect.cleandoc(docstring).splitlines()
    start = lines.index("Args:") + 1
    docs: dict[str, str] = {}
    name = ""
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.match(r"^  (\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2)
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def _base_type(annotation: Any) -> Any:
    """`float` for `float` and `float | None`; `bool` and `Literal[...]` likewise."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        (base,) = (t for t in typing.get_args(annotation) if t is not type(None))
        return base
    return annotation


def _parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(AdamParameters).parameters)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per `AdamParameters` argument to `parser`.

    Arguments without a default (TF's `learning_rate`) become required flags;
    the layout hints (`Literal` names) take one of their names.

    Args:
      parser: the `params` subcommand's parser.
    """
    docs = _arg_docs(AdamParameters.__init__.__doc__ or "")
    for name, parameter in _parameters().items():
        # argparse formats help with %: a literal one must be doubled.
        help_text = docs.get(name, "").replace("%", "%%")
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        base = _base_type(parameter.annotation)
        if typing.get_origin(base) is typing.Literal:
            parser.add_argument(
                f"--{name}", choices=typing.get_args(base), default=default,
                help=f"{help_text} (default: {default})",
            )
        elif base is bool:
            parser.add_argument(
                f"--{name}", f"--no{name}", action=_BoolFlag, default=default,
                help=f"{help_text} (default: {default})",
            )
        else:
            parser.add_argument(
                f"--{name}", type=float, default=default, required=required, metavar="FLOAT",
                help=help_text + ("" if required else f" (default: {default})"),
            )


def params_from_flags(args: argparse.Namespace) -> AdamParameters:
    """Builds the `AdamParameters` that `add_flags`' flags describe.

    Args:
      args: the parsed command line.

    Returns:
      The validated parameters.

    Raises:
      TypeError, ValueError: values that `AdamParameters` rejects (the message
        names the argument, which is the flag's name).
    """
    return AdamParameters(**{name: getattr(args, name) for name in _parameters()})
