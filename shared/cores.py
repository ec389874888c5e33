"""Cores shared by the workers of one host: a worker steps on all of them while the others
are idle, and on its share while they are busy.

A 1P+1D mesh on a 2-core laptop used to split the cores for good (one thread each): one
stream then decoded on one core while the other sat idle between prompts, so
disaggregated served 30 tok/s where colocated served 39. Here each worker holds a slot in
a small table in /dev/shm (`duet-cores-NAME`, 16 bytes a slot: pid, busy-until on the
host's monotonic clock). A worker about to step marks itself busy and counts the others
busy now; it takes cores // (1 + busy others) threads (at least 1, at most its cap). After
a step with more to come it stays marked for `linger_s` (a decode worker's gap between
steps is not idleness); with nothing left, it is idle at once. A killed worker's slot is freed by the next one that finds its pid gone.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import time
from pathlib import Path

import numpy as np

SLOTS = 256
SLOT = np.dtype([("pid", "<i8"), ("until", "<f8")])
BUSY = 1e18   # busy-until while a step runs: until end_step says otherwise


def cores_here() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"core share name {name!r} must be a plain file name")
    return Path("/dev/shm") / f"duet-cores-{name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


class CoreShare:
    def __init__(self, name: str, cap: int | None = None, linger_s: float = 0.02,
                 cores: int | None = None):
        self.path = share_path(name)
        self.cores = cores or cores_here()
        self.cap = max(1, min(cap or self.cores, self.cores))
        self.linger_s = linger_s
        self.pid = os.getpid()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size < SLOTS * SLOT.itemsize:
                os.ftruncate(fd, SLOTS * SLOT.itemsize)
            self._mm = mmap.mmap(fd, SLOTS * SLOT.itemsize)
            self.table = np.frombuffer(self._mm, dtype=SLOT)
            self.slot = self._claim()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _claim(self) -> int:
        pids = self.table["pid"]
        for i in range(SLOTS):
            p = int(pids[i])
            if p == 0 or p == self.pid or not _alive(p):
                self.table["until"][i] = 0.0
                pids[i] = self.pid
                return i
        raise RuntimeError(f"{self.path} has no free slot: {SLOTS} workers share this host")

    def busy_others(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        t = self.table
        busy = np.flatnonzero((t["pid"] != 0) & (t["until"] > now))
        n = 0
        for i in busy:
            if i == self.slot:
                continue
            pid = int(t["pid"][i])
            if _alive(pid):
                n += 1
            else:   # killed mid-step: free its slot so it stops counting
                t["until"][i] = 0.0
                t["pid"][i] = 0
        return n

    def begin_step(self) -> int:
        """Mark this worker busy; the threads its step should use now."""
        self.table["until"][self.slot] = BUSY
        return max(1, min(self.cap, self.cores // (1 + self.busy_others())))

    def end_step(self, more: bool = True) -> None:
        """The step is over; `more`: this worker has another step due (it stays counted for
        linger_s, so the gap between two decode steps is not mistaken for idleness). A
        worker with nothing left frees its cores at once: the next prompt's prefill, which
        a waiting client sends within milliseconds, then gets all of them."""
        self.table["until"][self.slot] = time.monotonic() + self.linger_s if more else 0.0

    def close(self) -> None:
        if self.table is None:
            return
        if int(self.table["pid"][self.slot]) == self.pid:
            self.table["until"][self.slot] = 0.0
            self.table["pid"][self.slot] = 0
        self.table = None
        try:
            self._mm.close()
        except BufferError:   # a numpy view still alive somewhere: the mapping goes at exit
            pass


def remove_share(name: str) -> None:
    """Remove the table (whoever started the workers, once they are gone)."""
    try:
        share_path(name).unlink()
    except FileNotFoundError:
        pass
