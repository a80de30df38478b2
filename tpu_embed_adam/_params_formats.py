"""`AdamParameters` as files: JSON, text proto and binary proto; detection, reading, writing.

Parsing is the package's own (`AdamParameters.from_json`, `from_proto`,
`from_tf_proto`) and protobuf's text format; this module only chooses which.
"""

from collections.abc import Callable
from typing import Any

from google.protobuf import text_format

from tpu_embed_adam import proto
from tpu_embed_adam.params import AdamParameters

FORMATS = ("json", "pbtxt", "binary")


def detect(data: bytes) -> str:
    """Guesses the format of `data` from its content.

    JSON is an object, so it starts with `{`; a text proto is printable UTF-8
    (never starting with `{`); a binary proto holds field tags and lengths
    below 0x20 and float bytes, so it is never both.

    Args:
      data: the file's bytes.

    Returns:
      One of `FORMATS`.

    Raises:
      ValueError: `data` is empty.
    """
    if not data.strip():
        raise ValueError("the input is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if text.lstrip().startswith("{"):
        return "json"
    return "pbtxt" if all(c.isprintable() or c.isspace() for c in text) else "binary"


def _parse_text(text: str) -> Callable[[type], Any]:
    def parse(message_class: type) -> Any:
        try:
            return text_format.Parse(text, message_class())
        except text_format.ParseError as e:
            raise ValueError(
                f"not a text {message_class.DESCRIPTOR.full_name}: {e}"  # type: ignore[attr-defined]
            ) from e

    return parse


def _from_either_message(parse: Callable[[type], Any]) -> AdamParameters:
    # Ours first; TF's message also knows the other optimizers, so when ours
    # fails, TF's reading either succeeds or names what the input holds.
    try:
        return AdamParameters.from_proto(parse(proto.our_message_class()))
    except ValueError:
        return AdamParameters.from_tf_proto(parse(proto.tf_message_class()))


def read(data: bytes, fmt: str | None = None) -> AdamParameters:
    """Reads parameters from `data`.

    Args:
      data: the file's bytes.
      fmt: one of `FORMATS`; None: `detect(data)`.

    Returns:
      The validated parameters.

    Raises:
      ValueError, TypeError: `data` is not parameters in that format, or holds
        values that `AdamParameters` rejects.
    """
    fmt = fmt or detect(data)
    if fmt == "json":
        return AdamParameters.from_json(data)
    if fmt == "pbtxt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text: {e}") from e
        return _from_either_message(_parse_text(text))
    return _from_either_message(lambda message_class: bytes(data))


def write(params: AdamParameters, fmt: str) -> bytes:
    """Returns `params` in format `fmt` (text formats end with a newline).

    Args:
      params: the parameters.
      fmt: one of `FORMATS`.

    Returns:
      The file's bytes.
    """
    if fmt == "json":
        return (params.to_json(indent=2) + "\n").encode()
    if fmt == "pbtxt":
        return text_format.MessageToString(params.to_proto()).encode()
    return params.to_proto().SerializeToString()
