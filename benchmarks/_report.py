"""Shared pieces of the benchmark scripts' reports: percentiles, and what ran where.

- :func:`percentile` and :func:`ms`: the nearest-rank percentile every latency table uses
  (``latency.py``, ``storm.py``, ``single_drop.py``), so that their p50/p90/p99/max mean the
  same thing;
- :func:`version`, :func:`git`, :func:`cpu_model` and :func:`describe_machine`: the lines at
  the top of a report that say which versions ran on which machine.

Nothing here imports aiohttp or aiodelay: a script may print its header before it starts a
server.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from importlib import metadata

__all__ = ("cpu_model", "describe_machine", "git", "ms", "percentile", "version")


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (``pct`` 100: the largest)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ms(sorted_values: Sequence[float], pcts: Iterable[float]) -> str:
    """The percentiles ``pcts`` of sorted seconds, in milliseconds, 9 characters each."""
    return "".join(f"{percentile(sorted_values, pct) * 1e3:9.3f}" for pct in pcts)


def version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git(path: str, *args: str) -> str:
    """What ``git -C path ARGS`` prints (stripped), or "?" if it cannot say."""
    try:
        return subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_model() -> str:
    """The CPU's model name, from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe_machine() -> str:
    """The CPU, how many CPUs there are and how many this process may use, and the OS.

    Call it before pinning the process to a CPU: it counts the CPUs the run may use.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs ({usable} usable), "
        f"{platform.system()} {platform.release()}"
    )
