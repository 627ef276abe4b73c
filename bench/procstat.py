"""CPU time and memory of a process tree, read from /proc (Linux only).

CPU is utime + stime of every live process in the tree plus the cutime +
cstime of reaped children, so a worker that exits mid-run is still counted.
RSS is summed over the tree (shared pages count once per process, as ``ps``
shows them); the peak is sampled every ``interval`` seconds.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children(p))
    return seen


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14-17 of proc(5), counted from the state field (3) here: 11-14.
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Snapshot:
    cpu: float  # seconds
    rss: int  # bytes
    machine: float  # busy seconds of the whole machine, for what others ran meanwhile

    @classmethod
    def of(cls, *roots: int) -> Snapshot:
        """The process trees under ``roots`` together (several servers count as one)."""
        pids = [pid for root in roots for pid in tree(root)]
        return cls(cpu=cpu_seconds(pids), rss=rss_bytes(pids), machine=machine_busy_seconds())


class RssSampler:
    """Peak RSS of one or more process trees (summed), sampled in a thread until ``stop()``."""

    def __init__(self, *roots: int, interval: float = 0.1) -> None:
        if not roots:
            raise TypeError("RssSampler needs at least one process id")
        self.roots = roots
        self.interval = interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import time

        start = time.monotonic()
        while not self._stop.is_set():
            rss = rss_bytes([pid for root in self.roots for pid in tree(root)])
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - start, rss))
            self._stop.wait(self.interval)
