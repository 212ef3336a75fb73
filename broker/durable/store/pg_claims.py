"""Shared durable queues on PostgreSQL: claims, fenced settlements, id blocks, the catalog.

Several brokers on one database (cluster mode, docs/SCALING.md) share each queue's
rows. A broker takes messages for its local consumers by *claiming* them: one
statement picks the due rows in delivery order with ``FOR UPDATE SKIP LOCKED`` (rows
another broker is claiming right now are skipped, not waited for) and sets, on each,
``claimed_by`` (the broker) and ``available_ms`` to the visibility deadline (the
database's clock now + the queue's ack deadline), and counts the delivery. Until
that deadline no other claim sees the row; after it, any broker may claim it again
(the holder died, or its consumer is too slow).

Every later change a broker makes to a claimed row (ack, nack, in_progress, giving
back an unused claim) is *fenced*: it applies only while the row is still claimed by
that broker with the delivery count it claimed (``claimed_by = $broker AND
deliveries = $d``). A broker whose claim lapsed and was taken over cannot delete or
move a message another consumer now holds: its late ack is a no-op (the message was
then delivered twice, at least once semantics, but never to two consumers before the
first one's deadline).

The statements run on the store's read pool, one short autocommit transaction each
(a batch of settlements is one transaction), beside the writer's group commits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgpack

from tidings.broker.durable.store.base import StoredMessage

if TYPE_CHECKING:
    import asyncpg

#: The database's clock in milliseconds: every broker compares deadlines on the same
#: clock, so a broker whose clock runs ahead cannot take over claims early.
#: statement_timestamp() is stable within the statement, so the claim's
#: ``available_ms <= now`` is an index condition (clock_timestamp() is volatile: it
#: would be a filter over every in-flight row of the queue).
DB_NOW_MS: Final = "(extract(epoch from statement_timestamp()) * 1000)::bigint"

#: $1 queue, $2 how many, $3 ack deadline (ms), $4 broker. Oldest due first; rows
#: another transaction holds are skipped. RETURNING gives the new delivery count (the
#: fence of every later change) and the deadline.
CLAIM: Final = f"""
WITH c AS (
    SELECT id FROM tidings_messages
    WHERE queue = $1 AND available_ms <= {DB_NOW_MS}
    ORDER BY available_ms, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tidings_messages AS m
SET available_ms = {DB_NOW_MS} + $3, deliveries = m.deliveries + 1, claimed_by = $4
FROM c WHERE m.queue = $1 AND m.id = c.id
RETURNING m.id, m.subject, m.payload, m.headers, m.msg_id, m.published_ms, m.available_ms, m.expires_ms,
          m.deliveries, m.last_error, m.priority
"""

#: The claim must walk the due index in order and stop after n rows. With statistics
#: that lag behind a backlog (a queue that filled since the last ANALYZE) PostgreSQL
#: picked a bitmap scan of every due row and a sort (measured: 70-180 ms per claim of
#: 1,000 from 20,000, growing with the backlog); for this one transaction it may not.
CLAIM_PLAN: Final = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off"

#: Settlements find each row by its key, one index probe per (id, deliveries) pair.
#: With statistics that lag behind a backlog PostgreSQL scanned the whole queue and
#: joined (measured: 80 ms to 1.6 s to ack 1,000 of 20,000); for this transaction the
#: pairs drive a nested loop over the primary key.
SETTLE_PLAN: Final = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; SET LOCAL enable_nestloop = off"

#: Acks (and expiries): $1 queue, $2 ids, $3 the delivery counts claimed, $4 broker.
DELETE_CLAIMED: Final = """
DELETE FROM tidings_messages AS m
USING unnest($2::bigint[], $3::integer[]) AS u(i, d)
WHERE m.queue = $1 AND m.id = ANY((SELECT $2::bigint[])::bigint[]) AND m.id = u.i AND m.deliveries = u.d AND m.claimed_by = $4
"""

#: Nacks, expired ack deadlines, claims given back: the row is free again from
#: available_ms, with its new delivery count and last error. $1 queue, $2 ids,
#: $3 counts claimed, $4 new counts, $5 available_ms, $6 last errors, $7 broker.
RELEASE_CLAIMED: Final = """
UPDATE tidings_messages AS m
SET available_ms = u.a, deliveries = u.nd, last_error = u.e, claimed_by = NULL
FROM unnest($2::bigint[], $3::integer[], $4::integer[], $5::bigint[], $6::text[]) AS u(i, d, nd, a, e)
WHERE m.queue = $1 AND m.id = ANY((SELECT $2::bigint[])::bigint[]) AND m.id = u.i AND m.deliveries = u.d AND m.claimed_by = $7
"""

#: in_progress: the claim lasts $4 ms more from now. $1 queue, $2 ids, $3 counts claimed, $5 broker.
EXTEND_CLAIMED: Final = f"""
UPDATE tidings_messages AS m
SET available_ms = {DB_NOW_MS} + $4
FROM unnest($2::bigint[], $3::integer[]) AS u(i, d)
WHERE m.queue = $1 AND m.id = ANY((SELECT $2::bigint[])::bigint[]) AND m.id = u.i AND m.deliveries = u.d AND m.claimed_by = $5
RETURNING m.id
"""

#: A block of message ids: the high-water mark moves on by $1; the block is
#: (returned - $1, returned]. One row, updated in its own short transaction.
ALLOCATE_IDS: Final = ("UPDATE tidings_meta SET value = value + $1 WHERE key = 'max_message_id'"
                       " RETURNING value")
CATALOG_VERSION: Final = "SELECT value FROM tidings_meta WHERE key = 'catalog_version'"
BUMP_CATALOG: Final = "UPDATE tidings_meta SET value = value + 1 WHERE key = 'catalog_version'"


def decode_claimed(queue: str, r: Any) -> StoredMessage:
    h = r[3]
    return StoredMessage(queue, r[0], r[1], bytes(r[2]), None if h is None else msgpack.unpackb(h, raw=False),
                         r[4], r[5], r[6], r[7], r[8], r[9], r[10])


async def claim(conn: asyncpg.Connection, queue: str, n: int, deadline_ms: int, broker: str) -> list[StoredMessage]:
    async with conn.transaction():
        await conn.execute(CLAIM_PLAN)
        rows = await conn.fetch(CLAIM, queue, n, deadline_ms, broker)
    out = [decode_claimed(queue, r) for r in rows]
    out.sort(key=lambda m: m.id)  # RETURNING has no order; ids follow the claim's order closely enough
    return out


async def settle(conn: asyncpg.Connection, queue: str, broker: str, deletes: list[tuple[int, int]],
                 releases: list[tuple[int, int, int, int, str | None]],
                 extends: list[tuple[int, int]], extend_ms: int) -> set[int]:
    """One transaction: fenced deletes ((id, deliveries)), releases ((id, deliveries,
    new deliveries, available_ms, last_error)) and extensions ((id, deliveries)).
    Returns the ids whose extension did not apply (the claim was lost)."""
    lost: set[int] = set()
    async with conn.transaction():
        await conn.execute(SETTLE_PLAN)
        if deletes:
            await conn.execute(DELETE_CLAIMED, queue, [d[0] for d in deletes], [d[1] for d in deletes], broker)
        if releases:
            await conn.execute(RELEASE_CLAIMED, queue, [r[0] for r in releases], [r[1] for r in releases],
                               [r[2] for r in releases], [r[3] for r in releases], [r[4] for r in releases],
                               broker)
        if extends:
            kept = {r[0] for r in await conn.fetch(EXTEND_CLAIMED, queue, [e[0] for e in extends],
                                                   [e[1] for e in extends], extend_ms, broker)}
            lost = {e[0] for e in extends} - kept
    return lost
