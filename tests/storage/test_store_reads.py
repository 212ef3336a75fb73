"""Reads: paging in delivery order, dedup, recovery of queues and the id sequence."""

from __future__ import annotations

from tidings.broker.durable.store import DeleteMessages, ExpireDedup, PutMessages, PutQueue, UpdateMessages


async def test_paging_by_available_then_id_with_cursor(open_store, row):
    # ids and availability deliberately disagree: delivery order is (available_ms, id).
    avail = {1: 300, 2: 100, 3: 200, 4: 100, 5: 300, 6: 50, 7: 200}
    async with open_store() as store:
        await store.write(PutMessages([row("q", i, available_ms=a) for i, a in avail.items()]))
        await store.write(PutMessages([row("other", 1, available_ms=0)]))
        expected = sorted(avail, key=lambda i: (avail[i], i))
        got: list[int] = []
        after = None
        while page := await store.load_messages("q", after, limit=3):
            assert len(page) <= 3
            got += [m.id for m in page]
            after = (page[-1].available_ms, page[-1].id)
        assert got == expected == [6, 2, 4, 3, 7, 1, 5]

        due = await store.load_messages("q", None, due_before_ms=200, limit=100)
        assert [m.id for m in due] == [6, 2, 4, 3, 7]  # inclusive bound
        due = await store.load_messages("q", (100, 2), due_before_ms=199, limit=100)
        assert [m.id for m in due] == [4]

        assert await store.next_available_ms("q") == 50
        assert await store.next_available_ms("q", (100, 4)) == 200
        assert await store.next_available_ms("q", (300, 5)) is None
        assert await store.next_available_ms("empty") is None

        await store.write(UpdateMessages("q", [(6, 1_000, 2, "timeout")]))
        page = await store.load_messages("q", (300, 5))
        assert [(m.id, m.available_ms, m.deliveries, m.last_error) for m in page] == [(6, 1_000, 2, "timeout")]


async def test_count_oldest_and_listing(open_store, row):
    async with open_store() as store:
        await store.write(PutMessages([row("q", i, available_ms=100 - i) for i in range(1, 21)]))
        assert await store.count("q") == 20
        assert await store.count("nope") == 0
        assert [m.id for m in await store.oldest("q", 3)] == [1, 2, 3]
        assert [m.id for m in await store.list_messages("q", limit=5, offset=10)] == [11, 12, 13, 14, 15]
        await store.write(DeleteMessages("q", [1, 2, 12]))
        assert [m.id for m in await store.oldest("q", 2)] == [3, 4]
        assert await store.count("q") == 17


async def test_message_fields_round_trip(open_store, row):
    headers = {"type": "order.created", "v": 2, "trace": b"\x00\xff", "nested": {"a": [1, "x"]}, "": None}
    m = row("q", 7, payload=b"\x00" * 3 + b"payload", headers=headers, msg_id="m-7", published_ms=123,
            expires_ms=9_999, deliveries=2, last_error="nope")
    bare = row("q", 8, payload=b"", headers=None)
    empty = row("q", 9, headers={})
    async with open_store() as store:
        await store.write(PutMessages([m, bare, empty]))
    async with open_store() as store:  # from disk, after a reopen
        assert await store.load_messages("q") == [m, bare, empty]
        assert (await store.load_messages("q"))[0].headers["trace"] == b"\x00\xff"  # bytes stay bytes


