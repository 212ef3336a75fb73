"""The read side of SqliteStore: recovery, paging, dedup look-ups, backup.

Every read runs on the store's one connection while holding the lock the actor
holds for each transaction, so it sees exactly what is committed: never a
transaction in progress, and every operation whose on_done already fired.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio
import msgpack

from tidings.broker.durable.store.base import PageKey, StorageClosed, StorageError, StorageFull, StoredMessage

#: msg_ids per dedup query: under SQLITE_MAX_VARIABLE_NUMBER, which is only 999 before SQLite 3.32.
DEDUP_CHUNK: Final = 900

_COLUMNS: Final = ("queue, id, subject, payload, headers, msg_id, published_ms, available_ms,"
                   " expires_ms, deliveries, last_error, priority")


#: Recovery of delivery counts (store.base.MarkDelivered): a message at or below its
#: lane's mark that still says 0 deliveries was delivered once (counted, never lower
#: than the truth). Both walk an index from the queue's first key up to the mark.
RECOVER_PLAIN: Final = ("UPDATE messages SET deliveries = 1 WHERE queue = ?1 AND (available_ms, id) <= (?2, ?3)"
                        " AND deliveries = 0 AND priority IS NULL")
RECOVER_LANE: Final = ("UPDATE messages SET deliveries = 1 WHERE queue = ?1 AND priority = ?4"
                       " AND (available_ms, id) <= (?2, ?3) AND deliveries = 0")


async def recover_delivery_marks(conn: aiosqlite.Connection) -> int:
    """Apply every stored delivery mark (at open, before any read) in one
    transaction; returns how many messages now count one delivery. The marks
    stay: applying them again changes nothing. Raises sqlite3.Error."""
    marks = list(await conn.execute_fetchall("SELECT queue, lane, available_ms, id FROM queue_marks"))
    if not marks:
        return 0
    n = 0
    await conn.execute("BEGIN IMMEDIATE")
    try:
        for queue, lane, available_ms, id_ in marks:
            if lane < 0:
                cur = await conn.execute(RECOVER_PLAIN, (queue, available_ms, id_))
            else:
                cur = await conn.execute(RECOVER_LANE, (queue, available_ms, id_, lane))
            n += max(0, cur.rowcount)
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with anyio.CancelScope(shield=True):
                await conn.execute("ROLLBACK")
        raise
    return n


def translate(exc: sqlite3.Error) -> StorageError:
    """Map an sqlite3 error to StorageFull (SQLITE_FULL) or StorageError, chained to it."""
    code = getattr(exc, "sqlite_errorcode", None)
    err: StorageError
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        err = StorageFull(f"storage full: {exc}")
    else:
        err = StorageError(f"storage error: {exc}")
    err.__cause__ = exc
    return err


def decode_message(r: Any) -> StoredMessage:
    """A StoredMessage from a row of _COLUMNS."""
    h = r[4]
    return StoredMessage(r[0], r[1], r[2], r[3], None if h is None else msgpack.unpackb(h, raw=False),
                         r[5], r[6], r[7], r[8], r[9], r[10], r[11])


class Reads:
    path: str

    def __init__(self) -> None:
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()  # held by each transaction and each read

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """All rows of one query. Raises StorageClosed, or StorageError (StorageFull) on failure."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StorageClosed(f"store {self.path} is closed")
            try:
                return list(await conn.execute_fetchall(sql, tuple(params)))
            except sqlite3.Error as exc:
                raise translate(exc) from exc

    async def _fetch_page(self, columns: str, rest: str, params: list[Any], limit: int, max_bytes: int | None,
                          min_rows: int) -> list[Any]:
        """The first rows of ``SELECT columns rest`` (``rest`` is "FROM ... ORDER BY
        ... LIMIT ?" over a table with a ``payload`` column): at most ``limit``, and
        beyond ``min_rows`` only while their payloads add up to at most ``max_bytes``
        (None: no byte bound).

        With a byte bound the sizes are read first (``length()`` of a blob reads
        no payload), then exactly the rows that fit, both under one hold of the
        lock so they see the same committed state."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StorageClosed(f"store {self.path} is closed")
            try:
                if max_bytes is not None:
                    sizes = await conn.execute_fetchall(f"SELECT length(payload) {rest}", (*params, limit))
                    total = 0
                    fit = 0
                    for (size,) in sizes:
                        total += size
                        if fit >= min_rows and total > max_bytes:
                            break
                        fit += 1
                    limit = fit
                    if not limit:
                        return []
                return list(await conn.execute_fetchall(f"SELECT {columns} {rest}", (*params, limit)))
            except sqlite3.Error as exc:
                raise translate(exc) from exc

    async def check_dedup(self, msg_ids: list[str], now_ms: int | None = None) -> dict[str, bytes]:
        """Stored results for those of `msg_ids` that have a dedup entry that has not
        expired at `now_ms` (default: the wall clock), i.e. whose expires_ms > now_ms."""
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        found: dict[str, bytes] = {}
        for start in range(0, len(msg_ids), DEDUP_CHUNK):
            chunk = msg_ids[start:start + DEDUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = await self._fetch(
                f"SELECT msg_id, result FROM dedup WHERE expires_ms > ? AND msg_id IN ({marks})",
                [now_ms, *chunk])
            found.update((r[0], r[1]) for r in rows)
        return found

    async def load_queues(self) -> list[tuple[str, dict[str, Any], int]]:
        """Every queue as (name, config, created_ms), by name."""
        rows = await self._fetch("SELECT name, config, created_ms FROM queues ORDER BY name")
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    async def load_messages(self, queue: str, after: PageKey | None = None, *,
                            due_before_ms: int | None = None, limit: int = 1000,
                            max_bytes: int | None = None, min_rows: int = 1,
                            priority: int | None = None) -> list[StoredMessage]:
        """Up to `limit` messages of `queue` in delivery order, (available_ms, id),
        strictly after the cursor `after` (the key of the last message already read).
        With `due_before_ms`, only messages with available_ms <= due_before_ms
        (inclusive: a message available at that instant is due). With `max_bytes`,
        beyond the first `min_rows` only as many as keep their payloads within it.
        With `priority`, only that priority's messages (index messages_priority)."""
        where = ["queue = ?"]
        params: list[Any] = [queue]
        if priority is not None:
            where.append("priority = ?")
            params.append(priority)
        if after is not None:
            where.append("(available_ms, id) > (?, ?)")
            params += [after[0], after[1]]
        if due_before_ms is not None:
            where.append("available_ms <= ?")
            params.append(due_before_ms)
        rows = await self._fetch_page(
            _COLUMNS, f"FROM messages WHERE {' AND '.join(where)} ORDER BY available_ms, id LIMIT ?",
            params, limit, max_bytes, min_rows)
        return [decode_message(r) for r in rows]

    async def next_available_ms(self, queue: str, after: PageKey | None = None,
                                priority: int | None = None) -> int | None:
        """The available_ms of the first message of `queue` after the cursor, or None if none."""
        if priority is not None:
            lo = after if after is not None else (-1, -1)
            rows = await self._fetch(
                "SELECT available_ms FROM messages WHERE queue = ? AND priority = ? AND (available_ms, id) > (?, ?)"
                " ORDER BY available_ms, id LIMIT 1", [queue, priority, lo[0], lo[1]])
            return rows[0][0] if rows else None
        if after is None:
            rows = await self._fetch("SELECT min(available_ms) FROM messages WHERE queue = ?", [queue])
        else:
            rows = await self._fetch(
                "SELECT available_ms FROM messages WHERE queue = ? AND (available_ms, id) > (?, ?)"
                " ORDER BY available_ms, id LIMIT 1", [queue, after[0], after[1]])
        return rows[0][0] if rows else None

    async def count(self, queue: str, priority: int | None = None) -> int:
        """How many messages `queue` holds. Scans the queue's index: O(length); for recovery and admin."""
        if priority is not None:
            rows = await self._fetch("SELECT count(*) FROM messages WHERE queue = ? AND priority = ?",
                                     [queue, priority])
            return int(rows[0][0])
        rows = await self._fetch("SELECT count(*) FROM messages WHERE queue = ?", [queue])
        return int(rows[0][0])

    async def oldest(self, queue: str, n: int) -> list[StoredMessage]:
        """The `n` messages of `queue` with the smallest ids (the oldest: ids grow with time)."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? ORDER BY id LIMIT ?", [queue, n])
        return [decode_message(r) for r in rows]

    async def list_messages(self, queue: str, limit: int = 100, offset: int = 0) -> list[StoredMessage]:
        """A page of `queue` by id (peeking a dead-letter queue). O(offset + limit)."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? ORDER BY id LIMIT ? OFFSET ?",
            [queue, limit, offset])
        return [decode_message(r) for r in rows]

    async def backup(self, path: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the database to `path`, a file that must not
        exist yet, while the store keeps running.

        The copy is one snapshot of committed state, taken after the call starts:
        it holds every write confirmed before the call and none half-done. It is
        read through a separate read-only connection, so commits continue during
        the copy (WAL readers do not block the writer; but the WAL cannot be
        checkpointed past the snapshot until the copy ends, so it grows meanwhile).

        The copy goes to a temporary file beside `path`, created exclusively (never
        through a symlink, mode 0600), is fsynced, hard-linked to `path` (which fails
        rather than replace an existing file) and the directory is fsynced: once this
        returns, `path` is complete and survives a power loss, and it never holds a
        partial file. Raises StorageError (also if `path` exists).
        """
        if self._conn is None:
            raise StorageClosed(f"store {self.path} is closed")
        dest = os.path.abspath(os.fspath(path))
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{secrets.token_hex(8)}.tmp")
        created = False
        try:
            await anyio.to_thread.run_sync(_create_exclusive, tmp)
            created = True
            src = await aiosqlite.connect(Path(self.path).absolute().as_uri() + "?mode=ro", uri=True)
            try:
                dst = await aiosqlite.connect(tmp)
                try:
                    await src.backup(dst)  # pages=0: one step, one read snapshot
                finally:
                    await dst.close()
            finally:
                await src.close()
            await anyio.to_thread.run_sync(_install, tmp, dest)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        except OSError as exc:
            raise StorageError(f"backup to {dest} failed: {exc}") from exc
        finally:
            if created:  # gone already when it was installed
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_remove_quietly, tmp)
                    await anyio.to_thread.run_sync(_remove_quietly, tmp + "-journal")


def _create_exclusive(path: str) -> None:
    """An empty file at `path` (SQLite takes it as an empty database): never an
    existing file, never through a symlink, readable by the broker's user only."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))


def _install(tmp: str, dest: str) -> None:
    """Make the finished copy `tmp` durable as `dest`, which must not exist."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, dest, follow_symlinks=False)  # atomic, and EEXIST instead of replacing
    os.unlink(tmp)
    fsync_dir(os.path.dirname(dest))


def fsync_dir(directory: str) -> None:
    """Make a directory's entries (a new name, a removed one) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
