"""An exclusive lock on a data directory, so two brokers never share one database.

SQLite would let two processes write the same file in turn, each believing it
owns every queue; the second broker must refuse to start instead. The lock is
an advisory flock(2) on `<db>.lock`: the kernel drops it when the process dies,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import os

from broker.store.base import StorageError

try:
    import fcntl
except ImportError:  # Windows: no flock; the data directory is then not guarded
    fcntl = None  # type: ignore[assignment]


class LockFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StorageError if another holder has it."""
        if self._fd is not None or fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"{self.path} is locked: another tidings process is using this data directory") from exc
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
