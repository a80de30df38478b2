"""How a table's rows are laid out over shards, as TF and the engine split them.

`shard_ids` gives the global ids each shard holds (`div` or `mod`), `num_parts`
the number of TF's real `part_i` variables, `split_table`/`join_table` convert
between a whole [vocab, dim] table and those parts, and `shard_rows` the rows
of one engine shard as the raw load/retrieve ops see them (dummy rows padding
tables smaller than the shard count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def shard_ids(vocab: int, num_shards: int, strategy: str) -> list[np.ndarray]:
    """Global ids held by each shard, in local-row order.

    `div`: contiguous blocks, the first `vocab % num_shards` shards one row
    longer; `mod`: shard i holds i, i + S, i + 2S, ... Both give TF's
    `fixed_size_partitioner` part sizes, which is why TF builds the same
    variables for both.
    """
    if strategy == "mod":
        return [np.arange(i, vocab, num_shards) for i in range(num_shards)]
    sizes = [vocab // num_shards + (i < vocab % num_shards) for i in range(num_shards)]
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def num_parts(vocab: int, num_hosts: int) -> int:
    """Number of real `part_i` variables TF creates (the rest are dummies)."""
    return min(vocab, num_hosts)


def split_table(full: np.ndarray, num_hosts: int, strategy: str) -> list[np.ndarray]:
    """Splits a [vocab, dim] array into the rows of each `part_i` variable."""
    return [full[ids] for ids in shard_ids(len(full), num_parts(len(full), num_hosts), strategy)]


def join_table(parts: Sequence[np.ndarray], vocab: int, strategy: str) -> np.ndarray:
    """Inverse of `split_table`: assembles `part_i` values into [vocab, dim]."""
    full = np.zeros((vocab, parts[0].shape[1]), np.float32)
    for ids, part in zip(shard_ids(vocab, len(parts), strategy), parts, strict=True):
        full[ids] = part
    return full


def shard_rows(vocab: int, shards: int, shard: int, mod: bool) -> np.ndarray:
    """Global ids of shard `shard`'s rows, in local order; tables smaller than
    `shards` are padded with dummy rows, one per shard (as TF pads them)."""
    return shard_ids(max(vocab, shards), shards, "mod" if mod else "div")[shard]
