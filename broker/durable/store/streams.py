"""SQLite's stream storage: the schema steps, the SQL of the stream write
operations, the row encoding and the reads.

The rows and the operations themselves (StreamRow, PutStream, DeleteStream,
CommitOffsets, MarkStreamNext, TrimStream) are part of the store contract and
live in base.py; they are re-exported here. Committed group offsets live in
stream_offsets.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

import msgpack

# The contract's stream types, re-exported for the modules that import them from here.
from tidings.broker.durable.store.base import CommitOffsets as CommitOffsets
from tidings.broker.durable.store.base import DeleteStream as DeleteStream
from tidings.broker.durable.store.base import MarkStreamNext as MarkStreamNext
from tidings.broker.durable.store.base import PutStream as PutStream
from tidings.broker.durable.store.base import StreamRow as StreamRow
from tidings.broker.durable.store.base import TrimStream as TrimStream

if TYPE_CHECKING:
    from tidings.broker.durable.store.reads import Reads

MIGRATION_V2: Final = """
CREATE TABLE streams (
    name       TEXT PRIMARY KEY,
    config     TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE stream_messages (
    stream       TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    offset       INTEGER NOT NULL,
    subject      TEXT NOT NULL,
    key          TEXT,
    payload      BLOB NOT NULL,
    headers      BLOB,
    msg_id       TEXT,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (stream, partition, offset)
);
-- Replay from a point in time.
CREATE INDEX stream_messages_time ON stream_messages (stream, partition, timestamp_ms);

-- The lowest offset each partition keeps after retention: offsets stay dense
-- and are never reused, even when retention empties a partition.
CREATE TABLE stream_floors (
    stream    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    first     INTEGER NOT NULL,
    PRIMARY KEY (stream, partition)
) WITHOUT ROWID;

CREATE TABLE stream_offsets (
    stream    TEXT NOT NULL,
    grp       TEXT NOT NULL,
    partition INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,  -- offsets below were delivered at least once
    PRIMARY KEY (stream, grp, partition)
) WITHOUT ROWID;
"""

#: A partition's next offset, recorded when a write at its tail failed: the
#: failed offsets left no rows, so without it recovery (max stored offset + 1)
#: would hand them out again. Written only on that failure path.
MIGRATION_STREAM_NEXT: Final = """
CREATE TABLE stream_next (
    stream    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next      INTEGER NOT NULL,            -- every offset below was assigned once
    PRIMARY KEY (stream, partition)
) WITHOUT ROWID;
"""

INSERT_STREAM_ROW: Final = (
    "INSERT INTO stream_messages (stream, partition, offset, subject, key, payload, headers, msg_id,"
    " timestamp_ms) VALUES (?,?,?,?,?,?,?,?,?)")
UPSERT_STREAM: Final = (
    "INSERT INTO streams (name, config, created_ms) VALUES (?,?,?)"
    " ON CONFLICT (name) DO UPDATE SET config = excluded.config")
UPSERT_OFFSET: Final = (
    "INSERT INTO stream_offsets (stream, grp, partition, committed, delivered) VALUES (?,?,?,?,?)"
    " ON CONFLICT (stream, grp, partition) DO UPDATE SET committed = MAX(committed, excluded.committed),"
    " delivered = MAX(delivered, excluded.delivered)")
TRIM: Final = "DELETE FROM stream_messages WHERE stream = ? AND partition = ? AND offset < ?"
UPSERT_FLOOR: Final = (
    "INSERT INTO stream_floors (stream, partition, first) VALUES (?,?,?)"
    " ON CONFLICT (stream, partition) DO UPDATE SET first = MAX(first, excluded.first)")
UPSERT_NEXT: Final = (
    "INSERT INTO stream_next (stream, partition, next) VALUES (?,?,?)"
    " ON CONFLICT (stream, partition) DO UPDATE SET next = MAX(next, excluded.next)")
DELETE_GROUP: Final = "DELETE FROM stream_offsets WHERE stream = ? AND grp = ?"
DELETE_STREAM: Final = (
    ("DELETE FROM stream_next WHERE stream = ?", 1),
    ("DELETE FROM stream_messages WHERE stream = ?", 1),
    ("DELETE FROM stream_offsets WHERE stream = ?", 1),
    ("DELETE FROM stream_floors WHERE stream = ?", 1),
    ("DELETE FROM streams WHERE name = ?", 1),
)

_COLS: Final = "stream, partition, offset, subject, key, payload, headers, msg_id, timestamp_ms"


def encode_stream_row(r: StreamRow) -> tuple[Any, ...]:
    h = None if r.headers is None else msgpack.packb(r.headers, use_bin_type=True)
    return (r.stream, r.partition, r.offset, r.subject, r.key, r.payload, h, r.msg_id, r.timestamp_ms)


def decode_stream_row(t: Any) -> StreamRow:
    h = t[6]
    return StreamRow(t[0], t[1], t[2], t[3], t[4], t[5], None if h is None else msgpack.unpackb(h, raw=False),
                     t[7], t[8])


class StreamReads:
    """Read queries for streams, mixed into the store (uses Reads._fetch)."""

    async def load_streams(self: Reads) -> list[tuple[str, dict[str, Any], int]]:  # type: ignore[misc]
        rows = await self._fetch("SELECT name, config, created_ms FROM streams ORDER BY name")
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    async def partition_bounds(self: Reads, stream: str) -> dict[int, tuple[int, int, int]]:  # type: ignore[misc]
        """partition -> (first offset, last offset, payload bytes) for partitions with rows."""
        rows = await self._fetch(
            "SELECT partition, MIN(offset), MAX(offset), SUM(LENGTH(payload) + 64) FROM stream_messages"
            " WHERE stream = ? GROUP BY partition", (stream,))
        return {r[0]: (r[1], r[2], r[3] or 0) for r in rows}

    async def partition_floors(self: Reads, stream: str) -> dict[int, int]:  # type: ignore[misc]
        rows = await self._fetch("SELECT partition, first FROM stream_floors WHERE stream = ?", (stream,))
        return {r[0]: r[1] for r in rows}

    async def partition_marks(self: Reads, stream: str) -> dict[int, int]:  # type: ignore[misc]
        """partition -> next offset recorded by MarkStreamNext (offsets below it were assigned)."""
        rows = await self._fetch("SELECT partition, next FROM stream_next WHERE stream = ?", (stream,))
        return {r[0]: r[1] for r in rows}

    async def read_partition(self: Reads, stream: str, partition: int, from_offset: int,  # type: ignore[misc]
                             limit: int, max_bytes: int | None = None, min_rows: int = 1) -> list[StreamRow]:
        """Up to ``limit`` rows from ``from_offset`` in offset order; with ``max_bytes``,
        beyond the first ``min_rows`` only as many as keep their payloads within it."""
        rows = await self._fetch_page(
            _COLS, "FROM stream_messages WHERE stream = ? AND partition = ? AND offset >= ?"
            " ORDER BY offset LIMIT ?",
            [stream, partition, from_offset], limit, max_bytes, min_rows)
        return [decode_stream_row(r) for r in rows]

    async def offset_for_time(self: Reads, stream: str, partition: int, ts_ms: int) -> int | None:  # type: ignore[misc]
        """The first offset whose timestamp is >= ts_ms, or None if there is none."""
        rows = await self._fetch(
            "SELECT MIN(offset) FROM stream_messages WHERE stream = ? AND partition = ? AND timestamp_ms >= ?",
            (stream, partition, ts_ms))
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def load_offsets(self: Reads, stream: str) -> dict[str, dict[int, tuple[int, int]]]:  # type: ignore[misc]
        """group -> partition -> (committed, delivered)."""
        rows = await self._fetch(
            "SELECT grp, partition, committed, delivered FROM stream_offsets WHERE stream = ?", (stream,))
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for g, p, c, d in rows:
            out.setdefault(g, {})[p] = (c, d)
        return out

    async def cutoff_by_age(self: Reads, stream: str, partition: int, before_ms: int) -> int | None:  # type: ignore[misc]
        """One past the last offset older than before_ms (rows below it may go)."""
        rows = await self._fetch(
            "SELECT MAX(offset) FROM stream_messages WHERE stream = ? AND partition = ? AND timestamp_ms < ?",
            (stream, partition, before_ms))
        return rows[0][0] + 1 if rows and rows[0][0] is not None else None

    async def cutoff_by_bytes(self: Reads, stream: str, partition: int, max_bytes: int) -> int | None:  # type: ignore[misc]
        """The lowest offset to keep so the newest rows fit in max_bytes."""
        rows = await self._fetch(
            "SELECT offset FROM (SELECT offset, SUM(LENGTH(payload) + 64) OVER (ORDER BY offset DESC) AS total"
            " FROM stream_messages WHERE stream = ? AND partition = ?) WHERE total > ?"
            " ORDER BY offset DESC LIMIT 1", (stream, partition, max_bytes))
        return rows[0][0] + 1 if rows else None
