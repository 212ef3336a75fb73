"""Streams across brokers on one PostgreSQL database (cluster mode, issue 13 item 2).

Offsets. On one broker a partition's next offset lives in memory and a publish
gets its offset when it is queued. With several brokers publishing into one
partition that would hand out the same offsets twice, so in cluster mode the
store allocates them inside the commit transaction: `allocate_offsets` bumps the
partition's counter row (tidings_stream_heads) with `UPDATE ... SET next = next
+ n RETURNING next`, rewrites the batch's rows (and their StreamRow objects, which
the confirms and the in-memory tails read after the commit) to the block it got,
and holds the row lock until COMMIT. A second broker's transaction appending to
the same partition waits on that lock, so offsets are dense and in commit order;
a transaction that rolls back gives its block back with its counter update. The
locks are taken first in the transaction, in (stream, partition) order, so two
batches that touch the same partitions cannot deadlock on them. The single-broker
path never calls it (its offsets are already dense: one writer).

Consumer groups (`PgCluster`, used by durable/shared_group.py): per group one row
(its generation and the member list it was computed for), one lease row per
member and one owner row per partition. A broker's round locks the group row,
renews its members' leases (database time, now()), drops lapsed and departed
members, and when the live members differ from the row's list computes the next
generation's assignment itself: the row lock makes that one broker per
generation. Offset commits are fenced: a partition's committed offset moves only
for its current owner at the generation that gave it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from tidings.broker.durable.store.base import PutMessages, StorageClosed, StreamRow

if TYPE_CHECKING:
    import asyncpg

    from tidings.broker.durable.store.base import StorageError
    from tidings.broker.durable.store.batch import Item

BUMP_HEAD: Final = ("UPDATE tidings_stream_heads SET next = next + $3 WHERE stream = $1 AND partition = $2"
                    " RETURNING next")
#: A partition's first allocation: its counter starts past everything already used there
#: (stored rows, offsets a failed write took on one broker, retention's floor, and the
#: broker's own idea of its next offset, which counts the groups' committed offsets).
INIT_HEAD: Final = (
    "INSERT INTO tidings_stream_heads (stream, partition, next) SELECT $1, $2, GREATEST($3::bigint,"
    ' (SELECT coalesce(max("offset") + 1, 0) FROM tidings_stream_messages WHERE stream = $1 AND partition = $2),'
    " (SELECT coalesce(max(next), 0) FROM tidings_stream_next WHERE stream = $1 AND partition = $2),"
    " (SELECT coalesce(max(first), 0) FROM tidings_stream_floors WHERE stream = $1 AND partition = $2))"
    " ON CONFLICT (stream, partition) DO NOTHING")
HEADS: Final = "SELECT stream, partition, next FROM tidings_stream_heads"


async def allocate_offsets(conn: asyncpg.Connection, items: list[Item]) -> None:
    """Give the stream rows of `items` their offsets, inside the caller's transaction
    (before any other statement of it). Raises whatever asyncpg raises."""
    blocks: dict[tuple[str, int], list[tuple[StreamRow, Item, int]]] = {}
    for it in items:
        op = it.op
        if it.stream_inserts and isinstance(op, PutMessages):
            for i, r in enumerate(op.stream_rows):
                blocks.setdefault((r.stream, r.partition), []).append((r, it, i))
    for key in sorted(blocks):
        rows = blocks[key]
        n = len(rows)
        nxt = await conn.fetchval(BUMP_HEAD, key[0], key[1], n)
        if nxt is None:  # the partition's first allocation in cluster mode
            await conn.execute(INIT_HEAD, key[0], key[1], min(r.offset for r, _it, _i in rows))
            nxt = await conn.fetchval(BUMP_HEAD, key[0], key[1], n)
        off = nxt - n
        for r, it, i in rows:  # in submission order: each publisher's order is kept
            r.offset = off
            t = it.stream_inserts[i]
            it.stream_inserts[i] = (t[0], t[1], off, *t[3:])  # type: ignore[index]
            off += 1
    for it in items:
        op = it.op
        if isinstance(op, PutMessages) and op.on_offsets is not None and op.dedup:
            it.dedup = [(str(k), int(e), bytes(r)) for k, e, r in op.on_offsets()]


# --- consumer groups ------------------------------------------------------------------

_LOCK_GROUP: Final = "SELECT generation, members FROM tidings_groups WHERE stream = $1 AND grp = $2 FOR UPDATE"
_NEW_GROUP: Final = ("INSERT INTO tidings_groups (stream, grp, generation, members) VALUES ($1, $2, 0, '{}')"
                     " ON CONFLICT (stream, grp) DO NOTHING")
_DROP_MEMBERS: Final = ("DELETE FROM tidings_group_members WHERE stream = $1 AND grp = $2"
                        " AND (member = ANY($3::text[]) OR lease_until <= now())")
_RENEW: Final = ("INSERT INTO tidings_group_members (stream, grp, member, lease_until)"
                 " SELECT $1, $2, m, now() + make_interval(secs => $4) FROM unnest($3::text[]) AS m"
                 " ON CONFLICT (stream, grp, member) DO UPDATE SET lease_until = excluded.lease_until")
_LIVE: Final = ("SELECT member FROM tidings_group_members WHERE stream = $1 AND grp = $2 AND lease_until > now()"
                " ORDER BY member")
_PARTS: Final = "SELECT partition, owner, generation FROM tidings_group_parts WHERE stream = $1 AND grp = $2"
_SET_PART: Final = (
    "INSERT INTO tidings_group_parts (stream, grp, partition, owner, generation)"
    " SELECT $1, $2, p, o, $5 FROM unnest($3::integer[], $4::text[]) AS u(p, o)"
    " ON CONFLICT (stream, grp, partition) DO UPDATE SET owner = excluded.owner, generation = excluded.generation")
_OFFSETS: Final = "SELECT partition, committed, delivered FROM tidings_stream_offsets WHERE stream = $1 AND grp = $2"
_SET_GROUP: Final = "UPDATE tidings_groups SET generation = $3, members = $4 WHERE stream = $1 AND grp = $2"
#: Fenced: only the partition's owner at the generation that gave it moves its offsets.
#: FOR SHARE: a round reassigning the partition waits for this commit (and then reads
#: its offsets), or this commit waits for the round and finds itself fenced.
_COMMIT_FENCED: Final = (
    "INSERT INTO tidings_stream_offsets AS o (stream, grp, partition, committed, delivered)"
    " SELECT $1, $2, u.p, u.c, u.d FROM unnest($3::integer[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[])"
    " AS u(p, c, d, m, g) JOIN tidings_group_parts gp ON gp.stream = $1 AND gp.grp = $2 AND gp.partition = u.p"
    " AND gp.owner = u.m AND gp.generation = u.g FOR SHARE OF gp"
    " ON CONFLICT (stream, grp, partition) DO UPDATE SET committed = GREATEST(o.committed, excluded.committed),"
    " delivered = GREATEST(o.delivered, excluded.delivered) RETURNING partition")


def assign(live: list[str], partitions: int) -> list[str | None]:
    """Partition i goes to live member i mod n (members sorted: every broker agrees)."""
    return [live[i % len(live)] if live else None for i in range(partitions)]


class ClusterStore(Protocol):
    """What durable/shared_stream.py and shared_group.py need of the store beyond the
    Store contract (PostgresStore in cluster mode)."""

    async def stream_heads(self) -> dict[tuple[str, int], int]: ...

    async def read_partition(self, stream: str, partition: int, from_offset: int, limit: int,
                             max_bytes: int | None = None, min_rows: int = 1) -> list[StreamRow]: ...

    async def group_round(self, stream: str, group: str, mine: list[str], gone: list[str], lease: float,
                          partitions: int) -> tuple[int, dict[int, tuple[str | None, int]],
                                                    dict[int, tuple[int, int]]]: ...

    async def commit_group_offsets(self, stream: str, group: str,
                                   rows: list[tuple[int, int, int, str, int]]) -> set[int]: ...

    async def group_offsets(self, stream: str, group: str) -> dict[int, tuple[int, int]]: ...

    async def init_group_offsets(self, stream: str, group: str, offsets: dict[int, int]) -> None: ...


class PgCluster:
    """Cluster-mode calls, mixed into PostgresStore (which provides `_pool`, `path`,
    `_translate`). Each runs on a read-pool connection, not through the write actor:
    they are small, rare (a few per second per group) and must not wait behind a
    batch of publishes."""

    path: str
    _pool: asyncpg.Pool | None

    def _translate(self, exc: BaseException) -> StorageError:  # provided by PostgresStore
        raise NotImplementedError

    async def _in_transaction(self, fn: Any, *args: Any) -> Any:
        pool = self._pool
        if pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await fn(conn, *args)
        except StorageClosed:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    async def stream_heads(self) -> dict[tuple[str, int], int]:
        """(stream, partition) -> its committed next offset, for every partition that
        has a counter row (one statement for the whole database). Raises StorageError."""
        async def q(conn: asyncpg.Connection) -> dict[tuple[str, int], int]:
            return {(r[0], r[1]): r[2] for r in await conn.fetch(HEADS)}
        result: dict[tuple[str, int], int] = await self._in_transaction(q)
        return result

    async def group_round(self, stream: str, group: str, mine: list[str], gone: list[str], lease: float,
                          partitions: int) -> tuple[int, dict[int, tuple[str | None, int]],
                                                    dict[int, tuple[int, int]]]:
        """One broker's round for a group: renew the leases of `mine`, drop `gone` and
        lapsed members, compute a new generation if the live members changed (under the
        group row's lock: one broker per generation). Returns (generation,
        {partition: (owner, generation that gave it)}, {partition: (committed, delivered)}),
        the offsets read after the new owners were set (see _COMMIT_FENCED). Raises StorageError."""
        async def q(conn: asyncpg.Connection) -> tuple[int, dict[int, tuple[str | None, int]],
                                                        dict[int, tuple[int, int]]]:
            await conn.execute(_NEW_GROUP, stream, group)
            row = await conn.fetchrow(_LOCK_GROUP, stream, group)
            gen, members = row[0], list(row[1])
            await conn.execute(_DROP_MEMBERS, stream, group, gone)
            if mine:
                await conn.execute(_RENEW, stream, group, mine, float(lease))
            live = [r[0] for r in await conn.fetch(_LIVE, stream, group)]
            parts = {r[0]: (r[1], r[2]) for r in await conn.fetch(_PARTS, stream, group)}
            if live != members or len(parts) != partitions:
                gen += 1
                want = assign(live, partitions)
                moved = [(p, o) for p, o in enumerate(want) if parts.get(p, (None, -1))[0] != o or p not in parts]
                if moved:
                    await conn.execute(_SET_PART, stream, group, [p for p, _ in moved], [o for _, o in moved], gen)
                    for p, o in moved:
                        parts[p] = (o, gen)
                await conn.execute(_SET_GROUP, stream, group, gen, live)
            offsets = {r[0]: (r[1], r[2]) for r in await conn.fetch(_OFFSETS, stream, group)}
            return gen, parts, offsets
        result: tuple[int, dict[int, tuple[str | None, int]], dict[int, tuple[int, int]]] = \
            await self._in_transaction(q)
        return result

    async def commit_group_offsets(self, stream: str, group: str,
                                   rows: list[tuple[int, int, int, str, int]]) -> set[int]:
        """Commit (partition, committed, delivered, member, generation) rows, each only
        if `member` still owns the partition at that generation; returns the partitions
        committed (the others were fenced: reassigned). Raises StorageError."""
        async def q(conn: asyncpg.Connection) -> set[int]:
            got = await conn.fetch(_COMMIT_FENCED, stream, group, [r[0] for r in rows], [r[1] for r in rows],
                                   [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows])
            return {r[0] for r in got}
        result: set[int] = await self._in_transaction(q)
        return result

    async def group_offsets(self, stream: str, group: str) -> dict[int, tuple[int, int]]:
        """partition -> (committed, delivered) of one group, as committed now."""
        async def q(conn: asyncpg.Connection) -> dict[int, tuple[int, int]]:
            rows = await conn.fetch(_OFFSETS, stream, group)
            return {r[0]: (r[1], r[2]) for r in rows}
        result: dict[int, tuple[int, int]] = await self._in_transaction(q)
        return result

    async def init_group_offsets(self, stream: str, group: str, offsets: dict[int, int]) -> None:
        """A group's starting offsets, for the partitions that have none yet: a member
        joining on a second broker never moves an existing group's offsets (not even
        with start=latest). Raises StorageError."""
        async def q(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO tidings_stream_offsets (stream, grp, partition, committed, delivered)"
                " SELECT $1, $2, p, c, c FROM unnest($3::integer[], $4::bigint[]) AS u(p, c)"
                " ON CONFLICT (stream, grp, partition) DO NOTHING",
                stream, group, list(offsets), list(offsets.values()))
        await self._in_transaction(q)
