"""Embedding tables and their Adam slots in a TF checkpoint, summarized.

A table is a 2-D variable; its slots are `{table}/Adam/m` and `{table}/Adam/v`,
as TF's `TPUEmbedding.create_variables_and_ops()` names them. A checkpoint
holds each either whole (a `Saver` saves a partitioned variable as slices of
the full tensor, under the full name) or as separate `{name}/part_i` variables
(one per TPU host); both read back as one logical variable here. A gap in
the part numbers is reported (`Table.missing_parts`), not filled.
"""

import dataclasses
import re

import numpy as np
import tensorflow as tf

_PART = re.compile(r"^(?P<name>.+)/part_(?P<index>\d+)$")
_SLOTS = ("m", "v")


@dataclasses.dataclass(frozen=True)
class Table:
    """One embedding table as the checkpoint holds it.

    Attributes:
      name: the table's variable name (without `/part_i`).
      shape: `(rows, dimension)`.
      shards: how many parts or saved slices hold it.
      slots: the Adam slots present, among `m` and `v`.
      rows_touched: rows whose `m` is not all zero (rows some step updated);
        None without an `m` slot.
      row_norms: the L2 norm of every row of the table.
      v: the `v` slot's values; None without one.
      missing_parts: for the table and each slot saved as `{name}/part_i`
        variables with a gap in `i`, the missing part numbers (a part past
        the last one saved cannot be seen); the values above are those of
        the parts present.
    """

    name: str
    shape: tuple[int, ...]
    shards: int
    slots: tuple[str, ...]
    rows_touched: int | None
    row_norms: np.ndarray
    v: np.ndarray | None
    missing_parts: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _slice_counts(reader: tf.compat.v1.train.NewCheckpointReader, names: list[str]) -> dict:
    # The reader's public API shows a slice-saved tensor only whole; its debug
    # string lists one entry per saved slice, keyed `\0{name}\0\1{slice}`
    # (TF's ordered-code encoding of the tensor name and slice).
    entries = b"\n" + reader.debug_string()
    return {name: entries.count(b"\n\x00" + name.encode() + b"\x00\x01") for name in names}


def read_tables(path: str) -> list[Table]:
    """Reads every embedding table of the checkpoint at `path`.

    Args:
      path: a checkpoint prefix, or a directory with a `checkpoint` file.

    Returns:
      The tables, by name.

    Raises:
      ValueError: no checkpoint at `path`, one TF cannot read (a data file
        missing or truncated included), or a table with no rows.
    """
    try:
        reader = tf.train.load_checkpoint(path)
    except tf.errors.OpError as e:
        raise ValueError(f"not a readable TF checkpoint: {e.message}") from e
    shapes = reader.get_variable_to_shape_map()
    keys: dict[str, dict[int, str]] = {}
    for key in shapes:
        part = _PART.match(key)
        name, index = (part["name"], int(part["index"])) if part else (key, 0)
        keys.setdefault(name, {})[index] = key
    slices = _slice_counts(reader, list(keys))

    def value(name: str) -> np.ndarray:
        parts = keys[name]
        return np.concatenate([_tensor(reader, parts[i]) for i in sorted(parts)], axis=0)

    tables = []
    for name in sorted(keys):
        first_part = keys[name][min(keys[name])]
        if name.endswith(tuple(f"/Adam/{slot}" for slot in _SLOTS)) or len(shapes[first_part]) != 2:
            continue
        table = value(name)
        if not table.shape[0]:
            # No row to summarize: every statistic (and the share of rows
            # touched) would be undefined.
            shape = " x ".join(map(str, table.shape))
            raise ValueError(f"table `{name}` has no rows (shape {shape})")
        slots = tuple(slot for slot in _SLOTS if f"{name}/Adam/{slot}" in keys)
        m = value(f"{name}/Adam/m") if "m" in slots else None
        tables.append(
            Table(
                name=name,
                shape=table.shape,
                shards=len(keys[name]) if len(keys[name]) > 1 else max(slices[name], 1),
                slots=slots,
                rows_touched=None if m is None else int(np.count_nonzero(np.any(m != 0, axis=1))),
                row_norms=np.linalg.norm(table.astype(np.float64), axis=1),
                v=value(f"{name}/Adam/v") if "v" in slots else None,
                missing_parts={
                    variable: missing
                    for variable in (name, *(f"{name}/Adam/{slot}" for slot in slots))
                    if (missing := _missing(keys[variable]))
                },
            )
        )
    return tables


def _tensor(reader: tf.compat.v1.train.NewCheckpointReader, key: str) -> np.ndarray:
    try:
        return reader.get_tensor(key)
    # The index names the tensor, but its bytes live in the data files; TF's
    # reader maps a status to OpError, ValueError, IndexError (a file shorter
    # than the index says) or NotImplementedError.
    except (tf.errors.OpError, ValueError, IndexError, NotImplementedError) as e:
        message = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise ValueError(
            f"cannot read `{key}`: {message} (a data file, .data-?????-of-?????, missing or "
            "truncated?)"
        ) from e


def _missing(parts: dict[int, str]) -> tuple[int, ...]:
    # A variable saved whole is parts {0}: nothing is missing.
    return tuple(sorted(set(range(max(parts) + 1)) - set(parts)))


def format_tables(tables: list[Table]) -> str:
    """Returns one aligned line per table, under a header.

    Args:
      tables: `read_tables`' result.

    Returns:
      The text, without a trailing newline.
    """
    rows = [("table", "shape", "shards", "slots", "rows touched", "row norm min/median/mean/max")]
    for t in tables:
        touched = (
            "-" if t.rows_touched is None
            else f"{t.rows_touched}/{t.shape[0]} ({100 * t.rows_touched / t.shape[0]:.1f}%)"
        )
        norms = t.row_norms
        stats = " / ".join(
            f"{x:.4g}" for x in (norms.min(), np.median(norms), norms.mean(), norms.max())
        )
        rows.append((
            t.name, " x ".join(map(str, t.shape)), str(t.shards), ",".join(t.slots) or "-",
            touched, stats,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)
