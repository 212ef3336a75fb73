"""The Store contract (broker/durable/store/base.py), run against every backend.

Each test runs once per backend (the `backend` fixture: a SQLite file, the
in-memory store, and a PostgreSQL database on the throwaway server of tests/pgserver.py). A new backend passes this file before the broker may use it.
SQLite-specific behaviour (files, WAL, locking, migrations, crash, watchdog, a
full disk) stays in the other test_store_*.py files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.broker.durable.store import (
    CommitOffsets,
    DeleteGroup,
    DeleteMessages,
    DeleteQueue,
    DeleteStream,
    ExpireDedup,
    MarkDelivered,
    MarkStreamNext,
    MemoryData,
    MemoryStore,
    MoveMessages,
    PLAIN_LANE,
    PurgeQueue,
    PutMessages,
    PutQueue,
    PutSchema,
    PutSchemaBinding,
    DeleteSchemaBinding,
    PutStream,
    SqliteStore,
    StorageClosed,
    StorageError,
    Store,
    StreamRow,
    TrimStream,
    UpdateMessages,
)

from tidings.broker.durable.store.postgres import PostgresStore

from tests.storage.storetools import BACKENDS, make_row


def srow(stream: str, partition: int, offset: int, *, payload: bytes | None = None, ts: int = 0,
         key: str | None = None, headers: dict[str, Any] | None = None) -> StreamRow:
    return StreamRow(stream, partition, offset, f"{stream}.subj", key,
                     payload if payload is not None else f"{stream}:{partition}:{offset}".encode(),
                     headers, None, ts)


# --- the protocol itself ------------------------------------------------------------


def test_every_backend_has_every_member_of_the_protocol(tmp_path):
    members = {n for n in vars(Store) if not n.startswith("_")} | set(Store.__annotations__)
    assert {"read_partition", "load_offsets", "submit_nowait", "backup", "is_open"} <= members
    for store in (SqliteStore(tmp_path / "x.db"), MemoryStore(), PostgresStore("postgresql://u@localhost/d")):
        missing = sorted(n for n in members if not hasattr(store, n))
        assert missing == [], f"{type(store).__name__} lacks {missing}"


@pytest.mark.parametrize("kind", BACKENDS)
def test_bad_durability_is_refused(kind, tmp_path):
    with pytest.raises(ValueError):
        if kind == "sqlite":
            SqliteStore(tmp_path / "x.db", "fast")  # type: ignore[arg-type]
        elif kind == "postgres":
            PostgresStore("postgresql://u@localhost/d", "fast")  # type: ignore[arg-type]
        else:
            MemoryStore(None, "fast")  # type: ignore[arg-type]


# --- the actor: group commit, callbacks, backpressure, close -----------------------


async def test_concurrent_writes_share_commits(backend, row):
    async with backend.open() as store:
        async with anyio.create_task_group() as tg:
            for i in range(1, 501):
                tg.start_soon(store.write, PutMessages([row("q", i)]))
        assert store.committed_ops == 500
        assert store.committed_messages == 500
        assert store.commits < 50, f"{store.commits} commits for 500 concurrent writes: no group commit"
        assert await store.count("q") == 500


async def test_everything_pending_commits_in_one_transaction(backend, row):
    async with backend.open(run=False) as store:
        outcomes: list[Exception | None] = []
        for i in range(1, 1001):
            store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
        assert outcomes == [] and store.pending_ops == 1000
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.write(DeleteMessages("q", [1]))  # queued behind the 1000: done means they are
            await store.close()
        assert outcomes == [None] * 1000
        assert store.commits == 2
        assert store.last_batch_ops == 1 and store.committed_ops == 1001


async def test_callback_only_after_commit_and_reads_see_only_committed(backend, row):
    async with backend.open(run=False) as store:
        calls: list[tuple[Exception | None, int]] = []
        store.submit_nowait(PutMessages([row("q", i) for i in range(1, 11)],
                                        on_done=lambda e: calls.append((e, 0))))
        assert calls == []  # never synchronously from submit
        assert await store.count("q") == 0  # accepted, not committed: not visible
        assert await store.load_messages("q") == []
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.write(DeleteMessages("q", [999]))
            assert calls == [(None, 0)]  # once, with no error
            assert await store.count("q") == 10  # and a read after the callback sees the write
            await store.close()
        assert calls == [(None, 0)]


async def test_callback_exception_is_logged_and_actor_survives(backend, row, caplog):
    def bad(error: Exception | None) -> None:
        raise RuntimeError("callback bug")

    async with backend.open() as store:
        store.submit_nowait(PutMessages([row("q", 1)], on_done=bad))
        await store.write(PutMessages([row("q", 2)]))
        await store.write(PutMessages([row("q", 3)]))
        assert await store.count("q") == 3
    assert any("callback raised" in r.getMessage() for r in caplog.records)


async def test_failed_op_fails_alone_and_leaves_no_trace(backend, row):
    """A bad op (duplicate key) in a batch fails; the others in its batch still commit."""
    async with backend.open() as store:
        await store.write(PutMessages([row("q", 1)]))
        outcomes: dict[int, Exception | None] = {}

        def record(i: int):
            return lambda error: outcomes.__setitem__(i, error)

        for i in range(2, 12):
            ids = [1, 100] if i == 7 else [i]  # op 7 repeats id 1 (and would add 100)
            store.submit_nowait(PutMessages([row("q", n) for n in ids], [(f"m{i}", 10**12, b"r")],
                                            on_done=record(i)))
        await store.write(DeleteMessages("q", [12345]))
        assert isinstance(outcomes.pop(7), StorageError)
        assert outcomes == {i: None for i in range(2, 12) if i != 7}
        assert await store.count("q") == 10
        assert [m.id for m in await store.oldest("q", 1)] == [1] and not await store.list_messages("q", 1, 10)
        assert await store.check_dedup(["m6", "m7"], now_ms=0) == {"m6": b"r"}  # op 7 wholly absent
        assert store.failed_ops == 1
        with pytest.raises(StorageError):
            await store.write(PutMessages([row("q", 1)]))
        assert (await store.load_messages("q"))[0].payload == b"q:1"


async def test_malformed_op_is_refused_at_submit(backend, row):
    async with backend.open() as store:
        with pytest.raises(TypeError):
            store.submit_nowait(PutMessages([row("q", 1, headers={"x": object()})]))
        with pytest.raises(TypeError):
            store.submit_nowait("not an op")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.submit(PutQueue("q", {"x": object()}, 1))
        with pytest.raises(ValueError):
            store.submit_nowait(MoveMessages("q", [(1, row("q", 1))]))  # onto its own key
        assert store.pending_ops == 0


async def test_full_mailbox_blocks_submit_until_drained(backend, row):
    async with backend.open(run=False, mailbox_max_messages=10) as store:
        for i in range(1, 6):
            store.submit_nowait(PutMessages([row("q", 2 * i - 1), row("q", 2 * i)]))
        assert store.pending_messages == 10
        assert store.pending_bytes == sum(len(f"q:{i}") for i in range(1, 11))
        with pytest.raises(anyio.WouldBlock):
            store.submit_nowait(PutMessages([row("q", 11)]))
        submitted = anyio.Event()
        spaced = anyio.Event()

        async def publisher() -> None:
            await store.submit(PutMessages([row("q", 11)]))
            submitted.set()

        async def waiter() -> None:
            await store.wait_for_space()
            spaced.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert not submitted.is_set() and not spaced.is_set()  # backpressure: waiting for room
            await tg.start(store.run)
            await submitted.wait()
            await spaced.wait()
            await store.close()
    assert await backend.count_after_reopen() == 11


async def test_close_commits_pending_and_refuses_more(backend, row, tmp_path):
    async with backend.open() as store:
        assert store.is_open
        outcomes: list[Exception | None] = []
        for i in range(1, 101):
            store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
        await store.close()
        assert outcomes == [None] * 100
        assert not store.is_open
        with pytest.raises(StorageClosed):
            store.submit_nowait(PutMessages([row("q", 101)]))
        with pytest.raises(StorageClosed):
            await store.submit(PutMessages([row("q", 101)]))
        with pytest.raises(StorageClosed):
            await store.wait_for_space()
        with pytest.raises(StorageClosed):
            await store.count("q")
        with pytest.raises(StorageClosed):
            await store.read_partition("s", 0, 0, 10)
        with pytest.raises(StorageClosed):
            await store.backup(str(tmp_path / "copy.db"))
        await store.close()  # idempotent
    assert await backend.count_after_reopen() == 100


async def test_nothing_works_before_open(backend, row):
    store = backend.new()
    assert not store.is_open
    with pytest.raises(StorageClosed):
        store.submit_nowait(PutMessages([row("q", 1)]))
    with pytest.raises(StorageClosed):
        await store.count("q")
    with pytest.raises(StorageClosed):
        await store.load_offsets("s")
    with pytest.raises(StorageClosed):
        await store.run()
    await store.close()  # a no-op


async def test_blocked_submitter_sees_close(backend, row):
    async with backend.open(run=False, mailbox_max_messages=1) as store:
        store.submit_nowait(PutMessages([row("q", 1)]))
        raised: list[BaseException] = []

        async def publisher() -> None:
            try:
                await store.submit(PutMessages([row("q", 2)]))
            except StorageClosed as exc:
                raised.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            await wait_all_tasks_blocked()
            await store.close()
        assert len(raised) == 1
    assert await backend.count_after_reopen() == 1


async def test_cancelled_actor_leaves_nothing_half_done(backend, row):
    """Cancelling the actor's task group never abandons an op: the running transaction
    completes and close() commits whatever is still queued."""
    async with backend.open(run=False) as store:
        outcomes: list[Exception | None] = []
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            for i in range(1, 2001):
                store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
            await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        await store.close()
        assert outcomes == [None] * 2000
    assert await backend.count_after_reopen() == 2000


async def test_actor_is_cancellable_under_sustained_load(backend, row):
    """The mailbox never empties here; cancelling the actor must still stop it."""
    async with backend.open(run=False, mailbox_max_messages=500) as store:
        ids = iter(range(1, 10**9))

        async def producer() -> None:
            while True:
                await store.submit(PutMessages([row("q", next(ids))]))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as outer:
            outer.start_soon(producer)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    await tg.start(store.run)
                    for _ in range(20):
                        await store.write(PutMessages([row("q", next(ids))]))
                    tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        await store.close()
        assert store.pending_ops == 0


async def test_write_reports_metrics(backend, row):
    async with backend.open() as store:
        seen: list[tuple[float, int]] = []
        store.on_commit = lambda seconds, messages: seen.append((seconds, messages))
        await store.write(PutMessages([row("q", i) for i in range(1, 6)]))
        assert store.last_batch_ops == 1 and store.last_batch_messages == 5
        assert seen and seen[-1][1] == 5
        assert store.commit_seconds_total >= store.last_commit_seconds >= 0
        assert store.pending_ops == store.pending_messages == store.pending_bytes == 0
        assert store.inflight_ops == store.inflight_messages == store.inflight_bytes == 0
        assert store.transaction_seconds == 0 and store.transaction_phase == "idle"
        assert not store.stalled and store.stalls == 0 and store.failed_transactions == 0


async def test_second_open_of_the_same_data_is_refused(backend):
    async with backend.open():
        with pytest.raises(StorageError):
            await backend.new().open()
    async with backend.open():  # released by the close
        pass


# --- queue reads ------------------------------------------------------------------------


async def test_paging_by_available_then_id_with_cursor(backend, row):
    # ids and availability deliberately disagree: delivery order is (available_ms, id).
    avail = {1: 300, 2: 100, 3: 200, 4: 100, 5: 300, 6: 50, 7: 200}
    async with backend.open() as store:
        await store.write(PutMessages([row("q", i, available_ms=a) for i, a in avail.items()]))
        await store.write(PutMessages([row("other", 1, available_ms=0)]))
        expected = sorted(avail, key=lambda i: (avail[i], i))
        got: list[int] = []
        after = None
        for _ in range(10):
            page = await store.load_messages("q", after, limit=3)
            if not page:
                break
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

        await store.write(UpdateMessages("q", [(6, 1_000, 2, "timeout"), (404, 1, 1, None)]))
        page = await store.load_messages("q", (300, 5))
        assert [(m.id, m.available_ms, m.deliveries, m.last_error) for m in page] == [(6, 1_000, 2, "timeout")]
        assert await store.count("q") == 7  # updating an absent id creates nothing


async def test_priority_lanes_page_by_available_then_id(backend, row):
    """A priority queue's rows carry their priority; reads filtered by it page one
    priority in (available_ms, id) order; updates and moves keep it; plain rows have None."""
    prio = {1: 0, 2: 5, 3: 5, 4: 0, 5: 9, 6: 5}
    avail = {1: 100, 2: 300, 3: 100, 4: 50, 5: 200, 6: 100}
    async with backend.open() as store:
        await store.write(PutMessages([row("p", i, available_ms=avail[i], priority=prio[i]) for i in prio]))
        await store.write(PutMessages([row("plain", 1)]))
        assert [m.id for m in await store.load_messages("p", None, priority=5)] == [3, 6, 2]
        assert [m.id for m in await store.load_messages("p", (100, 3), priority=5, limit=1)] == [6]
        assert [m.id for m in await store.load_messages("p", None, priority=5, due_before_ms=100)] == [3, 6]
        assert [m.id for m in await store.load_messages("p", None, priority=0)] == [4, 1]
        assert await store.load_messages("p", None, priority=3) == []
        assert await store.next_available_ms("p", None, priority=9) == 200
        assert await store.next_available_ms("p", (100, 6), priority=5) == 300
        assert await store.next_available_ms("p", (300, 2), priority=5) is None
        assert [m.id for m in await store.load_messages("p")] == [4, 1, 3, 6, 5, 2]  # unfiltered: every lane
        assert [await store.count("p", priority=x) for x in (0, 5, 9, 3)] == [2, 3, 1, 0]
        await store.write(UpdateMessages("p", [(3, 400, 1, "nack")]))
        await store.write(MoveMessages("p", [(6, row("p", 7, available_ms=100, priority=5))]))
    async with backend.open() as store:
        got = await store.load_messages("p", None, priority=5)
        assert [(m.id, m.available_ms, m.priority) for m in got] == [(7, 100, 5), (2, 300, 5), (3, 400, 5)]
        assert (await store.load_messages("plain"))[0].priority is None


async def test_delivery_marks_count_one_delivery_after_reopen(backend, row):
    """A delivery mark (per queue lane, the highest key delivered for the first time)
    only grows, is invisible to the open store, and makes recovery count one delivery
    for every message of its lane at or below it that says 0; purge and delete drop it."""
    async with backend.open() as store:
        await store.write(PutMessages([row("q", 1, available_ms=1000), row("q", 2, available_ms=1000),
                                       row("q", 3, available_ms=900), row("q", 4, available_ms=1000, deliveries=2),
                                       row("q", 5, available_ms=1000), row("q", 6, available_ms=5000)]))
        await store.write(PutMessages([row("p", i, available_ms=1000, priority=i % 2) for i in range(11, 15)]))
        await store.write(PutMessages([row("r", 21, available_ms=1000), row("other", 31, available_ms=1000)]))
        await store.write(MarkDelivered("q", [(PLAIN_LANE, 1000, 4)]))
        await store.write(MarkDelivered("q", [(PLAIN_LANE, 1000, 2)]))  # lower: changes nothing
        await store.write(MarkDelivered("p", [(1, 1000, 13), (0, 1000, 11)]))
        await store.write(MarkDelivered("r", [(PLAIN_LANE, 9000, 99)]))
        await store.write(PurgeQueue("r"))  # drops r's mark with its messages
        await store.write(PutMessages([row("r", 22, available_ms=1000)]))
        # the open store's reads say what was written
        assert [m.deliveries for m in await store.load_messages("q")] == [0, 0, 0, 2, 0, 0]
    async with backend.open() as store:
        got = {m.id: m.deliveries for m in await store.load_messages("q")}
        assert got == {3: 1, 1: 1, 2: 1, 4: 2, 5: 0, 6: 0}  # 5 and 6 sort after the mark (1000, 4)
        got = {m.id: (m.priority, m.deliveries) for m in await store.load_messages("p")}
        assert got == {11: (1, 1), 12: (0, 0), 13: (1, 1), 14: (0, 0)}  # lane 0's mark is (1000, 11)
        assert [m.deliveries for m in await store.load_messages("r")] == [0]
        assert [m.deliveries for m in await store.load_messages("other")] == [0]
    async with backend.open() as store:  # applying the marks again changes nothing
        assert [m.deliveries for m in await store.load_messages("q")] == [1, 1, 1, 2, 0, 0]
        await store.write(DeleteQueue("q"))
        await store.write(PutMessages([row("q", 41, available_ms=100)]))
    async with backend.open() as store:
        assert [m.deliveries for m in await store.load_messages("q")] == [0]


async def test_delivery_marks_of_one_batch_keep_the_highest(backend, row):
    async with backend.open(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            PutMessages([row("a", i, available_ms=100) for i in (1, 2, 3)]),
            MarkDelivered("a", [(PLAIN_LANE, 100, 2)]),
            MarkDelivered("a", [(PLAIN_LANE, 100, 1)]),
            DeleteMessages("a", [1]),
        ])
        assert outcomes == [None] * 4
    assert await _state(backend.new()) == {("a", 2): (100, 1), ("a", 3): (100, 0)}


async def test_count_oldest_and_listing(backend, row):
    async with backend.open() as store:
        await store.write(PutMessages([row("q", i, available_ms=100 - i) for i in range(1, 21)]))
        assert await store.count("q") == 20
        assert await store.count("nope") == 0
        assert [m.id for m in await store.oldest("q", 3)] == [1, 2, 3]
        assert [m.id for m in await store.list_messages("q", limit=5, offset=10)] == [11, 12, 13, 14, 15]
        await store.write(DeleteMessages("q", [1, 2, 12, 404]))
        assert [m.id for m in await store.oldest("q", 2)] == [3, 4]
        assert await store.count("q") == 17
        assert await store.list_messages("nope") == [] and await store.oldest("nope", 5) == []


async def test_message_fields_round_trip_and_survive_reopen(backend, row):
    headers = {"type": "order.created", "v": 2, "trace": b"\x00\xff", "nested": {"a": [1, "x"]}, "": None}
    m = row("q", 7, payload=b"\x00" * 3 + b"payload", headers=headers, msg_id="m-7", published_ms=123,
            expires_ms=9_999, deliveries=2, last_error="nope")
    bare = row("q", 8, payload=b"", headers=None)
    empty = row("q", 9, headers={})
    async with backend.open() as store:
        await store.write(PutMessages([m, bare, empty]))
        got = await store.load_messages("q")
        assert got == [m, bare, empty]
        got[0].headers["v"] = 3  # the caller's copy: the store is not changed through it
        got[0].deliveries = 99
        assert await store.load_messages("q") == [m, bare, empty]
    async with backend.open() as store:  # after a reopen
        assert await store.load_messages("q") == [m, bare, empty]
        assert (await store.load_messages("q"))[0].headers["trace"] == b"\x00\xff"  # bytes stay bytes


async def test_submitted_rows_are_copied_at_submit(backend, row):
    """The store keeps what was submitted, whatever the caller does with its objects later."""
    async with backend.open(run=False) as store:
        m = row("q", 1, headers={"k": "v"})
        store.submit_nowait(PutMessages([m]))
        m.headers["k"] = "changed"
        m.deliveries = 5
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.write(DeleteMessages("q", []))
            (stored,) = await store.load_messages("q")
            assert stored.headers == {"k": "v"} and stored.deliveries == 0
            await store.close()


async def test_dedup_check_and_expiry(backend, row):
    async with backend.open() as store:
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

        await store.write(ExpireDedup(2_000))  # forgets entries with expires_ms <= 2000
        assert await store.check_dedup(["m1", "m2"], now_ms=0) == {"m1": b"r1bis"}
    async with backend.open() as store:
        assert await store.check_dedup(["m1", "m2"], now_ms=0) == {"m1": b"r1bis"}


async def test_dedup_check_many_ids(backend, row):
    n = 2_500  # more than one SQL query's worth of parameters
    async with backend.open() as store:
        await store.write(PutMessages([row("q", i) for i in range(n)],
                                      [(f"id-{i}", 10_000, str(i).encode()) for i in range(0, n, 2)]))
        found = await store.check_dedup([f"id-{i}" for i in range(n)], now_ms=0)
        assert found == {f"id-{i}": str(i).encode() for i in range(0, n, 2)}


async def test_queues_and_id_high_water_mark_survive_reopen(backend, row):
    async with backend.open() as store:
        assert await store.max_message_id() == 0
        assert await store.load_queues() == []
        await store.write(PutQueue("orders", {"max_deliveries": 5, "dead_letter": "orders.dlq"}, 111))
        await store.write(PutQueue("orders.dlq", {"t": (1, 2)}, 112))
        await store.write(PutMessages([row("orders", 41), row("orders", 40)]))
        await store.write(DeleteMessages("orders", [40, 41]))
        assert await store.max_message_id() == 41
    async with backend.open() as store:
        # Every message is gone, but ids must never be reused.
        assert await store.max_message_id() == 41
        assert await store.load_queues() == [
            ("orders", {"dead_letter": "orders.dlq", "max_deliveries": 5}, 111), ("orders.dlq", {"t": [1, 2]}, 112)]
        await store.write(PutMessages([row("orders", 7)]))  # a lower id does not lower the mark
        assert await store.max_message_id() == 41


async def test_pages_bounded_in_bytes_keep_order_and_take_min_rows(backend, row):
    """max_bytes stops a page once the payloads would pass it; min_rows are
    returned whatever their size (a window always makes progress)."""
    sizes = [100, 100, 100, 5_000, 100]
    async with backend.open() as store:
        await store.write(PutMessages([row("q", i + 1, payload=b"x" * n) for i, n in enumerate(sizes)]))
        await store.write(PutMessages([], stream_rows=[srow("s", 0, o, payload=b"y" * n) for o, n in enumerate(sizes)]))
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


# --- one batch, many operations: the end state is that of the ops in order ------------


async def _all_in_one_batch(store: Store, ops: list[Any]) -> list[Exception | None]:
    """Queue every op before the actor runs, then let it commit them; return the outcomes."""
    outcomes: list[Exception | None] = [None] * len(ops)
    done = [anyio.Event() for _ in ops]
    for i, op in enumerate(ops):
        def on_done(error: Exception | None, i: int = i) -> None:
            outcomes[i] = error
            done[i].set()
        op.on_done = on_done
        store.submit_nowait(op)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        for ev in done:
            await ev.wait()
        await store.close()
    return outcomes


async def _state(store: Store) -> dict[tuple[str, int], tuple[int, int]]:
    await store.open()
    try:
        out = {}
        for q in ("a", "b"):
            for m in await store.load_messages(q, limit=10_000):
                out[(m.queue, m.id)] = (m.available_ms, m.deliveries)
        return out
    finally:
        await store.close()


async def test_put_then_delete_in_one_batch_ends_deleted(backend, row):
    async with backend.open(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            PutMessages([row("a", 1), row("a", 2)]),
            DeleteMessages("a", [1]),
            UpdateMessages("a", [(2, 5_000, 1, "boom")]),
        ])
        assert outcomes == [None, None, None] and store.commits == 1
    assert await _state(backend.new()) == {("a", 2): (5_000, 1)}


async def test_delete_then_put_in_one_batch_ends_present(backend, row):
    async with backend.open() as store:
        await store.write(PutMessages([row("a", 1, available_ms=1)]))
    async with backend.open(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            DeleteMessages("a", [1]),
            PutMessages([row("a", 1, available_ms=2)]),
            PutMessages([row("a", 3)]),
        ])
        assert outcomes == [None, None, None] and store.commits == 1
    assert await _state(backend.new()) == {("a", 1): (2, 0), ("a", 3): (1_000, 0)}


async def test_queue_ops_keep_their_place(backend, row):
    async with backend.open(run=False) as store:
        outcomes = await _all_in_one_batch(store, [
            PutQueue("a", {"max_deliveries": 5}, 10),
            PutMessages([row("a", 1), row("b", 1)]),
            PurgeQueue("a"),
            PutMessages([row("a", 2)]),
            PutQueue("b", {}, 11),
            DeleteQueue("b"),
            PutQueue("a", {"max_deliveries": 7}, 99),
        ])
        assert outcomes == [None] * 7 and store.commits == 1
    assert await _state(backend.new()) == {("a", 2): (1_000, 0)}
    async with backend.open() as store:
        assert await store.load_queues() == [("a", {"max_deliveries": 7}, 10)]  # created_ms kept


async def test_move_to_dead_letter_queue(backend, row):
    async with backend.open() as store:
        await store.write(PutMessages([row("a", i, headers={"k": "v"}) for i in (1, 2, 3)]))
        dlq_rows = [make_row("a.dlq", 100 + i, payload=f"a:{i}".encode(),
                             headers={"k": "v", "x-dlq-reason": "max_deliveries", "x-deliveries": 5})
                    for i in (1, 2)]
        await store.write(MoveMessages("a", [(1, dlq_rows[0]), (2, dlq_rows[1])]))
        assert [m.id for m in await store.load_messages("a")] == [3]
        assert await store.list_messages("a.dlq") == dlq_rows
        assert await store.max_message_id() == 102


async def test_move_is_atomic(backend, row):
    """If any inserted row clashes, no source row is deleted either."""
    async with backend.open() as store:
        await store.write(PutMessages([row("a", 1), row("a", 2), row("a.dlq", 51)]))
        op = MoveMessages("a", [(1, make_row("a.dlq", 50)), (2, make_row("a.dlq", 51))])
        with pytest.raises(StorageError):
            await store.write(op)
        assert [m.id for m in await store.load_messages("a")] == [1, 2]
        assert [m.id for m in await store.load_messages("a.dlq")] == [51]
        assert await store.max_message_id() == 51


QUEUES = st.sampled_from(["a", "b"])
IDS = st.integers(1, 8)


@st.composite
def ops(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["put", "put", "delete", "update", "move", "purge"]))
    q = draw(QUEUES)
    if kind == "put":
        return kind, (q, draw(st.lists(IDS, min_size=1, max_size=3, unique=True)))
    if kind == "delete":
        return kind, (q, draw(st.lists(IDS, min_size=1, max_size=3)))
    if kind == "update":
        return kind, (q, draw(st.lists(st.tuples(IDS, st.integers(0, 9)), min_size=1, max_size=3)))
    if kind == "move":
        olds = draw(st.lists(IDS, min_size=1, max_size=2, unique=True))
        news = draw(st.lists(st.tuples(QUEUES, IDS), min_size=len(olds), max_size=len(olds), unique=True))
        news = [n for n in news if n not in {(q, o) for o in olds}]  # (a key is never moved onto itself)
        return kind, (q, list(zip(olds, news)))
    return kind, (q,)


def _model(spec: list[tuple[str, Any]], state: dict[tuple[str, int], tuple[int, int]]) -> list[bool]:
    """Apply ops one at a time, each atomically, skipping those that would fail. Returns ok flags."""
    oks = []
    for kind, args in spec:
        new = dict(state)
        ok = True
        if kind == "put":
            q, ids = args
            for i in ids:
                ok = ok and (q, i) not in new
                new[(q, i)] = (1_000, 0)
        elif kind == "delete":
            for i in args[1]:
                new.pop((args[0], i), None)
        elif kind == "update":
            for i, avail in args[1]:
                if (args[0], i) in new:
                    new[(args[0], i)] = (avail, 3)
        elif kind == "move":
            q, moves = args
            olds = {(q, o) for o, _ in moves}
            for _, key in moves:  # the inserts happen before the deletes
                ok = ok and key not in new and key not in olds
                new[key] = (7, 0)
            for key in olds:
                new.pop(key, None)
        else:
            new = {k: v for k, v in new.items() if k[0] != args[0]}
        oks.append(ok)
        if ok:
            state.clear()
            state.update(new)
    return oks


def _op(kind: str, args: Any) -> Any:
    if kind == "put":
        return PutMessages([make_row(args[0], i) for i in args[1]])
    if kind == "delete":
        return DeleteMessages(args[0], list(args[1]))
    if kind == "update":
        return UpdateMessages(args[0], [(i, avail, 3, "e") for i, avail in args[1]])
    if kind == "move":
        return MoveMessages(args[0], [(o, make_row(k[0], k[1], available_ms=7)) for o, k in args[1]])
    return PurgeQueue(args[0])


@pytest.mark.parametrize("kind", BACKENDS)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(initial=st.lists(st.tuples(QUEUES, IDS), unique=True, max_size=6),
       spec=st.lists(ops(), min_size=1, max_size=25))
def test_one_batch_equals_ops_in_order(kind: str, initial: list[tuple[str, int]],
                                       spec: list[tuple[str, Any]], request: pytest.FixtureRequest) -> None:
    state = {k: (1_000, 0) for k in initial}
    expected_ok = _model(spec, state)
    url = request.getfixturevalue("pg_server").new_database() if kind == "postgres" else ""

    async def main(path: str) -> None:
        data = MemoryData()

        def new() -> Store:
            if kind == "postgres":
                return PostgresStore(url)
            return SqliteStore(path) if kind == "sqlite" else MemoryStore(data)

        store = new()
        await store.open()
        if initial:
            store.submit_nowait(PutMessages([make_row(q, i) for q, i in initial]))
            async with anyio.create_task_group() as tg:
                await tg.start(store.run)
                await store.close()
            store = new()
            await store.open()
        outcomes = await _all_in_one_batch(store, [_op(k, a) for k, a in spec])
        assert [e is None for e in outcomes] == expected_ok
        assert all(e is None or isinstance(e, StorageError) for e in outcomes)
        if all(expected_ok):
            assert store.commits == 1  # really one transaction, not rescued by retries
        assert await _state(new()) == state

    with tempfile.TemporaryDirectory() as d:
        anyio.run(main, str(Path(d) / "tidings.db"))


# --- streams ------------------------------------------------------------------------------


async def test_stream_declare_replace_delete_and_reopen(backend):
    async with backend.open() as store:
        assert await store.load_streams() == []
        await store.write(PutStream("s", {"partitions": 2, "max_age": 60}, 10))
        await store.write(PutStream("a", {"partitions": 1}, 20))
        await store.write(PutStream("s", {"partitions": 2, "max_age": 30, "keys": ("k",)}, 99))
    async with backend.open() as store:
        assert await store.load_streams() == [
            ("a", {"partitions": 1}, 20),
            ("s", {"keys": ["k"], "max_age": 30, "partitions": 2}, 10),  # created_ms kept
        ]


async def test_stream_rows_read_in_offset_order_per_partition(backend):
    hdr = {"h": b"\x01", "n": [1, 2]}
    async with backend.open() as store:
        await store.write(PutMessages([], stream_rows=[srow("s", 0, 2, ts=30), srow("s", 0, 0, ts=10),
                                                       srow("s", 1, 0, ts=15, key="k", headers=hdr)]))
        await store.write(PutMessages([], stream_rows=[srow("s", 0, 1, ts=20), srow("t", 0, 0)]))
        assert [r.offset for r in await store.read_partition("s", 0, 0, 10)] == [0, 1, 2]
        assert [r.offset for r in await store.read_partition("s", 0, 1, 10)] == [1, 2]  # from is inclusive
        assert [r.offset for r in await store.read_partition("s", 0, 0, 2)] == [0, 1]
        assert await store.read_partition("s", 0, 3, 10) == []
        assert await store.read_partition("s", 7, 0, 10) == []
        assert await store.read_partition("nope", 0, 0, 10) == []
        (one,) = await store.read_partition("s", 1, 0, 10)
        assert one == srow("s", 1, 0, ts=15, key="k", headers=hdr)
    async with backend.open() as store:
        assert await store.read_partition("s", 1, 0, 10) == [srow("s", 1, 0, ts=15, key="k", headers=hdr)]
        rows = await store.read_partition("s", 0, 0, 10)
        assert [(r.offset, r.timestamp_ms, r.payload) for r in rows] == [
            (0, 10, b"s:0:0"), (1, 20, b"s:0:1"), (2, 30, b"s:0:2")]


async def test_stream_bounds_time_lookup_and_retention_cutoffs(backend):
    rows = [srow("s", 0, o, payload=b"x" * 36, ts=100 * (o + 1)) for o in range(5)]  # 100 bytes each
    async with backend.open() as store:
        await store.write(PutMessages([], stream_rows=[*rows, srow("s", 1, 4, payload=b"", ts=7)]))
        assert await store.partition_bounds("s") == {0: (0, 4, 500), 1: (4, 4, 64)}
        assert await store.partition_bounds("nope") == {}
        assert await store.offset_for_time("s", 0, 0) == 0
        assert await store.offset_for_time("s", 0, 250) == 2
        assert await store.offset_for_time("s", 0, 300) == 2  # inclusive
        assert await store.offset_for_time("s", 0, 501) is None
        assert await store.cutoff_by_age("s", 0, 300) == 2  # offsets 0, 1 are older than 300
        assert await store.cutoff_by_age("s", 0, 100) is None
        assert await store.cutoff_by_age("s", 0, 10**9) == 5
        assert await store.cutoff_by_bytes("s", 0, 500) is None  # all fit
        assert await store.cutoff_by_bytes("s", 0, 499) == 1
        assert await store.cutoff_by_bytes("s", 0, 250) == 3  # the newest two fit
        assert await store.cutoff_by_bytes("s", 0, 0) == 5
        assert await store.cutoff_by_bytes("nope", 0, 0) is None


async def test_trim_keeps_a_floor_even_when_the_partition_empties(backend):
    async with backend.open() as store:
        await store.write(PutMessages([], stream_rows=[srow("s", 0, o) for o in range(5)]))
        assert await store.partition_floors("s") == {}
        await store.write(TrimStream("s", 0, 3))
        assert [r.offset for r in await store.read_partition("s", 0, 0, 10)] == [3, 4]
        assert await store.partition_floors("s") == {0: 3}
        await store.write(TrimStream("s", 0, 2))  # a lower trim never lowers the floor
        assert await store.partition_floors("s") == {0: 3}
        await store.write(TrimStream("s", 0, 10))
        assert await store.read_partition("s", 0, 0, 10) == []
        assert await store.partition_bounds("s") == {}
    async with backend.open() as store:
        assert await store.partition_floors("s") == {0: 10}


async def test_group_offsets_and_next_marks_never_go_backwards(backend):
    async with backend.open() as store:
        assert await store.load_offsets("s") == {}
        await store.write(CommitOffsets([("s", "g", 0, 5, 7), ("s", "g", 1, 1, 1), ("s", "h", 0, 2, 2),
                                         ("t", "g", 0, 9, 9)]))
        await store.write(CommitOffsets([("s", "g", 0, 3, 9)]))  # committed lower, delivered higher
        assert await store.load_offsets("s") == {"g": {0: (5, 9), 1: (1, 1)}, "h": {0: (2, 2)}}
        await store.write(MarkStreamNext([("s", 0, 8), ("s", 1, 3)]))
        await store.write(MarkStreamNext([("s", 0, 6)]))
        assert await store.partition_marks("s") == {0: 8, 1: 3}
        assert await store.partition_marks("t") == {}
    async with backend.open() as store:
        assert await store.load_offsets("s") == {"g": {0: (5, 9), 1: (1, 1)}, "h": {0: (2, 2)}}
        assert await store.load_offsets("t") == {"g": {0: (9, 9)}}
        assert await store.partition_marks("s") == {0: 8, 1: 3}


async def test_delete_group_removes_its_offsets_only(backend):
    async with backend.open() as store:
        await store.write(CommitOffsets([("s", "g", 0, 5, 7), ("s", "g", 1, 1, 1), ("s", "h", 0, 2, 2),
                                         ("t", "g", 0, 9, 9)]))
        await store.write(DeleteGroup("s", "g"))
        await store.write(DeleteGroup("s", "absent"))  # nothing to delete: no error
        assert await store.load_offsets("s") == {"h": {0: (2, 2)}}
    async with backend.open(run=False) as store:
        # in one batch, the delete keeps its place among the commits
        errors = await _all_in_one_batch(store, [CommitOffsets([("s", "h", 1, 3, 3)]), DeleteGroup("s", "h"),
                                                 CommitOffsets([("s", "h", 0, 1, 1)])])
        assert errors == [None, None, None] and store.commits == 1
    async with backend.open() as store:
        assert await store.load_offsets("s") == {"h": {0: (1, 1)}}
        assert await store.load_offsets("t") == {"g": {0: (9, 9)}}


async def test_delete_stream_removes_everything_of_it_only(backend):
    async with backend.open() as store:
        for name in ("s", "t"):
            await store.write(PutStream(name, {}, 1))
            await store.write(PutMessages([], stream_rows=[srow(name, 0, 0), srow(name, 0, 1)]))
            await store.write(CommitOffsets([(name, "g", 0, 1, 1)]))
            await store.write(MarkStreamNext([(name, 0, 5)]))
            await store.write(TrimStream(name, 0, 1))
        await store.write(DeleteStream("s"))
        assert [s[0] for s in await store.load_streams()] == ["t"]
        assert await store.read_partition("s", 0, 0, 10) == []
        assert (await store.load_offsets("s"), await store.partition_marks("s"),
                await store.partition_floors("s"), await store.partition_bounds("s")) == ({}, {}, {}, {})
        assert await store.load_offsets("t") == {"g": {0: (1, 1)}}
        assert await store.partition_marks("t") == {0: 5} and await store.partition_floors("t") == {0: 1}
        assert [r.offset for r in await store.read_partition("t", 0, 0, 10)] == [1]
        # a stream of the same name starts afresh
        await store.write(PutStream("s", {}, 2))
        await store.write(PutMessages([], stream_rows=[srow("s", 0, 0)]))
        assert [r.offset for r in await store.read_partition("s", 0, 0, 10)] == [0]


async def test_publish_to_queues_and_streams_is_atomic(backend, row):
    """A fan-out publish is one op: a clashing stream offset fails its queue rows and
    dedup entry too, and the ops around it still commit."""
    async with backend.open() as store:
        await store.write(PutMessages([row("q", 1)], stream_rows=[srow("s", 0, 0)]))
        outcomes: list[Exception | None] = []
        store.submit_nowait(PutMessages([row("q", 2)], [("m2", 10**12, b"r")], on_done=outcomes.append,
                                        stream_rows=[srow("s", 0, 1), srow("s", 0, 0)]))
        store.submit_nowait(PutMessages([row("q", 3)], stream_rows=[srow("s", 0, 1)], on_done=outcomes.append))
        await store.write(DeleteMessages("q", []))
        assert isinstance(outcomes[0], StorageError) and outcomes[1] is None
        assert [m.id for m in await store.load_messages("q")] == [1, 3]
        assert await store.check_dedup(["m2"], now_ms=0) == {}
        assert [r.offset for r in await store.read_partition("s", 0, 0, 10)] == [0, 1]
        assert (await store.read_partition("s", 0, 1, 1))[0].payload == b"s:0:1"


# --- schema registry ----------------------------------------------------------------------

ORDER_V1 = {"type": "object", "properties": {"amount": {"type": "number"}, "note": {"enum": ["a", None]}},
            "required": ["amount"]}


async def test_schema_versions_are_immutable_and_survive_reopen(backend):
    async with backend.open() as store:
        assert await store.load_schemas() == []
        await store.write(PutSchema("Order", 1, ORDER_V1, "backward", 10))
        await store.write(PutSchema("Order", 2, True, "full", 20))
        await store.write(PutSchema("Alpha", 1, {"type": "string"}, "none", 30))
        with pytest.raises(StorageError):  # a version is stored once: the second write fails alone
            await store.write(PutSchema("Order", 1, {"type": "string"}, "none", 40))
    async with backend.open() as store:
        assert await store.load_schemas() == [
            ("Alpha", 1, {"type": "string"}, "none", 30),
            ("Order", 1, ORDER_V1, "backward", 10),
            ("Order", 2, True, "full", 20),
        ]


async def test_schema_document_that_json_cannot_hold_is_refused_at_submit(backend):
    async with backend.open() as store:
        with pytest.raises((TypeError, ValueError)):
            store.submit_nowait(PutSchema("Bad", 1, {"x": b"bytes"}, "none", 1))
        with pytest.raises((TypeError, ValueError)):
            store.submit_nowait(PutSchema("Bad", 1, {"x": float("nan")}, "none", 1))
        assert await store.load_schemas() == []


async def test_schema_bindings_replace_delete_and_survive_reopen(backend):
    async with backend.open() as store:
        await store.write(PutSchemaBinding("orders.placed", "Order", "reject", None, 1))
        await store.write(PutSchemaBinding("orders.*", "Order", "dead_letter", "bad-orders", 2))
        await store.write(PutSchemaBinding("orders.placed", "Order2", "reject", None, 3))  # replaces
        await store.write(PutSchemaBinding("gone", "X", "reject", None, 4))
        await store.write(DeleteSchemaBinding("gone"))
        await store.write(DeleteSchemaBinding("never-there"))
    async with backend.open() as store:
        assert await store.load_schema_bindings() == [
            ("orders.*", "Order", "dead_letter", "bad-orders", 2),
            ("orders.placed", "Order2", "reject", None, 3),
        ]


# --- backup -------------------------------------------------------------------------------


async def test_backup_copies_committed_state_or_refuses_cleanly(backend, row, tmp_path):
    """SQLite writes a copy that opens as a store; the memory store, which has no file,
    raises StorageError and creates nothing. Neither ever replaces a file."""
    copy = tmp_path / "backups" / "copy.db"
    copy.parent.mkdir()
    stale = tmp_path / "backups" / "stale.db"
    stale.write_bytes(b"stale")
    async with backend.open() as store:
        await store.write(PutQueue("q", {"k": 1}, 5))
        await store.write(PutMessages([row("q", 1)], stream_rows=[srow("s", 0, 0)]))
        await store.write(PutSchema("Order", 1, ORDER_V1, "backward", 6))
        await store.write(PutSchemaBinding("orders.placed", "Order", "reject", None, 7))
        with pytest.raises(StorageError):
            await store.backup(str(stale))
        assert stale.read_bytes() == b"stale"
        if backend.kind in ("memory", "postgres"):  # no file to copy: pg_dump is PostgreSQL's tool
            with pytest.raises(StorageError):
                await store.backup(str(copy))
            assert list(copy.parent.iterdir()) == [stale]
            return
        await store.backup(str(copy))
    restored = SqliteStore(copy)
    await restored.open()
    try:
        assert await restored.load_queues() == [("q", {"k": 1}, 5)]
        assert [m.id for m in await restored.load_messages("q")] == [1]
        assert [r.offset for r in await restored.read_partition("s", 0, 0, 10)] == [0]
        assert await restored.load_schemas() == [("Order", 1, ORDER_V1, "backward", 6)]
        assert await restored.load_schema_bindings() == [("orders.placed", "Order", "reject", None, 7)]
    finally:
        await restored.close()
