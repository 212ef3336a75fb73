"""Process-wide resource limits: the memory high-water mark and the free-disk low-water mark.

One :class:`ResourceMonitor` per broker runs in the root task group and
checks, every ``interval`` seconds, the process's resident set size (one
read of /proc/self/statm) and the free space of the data directory's disk
(one statvfs). Both are cheap enough to run often and far too costly to
run per message, so the hot paths only read the two flags it keeps:

* ``memory_high``: RSS is above ``memory_high_water``. Connection actors
  stop processing PUB frames (and so stop reading those sockets: TCP
  backpressure reaches the publishers) until it clears; everything else,
  consumers draining their deliveries and acking, keeps going.
* ``disk_low``: free space is below ``min_free_disk``. Durable publishes
  are refused with STORAGE_FULL before they reach the store, so SQLite
  never meets ENOSPC in the middle of a commit; pub/sub is unaffected.

A limit of 0 turns its check off. Both flags change only here, owned by
the event loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Final

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

STATM: Final = "/proc/self/statm"  # "size resident shared ...", in pages (Linux)


def read_rss() -> int | None:
    """This process's resident set size in bytes, or None where /proc is missing."""
    try:
        with open(STATM, "rb") as fh:
            fields = fh.read(256).split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


class ResourceMonitor:
    """Keeps the ``memory_high`` and ``disk_low`` flags up to date."""

    def __init__(self, *, memory_high_water: int, min_free_disk: int, data_dir: str,
                 interval: float) -> None:
        self.memory_high_water = memory_high_water
        self.min_free_disk = min_free_disk
        self.data_dir = data_dir
        self.interval = interval
        self.memory_high = False
        self.disk_low = False
        self.rss = 0
        self.disk_free: int | None = None
        self.paused_readers = 0  # connection readers waiting for memory_high to clear, right now
        self.pauses = 0  # times a reader paused, since start
        self._memory_ok = anyio.Event()
        self._memory_ok.set()
        self._warned_rss = False

    def check(self) -> None:
        """Take one measurement and update the flags (logging each change)."""
        if self.memory_high_water:
            rss = read_rss()
            if rss is None:
                if not self._warned_rss:
                    self._warned_rss = True
                    log.warning("cannot read %s: memory_high_water is not enforced on this system", STATM)
            else:
                self.rss = rss
                self.set_memory_high(rss > self.memory_high_water)
        if self.min_free_disk:
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError as exc:
                log.warning("cannot measure free disk space of %s: %s", self.data_dir, exc)
            else:
                self.disk_free = free
                low = free < self.min_free_disk
                if low != self.disk_low:
                    self.disk_low = low
                    if low:
                        log.warning("free disk space %d bytes is below min_free_disk %d: refusing durable "
                                    "publishes", free, self.min_free_disk)
                    else:
                        log.warning("free disk space %d bytes is above min_free_disk again: durable publishes "
                                    "accepted", free)

    def set_memory_high(self, high: bool) -> None:
        """Raise or clear the memory flag (the periodic check calls this; tests may too)."""
        if high == self.memory_high:
            return
        self.memory_high = high
        if high:
            self._memory_ok = anyio.Event()
            log.warning("resident memory %d bytes is above memory_high_water %d: pausing publishers",
                        self.rss, self.memory_high_water)
        else:
            self._memory_ok.set()
            log.warning("resident memory %d bytes is below memory_high_water again: publishers resume", self.rss)

    @contextlib.contextmanager
    def reader_paused(self) -> Iterator[None]:
        """Count a connection reader as paused for memory while the block runs."""
        self.paused_readers += 1
        self.pauses += 1
        try:
            yield
        finally:
            self.paused_readers -= 1

    async def wait_memory_ok(self) -> None:
        """Return once ``memory_high`` is clear (at once if it is)."""
        while self.memory_high:
            await self._memory_ok.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check now, then every ``interval`` seconds until cancelled."""
        self.check()
        task_status.started()
        if not (self.memory_high_water or self.min_free_disk):
            return
        while True:
            await anyio.sleep(self.interval)
            self.check()

    def snapshot(self) -> dict[str, object]:
        return {"rss": self.rss, "memory_high_water": self.memory_high_water, "memory_high": self.memory_high,
                "paused_readers": self.paused_readers, "pauses": self.pauses,
                "disk_free": self.disk_free, "min_free_disk": self.min_free_disk, "disk_low": self.disk_low}
