"""The read side of PostgresStore: recovery, paging, dedup look-ups, streams.

Reads run on a small pool of connections of their own, beside the actor's
writer connection. PostgreSQL's MVCC gives each statement a snapshot of what
was committed when it started: a read never sees a transaction in progress,
and sees every operation whose on_done already fired (the callback runs after
COMMIT returned). A byte-bounded page reads sizes then rows in one REPEATABLE
READ transaction, so both see the same snapshot.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Final

import msgpack

from tidings.broker.durable.store.base import PageKey, StorageClosed, StorageError, StoredMessage, StreamRow

if TYPE_CHECKING:
    import asyncpg

_COLUMNS: Final = ("queue, id, subject, payload, headers, msg_id, published_ms, available_ms,"
                   " expires_ms, deliveries, last_error, priority")
_STREAM_COLUMNS: Final = 'stream, partition, "offset", subject, key, payload, headers, msg_id, timestamp_ms'


#: Recovery (PostgresStore.open), one statement per mark (each an index range up to it).
RECOVER_PLAIN: Final = ("UPDATE tidings_messages SET deliveries = 1 WHERE queue = $1"
                        " AND (available_ms, id) <= ($2, $3) AND deliveries = 0 AND priority IS NULL")
RECOVER_LANE: Final = ("UPDATE tidings_messages SET deliveries = 1 WHERE queue = $1 AND priority = $4"
                       " AND (available_ms, id) <= ($2, $3) AND deliveries = 0")


async def recover_delivery_marks(conn: asyncpg.Connection) -> int:
    """Apply every stored delivery mark (at open), in one transaction; returns how
    many messages now count one delivery (as reads.recover_delivery_marks)."""
    n = 0
    async with conn.transaction():
        for queue, lane, available_ms, id_ in await conn.fetch(
                "SELECT queue, lane, available_ms, id FROM tidings_queue_marks"):
            if lane < 0:
                status = await conn.execute(RECOVER_PLAIN, queue, available_ms, id_)
            else:
                status = await conn.execute(RECOVER_LANE, queue, available_ms, id_, lane)
            n += int(status.split()[-1])
    return n


def decode_message(r: Any) -> StoredMessage:
    h = r[4]
    return StoredMessage(r[0], r[1], r[2], bytes(r[3]), None if h is None else msgpack.unpackb(h, raw=False),
                         r[5], r[6], r[7], r[8], r[9], r[10], r[11])


def decode_stream_row(t: Any) -> StreamRow:
    h = t[6]
    return StreamRow(t[0], t[1], t[2], t[3], t[4], bytes(t[5]), None if h is None else msgpack.unpackb(h, raw=False),
                     t[7], t[8])


class PgReads:
    """Reads, mixed into PostgresStore (which provides `_pool`, `path`, `_translate`)."""

    path: str
    _pool: asyncpg.Pool | None

    def _translate(self, exc: BaseException) -> StorageError:  # provided by PostgresStore
        raise NotImplementedError

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """All rows of one query. Raises StorageClosed, or StorageError on failure."""
        pool = self._pool
        if pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        try:
            async with pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    async def _fetch_page(self, columns: str, rest: str, params: list[Any], limit: int, max_bytes: int | None,
                          min_rows: int) -> list[Any]:
        """The first rows of ``SELECT columns rest`` (``rest`` ends in ``LIMIT $n``, n =
        len(params) + 1): at most ``limit``, and beyond ``min_rows`` only while their
        payloads add up to at most ``max_bytes`` (see Reads._fetch_page)."""
        if max_bytes is None:
            return await self._fetch(f"SELECT {columns} {rest}", *params, limit)
        pool = self._pool
        if pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        try:
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                sizes = await conn.fetch(f"SELECT octet_length(payload) {rest}", *params, limit)
                total = fit = 0
                for (size,) in sizes:
                    total += size
                    if fit >= min_rows and total > max_bytes:
                        break
                    fit += 1
                if not fit:
                    return []
                return list(await conn.fetch(f"SELECT {columns} {rest}", *params, fit))
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    # --- queues ----------------------------------------------------------------------

    async def check_dedup(self, msg_ids: list[str], now_ms: int | None = None) -> dict[str, bytes]:
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        if not msg_ids:
            if self._pool is None:
                raise StorageClosed(f"store {self.path} is closed")
            return {}
        rows = await self._fetch("SELECT msg_id, result FROM tidings_dedup WHERE expires_ms > $1"
                                 " AND msg_id = ANY($2::text[])", now_ms, list(msg_ids))
        return {r[0]: bytes(r[1]) for r in rows}

    async def load_queues(self) -> list[tuple[str, dict[str, Any], int]]:
        rows = await self._fetch("SELECT name, config, created_ms FROM tidings_queues ORDER BY name COLLATE \"C\"")
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    async def load_messages(self, queue: str, after: PageKey | None = None, *,
                            due_before_ms: int | None = None, limit: int = 1000,
                            max_bytes: int | None = None, min_rows: int = 1,
                            priority: int | None = None) -> list[StoredMessage]:
        where = ["queue = $1"]
        params: list[Any] = [queue]
        if priority is not None:  # one lane of a priority queue (index tidings_messages_priority)
            where.append(f"priority = ${len(params) + 1}")
            params.append(priority)
        if after is not None:
            where.append(f"(available_ms, id) > (${len(params) + 1}, ${len(params) + 2})")
            params += [after[0], after[1]]
        if due_before_ms is not None:
            where.append(f"available_ms <= ${len(params) + 1}")
            params.append(due_before_ms)
        rows = await self._fetch_page(
            _COLUMNS, f"FROM tidings_messages WHERE {' AND '.join(where)} ORDER BY available_ms, id"
            f" LIMIT ${len(params) + 1}", params, limit, max_bytes, min_rows)
        return [decode_message(r) for r in rows]

    async def next_available_ms(self, queue: str, after: PageKey | None = None,
                                priority: int | None = None) -> int | None:
        if priority is not None:
            lo = after if after is not None else (-1, -1)
            rows = await self._fetch(
                "SELECT available_ms FROM tidings_messages WHERE queue = $1 AND priority = $2"
                " AND (available_ms, id) > ($3, $4) ORDER BY available_ms, id LIMIT 1", queue, priority, lo[0], lo[1])
            return rows[0][0] if rows else None
        if after is None:
            rows = await self._fetch("SELECT min(available_ms) FROM tidings_messages WHERE queue = $1", queue)
        else:
            rows = await self._fetch(
                "SELECT available_ms FROM tidings_messages WHERE queue = $1 AND (available_ms, id) > ($2, $3)"
                " ORDER BY available_ms, id LIMIT 1", queue, after[0], after[1])
        return rows[0][0] if rows else None

    async def count(self, queue: str, priority: int | None = None) -> int:
        if priority is not None:
            rows = await self._fetch("SELECT count(*) FROM tidings_messages WHERE queue = $1 AND priority = $2",
                                     queue, priority)
            return int(rows[0][0])
        rows = await self._fetch("SELECT count(*) FROM tidings_messages WHERE queue = $1", queue)
        return int(rows[0][0])

    async def oldest(self, queue: str, n: int) -> list[StoredMessage]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM tidings_messages WHERE queue = $1 ORDER BY id LIMIT $2", queue, n)
        return [decode_message(r) for r in rows]

    async def list_messages(self, queue: str, limit: int = 100, offset: int = 0) -> list[StoredMessage]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM tidings_messages WHERE queue = $1 ORDER BY id LIMIT $2 OFFSET $3",
            queue, limit, offset)
        return [decode_message(r) for r in rows]

    # --- the schema registry -----------------------------------------------------------

    async def load_schemas(self) -> list[tuple[str, int, Any, str, int]]:
        rows = await self._fetch("SELECT name, version, document, compatibility, created_ms FROM tidings_schemas"
                                 " ORDER BY name COLLATE \"C\", version")
        return [(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def load_schema_bindings(self) -> list[tuple[str, str, str, str | None, int]]:
        rows = await self._fetch("SELECT pattern, schema, on_invalid, dead_letter, created_ms"
                                 " FROM tidings_schema_bindings ORDER BY pattern COLLATE \"C\"")
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    # --- streams ---------------------------------------------------------------------

    async def load_streams(self) -> list[tuple[str, dict[str, Any], int]]:
        rows = await self._fetch("SELECT name, config, created_ms FROM tidings_streams ORDER BY name COLLATE \"C\"")
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    async def partition_bounds(self, stream: str) -> dict[int, tuple[int, int, int]]:
        rows = await self._fetch(
            'SELECT partition, min("offset"), max("offset"), sum(octet_length(payload) + 64)'
            " FROM tidings_stream_messages WHERE stream = $1 GROUP BY partition", stream)
        return {r[0]: (r[1], r[2], int(r[3] or 0)) for r in rows}

    async def partition_floors(self, stream: str) -> dict[int, int]:
        rows = await self._fetch("SELECT partition, first FROM tidings_stream_floors WHERE stream = $1", stream)
        return {r[0]: r[1] for r in rows}

    async def partition_marks(self, stream: str) -> dict[int, int]:
        rows = await self._fetch("SELECT partition, next FROM tidings_stream_next WHERE stream = $1", stream)
        return {r[0]: r[1] for r in rows}

    async def read_partition(self, stream: str, partition: int, from_offset: int, limit: int,
                             max_bytes: int | None = None, min_rows: int = 1) -> list[StreamRow]:
        rows = await self._fetch_page(
            _STREAM_COLUMNS, 'FROM tidings_stream_messages WHERE stream = $1 AND partition = $2 AND "offset" >= $3'
            ' ORDER BY "offset" LIMIT $4', [stream, partition, from_offset], limit, max_bytes, min_rows)
        return [decode_stream_row(r) for r in rows]

    async def offset_for_time(self, stream: str, partition: int, ts_ms: int) -> int | None:
        rows = await self._fetch(
            'SELECT min("offset") FROM tidings_stream_messages WHERE stream = $1 AND partition = $2'
            " AND timestamp_ms >= $3", stream, partition, ts_ms)
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def load_offsets(self, stream: str) -> dict[str, dict[int, tuple[int, int]]]:
        rows = await self._fetch(
            "SELECT grp, partition, committed, delivered FROM tidings_stream_offsets WHERE stream = $1", stream)
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for g, p, c, d in rows:
            out.setdefault(g, {})[p] = (c, d)
        return out

    async def cutoff_by_age(self, stream: str, partition: int, before_ms: int) -> int | None:
        rows = await self._fetch(
            'SELECT max("offset") FROM tidings_stream_messages WHERE stream = $1 AND partition = $2'
            " AND timestamp_ms < $3", stream, partition, before_ms)
        return rows[0][0] + 1 if rows and rows[0][0] is not None else None

    async def cutoff_by_bytes(self, stream: str, partition: int, max_bytes: int) -> int | None:
        rows = await self._fetch(
            'SELECT "offset" FROM (SELECT "offset", sum(octet_length(payload) + 64) OVER (ORDER BY "offset" DESC'
            " ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS total FROM tidings_stream_messages"
            ' WHERE stream = $1 AND partition = $2) AS t WHERE total > $3 ORDER BY "offset" DESC LIMIT 1',
            stream, partition, max_bytes)
        return rows[0][0] + 1 if rows else None
