"""What a benchmark run's numbers depend on: cores, load, huge pages, memory bandwidth.

The development box is a shared VM whose bandwidth and load move from run
to run, so every benchmark prints these beside its ratios: a ratio is read
against the conditions it was measured in.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import threading
import time

import numpy as np

_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def thp_mode() -> str:
    """The transparent huge page mode in force (`always`, `madvise`, `never`), or `unknown`."""
    try:
        text = _THP.read_text()
    except OSError:
        return "unknown"
    # The mode in force is the bracketed word: "always [madvise] never".
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or `unknown`."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def memory_gib() -> tuple[float, float]:
    """(total, available) memory in GiB from /proc/meminfo; (0, 0) if unreadable."""
    fields: dict[str, float] = {}
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields[name] = float(rest.split()[0]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    return fields.get("MemTotal", 0.0), fields.get("MemAvailable", 0.0)


def copy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """Returns the copy bandwidth in GB/s (bytes read + written), all cores.

    Args:
      megabytes: size of the array copied.
      repeats: timed copies; the median counts.
    """
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), os.cpu_count() or 1)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]

    def copy() -> None:
        # numpy releases the GIL while copying, so the threads run in parallel.
        threads = [threading.Thread(target=np.copyto, args=(dst[b:e], src[b:e])) for b, e in bounds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    for _ in range(2):
        copy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def describe(probe: bool = True) -> dict[str, object]:
    """The run's conditions as a dict: cores, CPU, memory, huge pages, load, copy probe.

    Args:
      probe: also measure the copy bandwidth (about a second).
    """
    total, available = memory_gib()
    conditions: dict[str, object] = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_total_gib": round(total, 1),
        "mem_available_gib": round(available, 1),
        "thp": thp_mode(),
        "load_1min": load_average(),
    }
    if probe:
        conditions["copy_gb_per_s"] = round(copy_bandwidth(), 1)
    return conditions


def format_conditions(conditions: dict[str, object]) -> str:
    """One line for a report."""
    line = (
        f"{conditions['cpus']} CPUs ({conditions['cpu']}), "
        f"{conditions['mem_total_gib']} GiB ({conditions['mem_available_gib']} available), "
        f"THP {conditions['thp']}, load {conditions['load_1min']:.2f}"
    )
    if "copy_gb_per_s" in conditions:
        line += f", copy probe {conditions['copy_gb_per_s']} GB/s"
    return line
