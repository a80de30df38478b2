"""Process helpers for the cluster tests: is a process still running, wait until none is."""

from __future__ import annotations

import time
from collections.abc import Iterable


def alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, and not a zombie (dead, waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses.
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Waits until no process in `pids` runs; returns those still running at the timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        running = [pid for pid in pids if alive(pid)]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)
