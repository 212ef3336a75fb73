"""The ``backup`` CALL: a consistent copy of the store, taken while the broker runs.

    CALL "backup" {"name": "2024-06-01.db"}
    -> {"name": ..., "path": ..., "bytes": N, "seconds": S}

The copy is made by SQLite's online backup API through a separate read-only
connection (``SqliteStore.backup``): one snapshot of committed state, taken
after the call starts, so it holds every message confirmed before the call
and no half-done transaction, while publishes, acks and commits go on.

Where it goes: the client gives a file NAME, never a path. The broker writes
as its own OS user, and a path would let anyone with admin rights (every
local account when no users are configured) overwrite any file that user
can write: the audit log, the config, ``~/.ssh/authorized_keys``. So:

- the copy is written only into the backup directory (setting
  ``backup_dir``, default ``<data_dir>/backups``; created mode 0700 if
  missing; it must belong to the broker's user, not be writable by others,
  and not be the data directory itself);
- ``name`` is 1..128 characters of ``A-Z a-z 0-9 . _ -`` starting with a
  letter or digit: no separators, no ``..``, no control characters (a
  newline must not forge a log line);
- an existing file is never replaced (CONFLICT), and nothing follows a
  symlink: the copy is created exclusively (O_EXCL|O_NOFOLLOW, mode 0600)
  under a temporary name, fsynced, hard-linked to ``name`` (which fails
  rather than replace anything) and the directory fsynced;
- refusals never say anything about files outside the backup directory.

Only one backup runs at a time. The call is audited (``Broker.call``).
Errors: INVALID_ARGUMENT (bad name or argument), CONFLICT (file exists /
backup running), STORAGE_ERROR (the backup directory is unusable, or the
copy failed).

Wire it with :func:`backup_handler` (one handler per broker: it owns the
"one at a time" state).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.durable.store.base import StorageError

if TYPE_CHECKING:
    from tidings.broker.config import Config
    from tidings.broker.durable.core import Durable

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


class Backupable(Protocol):
    """What a backup reads of the broker (ops/ does not import the composition root):
    its settings (``backup_dir``) and the durable layer's store."""

    @property
    def config(self) -> Config: ...

    @property
    def durable(self) -> Durable: ...

#: A backup's file name: 128 characters leave room for the temporary name's suffix
#: within NAME_MAX (255); the character set keeps separators, "..", control and
#: other invisible characters out of paths, logs and terminals.
MAX_NAME: Final = 128
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (MAX_NAME - 1))
NAME_RULE: Final = (f"a file name of 1 to {MAX_NAME} characters from A-Z a-z 0-9 . _ - starting with a "
                    "letter or digit, written to the broker's backup directory (setting backup_dir)")
#: Mode of a backup directory the broker creates.
DIR_MODE: Final = 0o700


def _err(msg: str, code: ErrorCode, rid: int) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


def check_name(args: dict[str, Any]) -> tuple[str | None, str]:
    """(name, "") for valid arguments, else (None, why). Pure: touches no file, so a
    refusal cannot depend on (or reveal) what exists on the broker's machine."""
    if "path" in args:
        return None, f"backup takes 'name', not 'path': {NAME_RULE}"
    extra = sorted(str(k) for k in args if k != "name")
    if extra:
        return None, f"unknown backup argument(s) {', '.join(extra)[:100]}: backup takes only 'name'"
    name = args.get("name")
    if not isinstance(name, str) or not name:
        return None, f"backup needs 'name': {NAME_RULE}"
    if any(not ch.isprintable() for ch in name):
        return None, f"backup name contains control characters; it must be {NAME_RULE}"
    if "/" in name or "\\" in name or name in (".", ".."):
        return None, f"backup name must be a file name, not a path: {NAME_RULE}"
    if not NAME.fullmatch(name):
        return None, f"bad backup name; it must be {NAME_RULE}"
    return name, ""


def _prepare(directory: str, store_path: str, name: str) -> tuple[ErrorCode, str] | str:
    """Runs in a worker thread. Make sure the backup directory exists and only the
    broker's user can change it; return the copy's full path, or a refusal."""
    try:
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        real = os.path.realpath(directory)
        st = os.stat(real, follow_symlinks=False)
    except OSError as exc:
        return ErrorCode.STORAGE_ERROR, f"backup directory {directory} is unusable: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return ErrorCode.STORAGE_ERROR, f"backup directory {directory} is not a directory"
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return ErrorCode.STORAGE_ERROR, (
            f"backup directory {directory} must belong to the broker's user and not be writable by "
            "group or others (someone else could plant files or symlinks in it)")
    if real == os.path.realpath(os.path.dirname(os.path.abspath(store_path))):
        return ErrorCode.STORAGE_ERROR, "backup_dir must not be the data directory itself"
    path = os.path.join(real, name)
    if os.path.lexists(path):
        return ErrorCode.CONFLICT, (f"backup {name} already exists; backups never replace a file, "
                                    "choose a new name")
    return path


async def backup_call(broker: Backupable, args: dict[str, Any], rid: int, *, running: set[str]) -> dict[str, Any]:
    """Copy the broker's store to ``args["name"]`` in its backup directory; see the
    module docstring. ``running`` is the handler's set of backups in progress (one
    at a time). Raises RemoteProtocolError with the codes listed above.
    """
    name, why = check_name(args)
    if name is None:
        raise _err(why, ErrorCode.INVALID_ARGUMENT, rid)
    if running:
        raise _err(f"a backup is already running (to {next(iter(running))})", ErrorCode.CONFLICT, rid)
    store = broker.durable.store
    running.add(name)
    try:
        prepared = await anyio.to_thread.run_sync(_prepare, broker.config.backup_path, store.path, name)
        if isinstance(prepared, tuple):
            raise _err(prepared[1], prepared[0], rid)
        path = prepared
        started = time.perf_counter()
        try:
            await store.backup(path)
        except StorageError as exc:
            log.error("backup %s failed: %s", name, exc)
            raise _err(f"backup failed: {exc}", ErrorCode.STORAGE_ERROR, rid) from exc
        seconds = time.perf_counter() - started
        size = (await anyio.to_thread.run_sync(os.stat, path)).st_size
    finally:
        running.discard(name)
    log.info("backup to %s: %d bytes in %.3f s", path, size, seconds)
    return {"name": name, "path": path, "bytes": size, "seconds": round(seconds, 3)}


def backup_handler(broker: Backupable) -> Handler:
    """The ``backup`` method for ``Broker._durable_calls`` (called as ``h(args, rid)``)."""
    running: set[str] = set()

    async def handler(args: dict[str, Any], rid: int) -> dict[str, Any]:
        return await backup_call(broker, args, rid, running=running)

    return handler