async def test_dedup_check_and_expiry(open_store, row):
    async with open_store() as store:
        assert await store.check_dedup([]) == {}
        await store.write(PutMessages([row("q", 1, msg_id="m1")], [("m1", 1_000, b"r1")]))
        await store.write(PutMessages([row("q", 2, msg_id="m2")], [("m2", 2_000, b"r2")]))
        assert await store.check_dedup(["m1", "m2", "m3"], now_ms=500) == {"m1": b"r1", "m2": b"r2"}
        assert await store.check_dedup(["m1", "m2"], now_ms=1_000) == {"m2": b"r2"}  # m1 expired at 1000
        assert await store.check_dedup(["m1", "m2"], now_ms=2_500) == {}
        assert await store.check_dedup(["m1"]) == {}  # default now: the wall clock, long past

        # A new publish with an id whose entry expired (but was not yet swept) replaces it.
        await store.write(PutMessages([row("q", 3, msg_id="m1")], [("m1", 5_000, b"r1bis")]))
        assert await store.check_dedup(["m1"], now_ms=2_500) == {"m1": b"r1bis"}

        await store.write(ExpireDedup(2_000))
        rows = await store._fetch("SELECT msg_id FROM dedup ORDER BY msg_id")
        assert [r[0] for r in rows] == ["m1"]


async def test_dedup_check_many_ids(open_store, row):
    n = 2_500  # more than one query's worth of parameters
    async with open_store() as store:
        await store.write(PutMessages([row("q", i) for i in range(n)],
                                      [(f"id-{i}", 10_000, str(i).encode()) for i in range(0, n, 2)]))
        found = await store.check_dedup([f"id-{i}" for i in range(n)], now_ms=0)
        assert found == {f"id-{i}": str(i).encode() for i in range(0, n, 2)}


async def test_queues_and_id_high_water_mark_survive_reopen(open_store, row):
    async with open_store() as store:
        assert await store.max_message_id() == 0
        assert await store.load_queues() == []
        await store.write(PutQueue("orders", {"max_deliveries": 5, "dead_letter": "orders.dlq"}, 111))
        await store.write(PutQueue("orders.dlq", {}, 112))
        await store.write(PutMessages([row("orders", 41), row("orders", 40)]))
        await store.write(DeleteMessages("orders", [40, 41]))
        assert await store.max_message_id() == 41
    async with open_store() as store:
        # Every message is gone, but ids must never be reused.
        assert await store.max_message_id() == 41
        assert await store.load_queues() == [
            ("orders", {"dead_letter": "orders.dlq", "max_deliveries": 5}, 111), ("orders.dlq", {}, 112)]
        await store.write(PutMessages([row("orders", 7)]))  # a lower id does not lower the mark
        assert await store.max_message_id() == 41


async def test_pages_bounded_in_bytes_keep_order_and_take_min_rows(open_store, row):
    """max_bytes stops a page once the payloads would pass it; min_rows are
    returned whatever their size (a window always makes progress)."""
    from tidings.broker.durable.store.streams import StreamRow

    sizes = [100, 100, 100, 5_000, 100]
    async with open_store() as store:
        await store.write(PutMessages([row("q", i + 1, payload=b"x" * n) for i, n in enumerate(sizes)]))
        await store.write(PutMessages([], stream_rows=[
            StreamRow("s", 0, o, "s.a", None, b"y" * n, None, None, 0) for o, n in enumerate(sizes)]))
        ids = [m.id for m in await store.load_messages("q", limit=10, max_bytes=250)]
        assert ids == [1, 2]
        ids = [m.id for m in await store.load_messages("q", (1_000, 2), limit=10, max_bytes=250)]
        assert ids == [3]
        ids = [m.id for m in await store.load_messages("q", (1_000, 3), limit=10, max_bytes=0, min_rows=1)]
        assert ids == [4]  # larger than the bound, but one row is always allowed
        ids = [m.id for m in await store.load_messages("q", limit=10, max_bytes=0, min_rows=3)]
        assert ids == [1, 2, 3]
        ids = [m.id for m in await store.load_messages("q", limit=2, max_bytes=10**9)]
        assert ids == [1, 2]  # the count limit still holds
        assert len(await store.load_messages("q", limit=10)) == 5  # no byte bound by default
        offsets = [r.offset for r in await store.read_partition("s", 0, 1, 10, 5_100)]
        assert offsets == [1, 2]
        offsets = [r.offset for r in await store.read_partition("s", 0, 3, 10, 0, 2)]
        assert offsets == [3, 4]
