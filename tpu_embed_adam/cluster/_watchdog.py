"""A thread that notices, within a poll interval, each worker process that exits."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Sequence

__all__ = ["WorkerWatchdog"]


class WorkerWatchdog:
    """Polls worker processes; calls `on_exit(task, status)` once per worker that exits.

    Runs in a daemon thread from construction until `stop()`. `on_exit` runs in
    that thread and must not raise (what it raises is lost with the thread).

    Args:
      procs: the workers, in task order.
      on_exit: called with the task index and `Popen.returncode` (negative:
        the signal that ended it).
      interval_s: how often to poll.
    """

    def __init__(
        self,
        procs: Sequence[subprocess.Popen[bytes]],
        on_exit: Callable[[int, int], None],
        interval_s: float,
    ):
        self._procs = list(procs)
        self._on_exit = on_exit
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops watching and waits for the thread; exits after this are not reported."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        reported: set[int] = set()
        while not self._stopping.wait(self._interval_s):
            for task, proc in enumerate(self._procs):
                if task in reported:
                    continue
                status = proc.poll()
                # Checked again: stop() may have begun ending the workers.
                if status is not None and not self._stopping.is_set():
                    reported.add(task)
                    self._on_exit(task, status)
