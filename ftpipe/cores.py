"""This process's share of the CPU cores. torch's intra-op pool assumes it owns every core: two
torch processes side by side on 2 cores each ran 2.3x slower than with one thread each. So
whatever runs beside others is given its share through OMP_NUM_THREADS (test workers by the
test session, torchrun processes by the launcher), and ftpipe sizes its own pools by it."""

from __future__ import annotations

import os


def available() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


def share() -> int:
    """This process's share: OMP_NUM_THREADS when set, else every core it may run on."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available()


def split_among(processes: int) -> int:
    """Threads for each of `processes` processes started together from this one."""
    return max(1, share() // max(1, processes))
