"""Stream offsets and shared consumer groups of cluster mode, at the store
(broker/durable/store/pg_cluster.py): two stores on one database stand for two brokers."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg

from tidings.broker.durable.store import PutMessages, PutStream, StorageError
from tidings.broker.durable.store.base import StreamRow
from tidings.broker.durable.store.postgres import PostgresStore

ROUNDS = 30  # batches each store writes into the shared partition
PER_BATCH = 7


def srow(stream: str, partition: int, offset: int, tag: str) -> StreamRow:
    return StreamRow(stream, partition, offset, "s", tag, tag.encode(), None, None, 1)


async def test_two_brokers_appending_to_one_partition_get_dense_offsets_in_commit_order(pg_url, tmp_path) -> None:
    """Both stores believe the partition starts at 0 (their provisional offsets collide);
    the counter row gives each batch its own block: no gaps, no duplicates, each
    writer's order kept, and each committed batch's rows carry their final offsets."""
    stores = [PostgresStore(pg_url, data_dir=None, cluster=True) for _ in range(2)]
    for s in stores:
        await s.open()
    committed: list[list[int]] = []  # offsets per batch, in the order the commits were reported
    rows_by_writer: dict[str, list[StreamRow]] = {"a": [], "b": []}
    async with anyio.create_task_group() as tg:
        for s in stores:
            await tg.start(s.run)
        await stores[0].write(PutStream("s", {"partitions": 2}, 1))

        async def writer(store: PostgresStore, tag: str) -> None:
            for i in range(ROUNDS):
                # two partitions in one batch, in an order that differs between the writers
                rows = [srow("s", p, i * PER_BATCH + k, f"{tag}{i}.{k}")
                        for p in ((0, 1) if tag == "a" else (1, 0)) for k in range(PER_BATCH)]
                rows_by_writer[tag] += [r for r in rows if r.partition == 0]
                done: list[Any] = []

                def on_done(error: Exception | None, rows: list[StreamRow] = rows) -> None:
                    assert error is None
                    committed.append([r.offset for r in rows if r.partition == 0])
                    done.append(1)
                await store.write(PutMessages([], stream_rows=rows, on_done=on_done))
                assert done

        async with anyio.create_task_group() as writers:
            writers.start_soon(writer, stores[0], "a")
            writers.start_soon(writer, stores[1], "b")
        stored = await stores[0].read_partition("s", 0, 0, 10_000)
        assert [r.offset for r in stored] == list(range(2 * ROUNDS * PER_BATCH))
        assert [r.offset for r in await stores[1].read_partition("s", 1, 0, 10_000)] == \
            list(range(2 * ROUNDS * PER_BATCH))
        # what each writer was told is what is stored, and each writer's order is kept
        by_offset = {r.offset: r.key for r in stored}
        for tag, rows in rows_by_writer.items():
            assert [by_offset[r.offset] for r in rows] == [r.key for r in rows]
            assert [r.offset for r in rows] == sorted(r.offset for r in rows)
        # each batch is one block, and blocks were committed in offset order per store
        for block in committed:
            assert block == list(range(block[0], block[0] + PER_BATCH))
        assert (await stores[0].stream_heads())[("s", 0)] == 2 * ROUNDS * PER_BATCH
        for s in stores:
            await s.close()


async def test_first_allocation_starts_past_rows_written_before_cluster_mode(pg_url) -> None:
    """A database used by one broker, then shared: the counter starts after its rows."""
    single = PostgresStore(pg_url)
    await single.open()
    async with anyio.create_task_group() as tg:
        await tg.start(single.run)
        await single.write(PutStream("s", {"partitions": 1}, 1))
        await single.write(PutMessages([], stream_rows=[srow("s", 0, o, "old") for o in range(5)]))
        await single.close()
    shared = PostgresStore(pg_url, cluster=True)
    await shared.open()
    async with anyio.create_task_group() as tg:
        await tg.start(shared.run)
        rows = [srow("s", 0, 0, "new"), srow("s", 0, 1, "new")]  # a stale idea of the next offset
        await shared.write(PutMessages([], stream_rows=rows))
        assert [r.offset for r in rows] == [5, 6]
        assert [r.key for r in await shared.read_partition("s", 0, 0, 100)] == ["old"] * 5 + ["new"] * 2
        await shared.close()


async def test_a_failed_batch_gives_its_offsets_back(pg_url) -> None:
    """A batch that rolls back (here: a duplicate key among its queue rows) leaves no hole."""
    from tests.storage.storetools import make_row
    store = PostgresStore(pg_url, cluster=True)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write(PutMessages([make_row("q", 1)], stream_rows=[srow("s", 0, 0, "a")]))
        bad = [srow("s", 0, 1, "bad")]
        try:
            await store.write(PutMessages([make_row("q", 1)], stream_rows=bad))
        except StorageError:
            pass
        else:
            raise AssertionError("a duplicate message id was stored")
        good = [srow("s", 0, 1, "b")]
        await store.write(PutMessages([make_row("q", 2)], stream_rows=good))
        assert good[0].offset == 1
        assert [r.key for r in await store.read_partition("s", 0, 0, 100)] == ["a", "b"]
        await store.close()


async def test_group_rounds_compute_one_generation_and_fence_stale_commits(pg_url) -> None:
    a, b = PostgresStore(pg_url, cluster=True), PostgresStore(pg_url, cluster=True)
    for s in (a, b):
        await s.open()
    try:
        gen, parts, _ = await a.group_round("s", "g", ["A/1"], [], 30.0, 4)
        assert gen == 1 and {p: o for p, (o, _g) in parts.items()} == {0: "A/1", 1: "A/1", 2: "A/1", 3: "A/1"}
        again, same, _ = await a.group_round("s", "g", ["A/1"], [], 30.0, 4)
        assert (again, same) == (gen, parts)  # nothing changed: no new generation
        gen2, parts2, _ = await b.group_round("s", "g", ["B/1"], [], 30.0, 4)
        assert gen2 == 2
        assert {p: o for p, (o, _g) in parts2.items()} == {0: "A/1", 1: "B/1", 2: "A/1", 3: "B/1"}
        # A's commit for partition 1 under its old generation is fenced; partition 0 is still A's
        ok = await a.commit_group_offsets("s", "g", [(0, 5, 5, "A/1", parts[0][1]), (1, 9, 9, "A/1", parts[1][1])])
        assert ok == {0}
        ok = await b.commit_group_offsets("s", "g", [(1, 3, 3, "B/1", parts2[1][1])])
        assert ok == {1}
        assert await b.group_offsets("s", "g") == {0: (5, 5), 1: (3, 3)}
        # A's member leaves (or its lease lapses): B gets every partition in the next generation
        gen3, parts3, offsets = await b.group_round("s", "g", ["B/1"], ["A/1"], 30.0, 4)
        assert gen3 == 3 and {o for o, _g in parts3.values()} == {"B/1"}
        assert offsets == {0: (5, 5), 1: (3, 3)}  # where B starts the partitions it gained
        # a lapsed lease counts as gone: B's lease is backdated, A's next round drops it
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute("UPDATE tidings_group_members SET lease_until = now() - interval '1 second'")
        finally:
            await admin.close()
        gen4, parts4, _ = await a.group_round("s", "g", ["A/1"], [], 30.0, 4)
        assert gen4 == 4 and {o for o, _g in parts4.values()} == {"A/1"}
    finally:
        for s in (a, b):
            await s.close()
