"""The ``backup`` CALL: a consistent copy of the store, taken while the broker runs.

    CALL "backup" {"path": "/abs/path/on/the/broker/host.db", "overwrite": false}
    -> {"path": ..., "bytes": N, "seconds": S}

The copy is made by SQLite's online backup API through a separate read-only
connection (``SqliteStore.backup``): one snapshot of committed state, taken
after the call starts, so it holds every message confirmed before the call
and no half-done transaction, while publishes, acks and commits go on. The
copy is written beside ``path`` and renamed over it at the end, so ``path``
never holds a partial file.

``path`` names a file on the broker's machine (the broker writes it, as the
broker's user), not on the caller's: it must be absolute, its directory must
exist, and an existing file is replaced only with ``overwrite``. The live
database and its companion files are refused. Only one backup runs at a time.
Errors: INVALID_ARGUMENT (bad path), CONFLICT (file exists / backup running),
NOT_FOUND (no such directory), STORAGE_ERROR (the copy failed).

Wire it with :func:`backup_handler` (one handler per broker: it owns the
"one at a time" state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from protocol.errors import ErrorCode, RemoteProtocolError

from .store.base import StorageError

if TYPE_CHECKING:
    from .server import Broker

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


def _err(msg: str, code: ErrorCode, rid: int) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


def _check_target(path: str, store_path: str, overwrite: bool) -> tuple[ErrorCode, str] | None:
    """Runs in a worker thread (it touches the filesystem). Returns a refusal
    (code, message), or None when ``path`` may be written."""
    real = os.path.realpath(path)
    live = os.path.realpath(store_path)
    if real in {live + suffix for suffix in ("", "-wal", "-shm", "-journal", ".lock")}:
        return ErrorCode.INVALID_ARGUMENT, f"{path} is the live database (or one of its files); choose another path"
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return ErrorCode.NOT_FOUND, f"directory {parent} does not exist on the broker's machine"
    if os.path.isdir(path):
        return ErrorCode.INVALID_ARGUMENT, f"{path} is a directory; give a file name"
    if os.path.lexists(path) and not overwrite:
        return ErrorCode.CONFLICT, f"{path} already exists; pass overwrite to replace it"
    return None


async def backup_call(broker: Broker, args: dict[str, Any], rid: int, *, running: set[str]) -> dict[str, Any]:
    """Copy the broker's store to ``args["path"]``; see the module docstring.

    ``running`` is the handler's set of backups in progress (one at a time).
    Raises RemoteProtocolError with the codes listed above.
    """
    path = args.get("path")
    overwrite = args.get("overwrite", False)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise _err("backup needs 'path': the absolute path of the copy on the broker's machine",
                   ErrorCode.INVALID_ARGUMENT, rid)
    if not os.path.isabs(path):
        raise _err(f"backup path {path!r} is relative: it names a file on the broker's machine, "
                   "so it must be absolute", ErrorCode.INVALID_ARGUMENT, rid)
    if type(overwrite) is not bool:
        raise _err("overwrite must be true or false", ErrorCode.INVALID_ARGUMENT, rid)
    if running:
        raise _err(f"a backup is already running (to {next(iter(running))})", ErrorCode.CONFLICT, rid)
    path = os.path.normpath(path)
    store = broker.durable.store
    running.add(path)
    try:
        refusal = await anyio.to_thread.run_sync(_check_target, path, store.path, overwrite)
        if refusal is not None:
            raise _err(refusal[1], refusal[0], rid)
        started = time.perf_counter()
        try:
            await store.backup(path)
        except StorageError as exc:
            log.error("backup to %s failed: %s", path, exc)
            raise _err(f"backup failed: {exc}", ErrorCode.STORAGE_ERROR, rid) from exc
        seconds = time.perf_counter() - started
        size = (await anyio.to_thread.run_sync(os.stat, path)).st_size
    finally:
        running.discard(path)
    log.info("backup to %s: %d bytes in %.3f s", path, size, seconds)
    return {"path": path, "bytes": size, "seconds": round(seconds, 3)}


def backup_handler(broker: Broker) -> Handler:
    """The ``backup`` method for ``Broker._durable_calls`` (called as ``h(args, rid)``)."""
    running: set[str] = set()

    async def handler(args: dict[str, Any], rid: int) -> dict[str, Any]:
        return await backup_call(broker, args, rid, running=running)

    return handler
