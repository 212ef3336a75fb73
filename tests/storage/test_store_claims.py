"""The PostgreSQL store's cluster-mode statements (store/pg_claims.py): claims with
FOR UPDATE SKIP LOCKED and a visibility deadline, fenced settlements, id blocks,
the catalog version and the cross-broker de-duplication insert.

Two PostgresStore(cluster=True) on one database stand for two brokers. A claim
deadline of 0 ms makes a claim lapse at once (the next statement's clock is not
earlier), so no test waits for time to pass; a long one (an hour) never lapses here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from tidings.broker.durable.store import PutMessages, PutQueue, StorageError
from tidings.broker.durable.store.postgres import PostgresStore

from tests.storage.storetools import make_row

HOUR_MS = 3_600_000


@contextlib.asynccontextmanager
async def brokers(url: str, n: int = 2) -> AsyncIterator[list[PostgresStore]]:
    stores = [PostgresStore(url, cluster=True) for _ in range(n)]
    async with anyio.create_task_group() as tg:
        for s in stores:
            await s.open()
            await tg.start(s.run)
        try:
            yield stores
        finally:
            for s in stores:
                await s.close()


async def seed(store: PostgresStore, queue: str, n: int, first: int = 1) -> None:
    await store.write(PutMessages([make_row(queue, i, available_ms=0) for i in range(first, first + n)]))


async def test_a_claimed_message_is_hidden_from_others_until_its_deadline(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        await seed(a, "q", 10)
        got_a = await a.claim("q", 4, HOUR_MS, "A")
        assert [m.id for m in got_a] == [1, 2, 3, 4] and all(m.deliveries == 1 for m in got_a)
        got_b = await b.claim("q", 100, HOUR_MS, "B")
        assert [m.id for m in got_b] == [5, 6, 7, 8, 9, 10]
        assert await a.claim("q", 100, HOUR_MS, "A") == []
        # a lapsed claim (deadline 0) is claimed again, its delivery counted again
        await seed(a, "r", 1)
        first = await a.claim("r", 1, 0, "A")
        again = await b.claim("r", 1, HOUR_MS, "B")
        assert [m.id for m in first] == [m.id for m in again] == [1]
        assert again[0].deliveries == 2


async def test_concurrent_claims_skip_locked_rows_and_never_overlap(pg_url) -> None:
    async with brokers(pg_url, 3) as stores:
        await seed(stores[0], "q", 600)
        taken: list[list[int]] = [[] for _ in stores]

        async def take(i: int) -> None:
            while True:
                got = await stores[i].claim("q", 25, HOUR_MS, f"B{i}")
                if not got:
                    return
                taken[i].extend(m.id for m in got)

        async with anyio.create_task_group() as tg:
            for i in range(len(stores)):
                tg.start_soon(take, i)
        everything = [x for t in taken for x in t]
        assert sorted(everything) == list(range(1, 601))  # each exactly once


async def test_settlements_are_fenced_by_broker_and_delivery_count(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        await seed(a, "q", 3)
        m1, m2, m3 = await a.claim("q", 3, 0, "A")  # lapse at once
        again = await b.claim("q", 1, HOUR_MS, "B")  # B takes over message 1
        assert [m.id for m in again] == [1]
        # A's late ack of 1 and B's ack with A's count are both no-ops
        await a.settle_claims("q", "A", [(1, m1.deliveries)], [], [], HOUR_MS)
        await b.settle_claims("q", "B", [(1, m1.deliveries)], [], [], HOUR_MS)
        # A's in_progress on 1 reports the claim lost; on 2 (still A's, count unchanged) it holds
        lost = await a.settle_claims("q", "A", [], [], [(1, m1.deliveries), (2, m2.deliveries)], HOUR_MS)
        assert lost == {1}
        # B's proper ack deletes 1; A releases 2 (delivery uncounted) for any broker
        await b.settle_claims("q", "B", [(1, again[0].deliveries)], [], [], HOUR_MS)
        await a.settle_claims("q", "A", [], [(2, m2.deliveries, m2.deliveries - 1, 0, "given back")], [], HOUR_MS)
        rest = await b.claim("q", 10, HOUR_MS, "B")  # 2 given back, 3 lapsed
        assert [m.id for m in rest] == [2, 3]
        assert rest[0].deliveries == 1 and rest[1].deliveries == m3.deliveries + 1 and rest[0].last_error == "given back"
        assert await a.count("q") == 2  # 2 and 3 are stored; 1 is gone


async def test_a_nack_with_delay_keeps_the_message_until_its_time(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        await seed(a, "q", 1)
        (m,) = await a.claim("q", 1, HOUR_MS, "A")
        far = 2 ** 62  # never due in this test
        await a.settle_claims("q", "A", [], [(m.id, m.deliveries, m.deliveries, far, "later")], [], HOUR_MS)
        assert await b.claim("q", 1, HOUR_MS, "B") == []
        assert await b.next_available_ms("q") == far


async def test_id_blocks_never_overlap_across_brokers_and_restarts(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        blocks = [await s.allocate_ids(100) for s in (a, b, a, b)]
    async with brokers(pg_url, 1) as (c,):
        blocks.append(await c.allocate_ids(100))
    ranges = [set(range(last - 100 + 1, last + 1)) for last in blocks]
    assert sum(len(r) for r in ranges) == len(set().union(*ranges)) == 500


async def test_catalog_version_moves_with_every_declare(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        v0 = await b.catalog_version()
        await a.write(PutQueue("q", {"name": "q"}, 1))
        v1 = await b.catalog_version()
        assert v1 > v0
        await a.write(PutMessages([make_row("q", 1)]))  # a publish is not a catalog change
        assert await b.catalog_version() == v1


async def test_a_msg_id_is_stored_by_one_broker_only(pg_url) -> None:
    async with brokers(pg_url) as (a, b):
        now = 10 ** 13  # entries expiring far in the future
        first = PutMessages([make_row("q", 1, msg_id="k")], dedup=[("k", now, b"\x80")])
        await a.write(first)
        second = PutMessages([make_row("q", 2, msg_id="k")], dedup=[("k", now, b"\x80")])
        with pytest.raises(StorageError, match="duplicate key"):
            await b.write(second)
        assert await a.count("q") == 1  # the second copy was not stored
        # an expired entry does not refuse a new publish
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("UPDATE tidings_dedup SET expires_ms = 1")
        finally:
            await conn.close()
        await b.write(PutMessages([make_row("q", 3, msg_id="k")], dedup=[("k", now, b"\x80")]))
        assert await a.count("q") == 2
