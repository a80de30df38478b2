"""`AdamParameters` as files: JSON, text proto and binary proto; detection, reading, writing.

Parsing is the package's own (`AdamParameters.from_json`, `from_proto`,
`from_tf_proto`) and protobuf's text format; this module only chooses which.
"""

import codecs
from collections.abc import Callable
from typing import Any

from google.protobuf import text_format

from tpu_embed_adam import proto
from tpu_embed_adam.params import AdamParameters

FORMATS = ("json", "pbtxt", "binary")
_EMPTY = "the input is empty"
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def detect(data: bytes) -> str:
    """Guesses the format of `data` from its content.

    JSON starts with `{` (or `[`: an array, which reading then refuses by
    name); a text proto is printable text (never starting with either); a
    binary proto holds field tags and lengths below 0x20 and float bytes, so
    it is never both. Text is UTF-8, or UTF-8, UTF-16 or UTF-32 after a
    byte-order mark (what Windows editors and PowerShell's `>` write).

    Args:
      data: the file's bytes.

    Returns:
      One of `FORMATS`.

    Raises:
      ValueError: `data` is empty, or holds only white space (after any
        byte-order mark).
    """
    if not data.strip():
        raise ValueError(_EMPTY)
    try:
        text = _text(data)
    except ValueError:
        return "binary"
    if not text.strip():
        raise ValueError(_EMPTY)
    if text.lstrip().startswith(("{", "[")):
        return "json"
    return "pbtxt" if all(c.isprintable() or c.isspace() for c in text) else "binary"


def _text(data: bytes) -> str:
    """`data` decoded by its byte-order mark, or as UTF-8 without one.

    Raises:
      ValueError: `data` is not text in that encoding.
    """
    # UTF-32's little-endian mark starts with UTF-16's: it is looked for first.
    bom, codec = next(((m, c) for m, c in _BOMS if data.startswith(m)), (b"", "utf-8"))
    try:
        return data[len(bom):].decode(codec)
    except UnicodeDecodeError as e:
        raise ValueError(f"not {codec.upper()} text: {e}") from e


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
      ValueError, TypeError: `data` is empty, is not parameters in that format
        (JSON that is not an object included), or holds values that
        `AdamParameters` rejects.
    """
    fmt = fmt or detect(data)
    if not data.strip():
        # Named here: as a message it would read as no optimizer at all.
        raise ValueError(_EMPTY)
    if fmt == "json":
        # json finds the encoding itself: by a byte-order mark, or UTF-16 and
        # UTF-32 without one.
        return AdamParameters.from_json(data)
    if fmt == "pbtxt":
        return _from_either_message(_parse_text(_text(data)))
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
