"""An exclusive lock on a data directory, so two brokers never share one database.

SQLite would let two processes write the same file in turn, each believing it
owns every queue; the second broker must refuse to start instead. The lock is
an advisory flock(2) on `<db>.lock`: the kernel drops it when the process dies,
so a crash never leaves a stale lock behind. The file is mode 0600 and must
belong to the broker's OS user: a lock file another user owns is refused,
since that user could hold the lock and keep the broker from starting.
"""

from __future__ import annotations

import logging
import os

from tidings.broker.durable.store.base import StorageError

try:
    import fcntl
except ImportError:  # Windows: no flock; the data directory is then not guarded
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class LockFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StorageError if another holder has it, or if the
        file belongs to another OS user (who could hold it and stop this broker)."""
        if self._fd is not None or fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._check_owner(os.lstat(self.path) if os.path.lexists(self.path) else None)
            raise StorageError(f"cannot create lock file {self.path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            self._check_owner(st)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                log.warning("lock file %s was mode %03o; now 0600", self.path, st.st_mode & 0o777)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except StorageError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"{self.path} is locked: another tidings process is using this data directory") from exc
        self._fd = fd

    def _check_owner(self, st: os.stat_result | None) -> None:
        if st is not None and st.st_uid != os.geteuid():
            raise StorageError(
                f"lock file {self.path} belongs to uid {st.st_uid}, not to this broker's user "
                f"(uid {os.geteuid()}): another OS user created it and could hold it; remove it, "
                "or give the data directory back to the broker's user")

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
