"""SqliteStore's commit path (issue 14, items 2-3): one SQLite-thread hop per
transaction, bookkeeping that rides the next publish commit, checkpoints off the
commit path with a bounded WAL.

Nothing here depends on timing: the actor is started after the ops are queued
(one batch), delays that must not expire are an hour long, and waits are bounded
polls of the store's state."""

from __future__ import annotations

import os

import aiosqlite
import anyio
import pytest

from tidings.broker.durable.store import (
    DeleteMessages,
    PurgeQueue,
    PutMessages,
    StorageError,
    UpdateMessages,
    sqlite as store_sqlite,
)
from tidings.broker.durable.store.base import PLAIN_LANE, MarkDelivered, waited

WAIT = 30.0  # generous bound on each wait: a loaded machine is slow, never this slow


async def wait_until(cond: object) -> None:
    with anyio.fail_after(WAIT):
        while not cond():  # type: ignore[operator]
            await anyio.sleep(0.01)


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every call aiosqlite hands to its thread, from now on."""
    calls: list[object] = []
    real = aiosqlite.Connection._execute

    async def counting(self: aiosqlite.Connection, fn: object, *args: object, **kwargs: object) -> object:
        calls.append(fn)
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counting)
    return calls


async def test_a_transaction_is_one_sqlite_thread_hop(open_store, row, monkeypatch):
    # Inserts, an update, deletes, a whole-queue statement and the id high-water mark:
    # before, one hand-off per statement (BEGIN ... COMMIT: 8 here); now one.
    async with open_store(run=False) as store:
        outcomes: list[Exception | None] = []
        store.submit_nowait(PutMessages([row("q", 1), row("q", 2), row("q", 3)], on_done=outcomes.append))
        store.submit_nowait(UpdateMessages("q", [(1, 5_000, 1, None)], on_done=outcomes.append))
        store.submit_nowait(DeleteMessages("q", [2], on_done=outcomes.append))
        store.submit_nowait(PurgeQueue("other", on_done=outcomes.append))
        store.submit_nowait(PutMessages([row("q", 9)], on_done=outcomes.append))
        hops = count_hops(monkeypatch)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await wait_until(lambda: len(outcomes) == 5)
            assert outcomes == [None] * 5
            assert store.commits == 1 and store.last_batch_ops == 5
            assert len(hops) == 1
            monkeypatch.undo()
            await store.close()
        assert store.failed_transactions == 0 and store.transaction_phase == "idle"


async def test_a_failed_op_still_fails_alone_in_one_hop(open_store, row, monkeypatch):
    async with open_store(run=False) as store:
        await_first: list[Exception | None] = []
        store.submit_nowait(PutMessages([row("q", 1)], on_done=await_first.append))
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await wait_until(lambda: await_first == [None])
            outcomes: dict[int, Exception | None] = {}
            store_ops = [PutMessages([row("q", 2)]), PutMessages([row("q", 1)]),  # a duplicate key
                         DeleteMessages("q", [2]), PutMessages([row("q", 3)])]
            for i, op in enumerate(store_ops):
                op.on_done = lambda error, i=i: outcomes.__setitem__(i, error)
                store.submit_nowait(op)
            await wait_until(lambda: len(outcomes) == 4)
            assert isinstance(outcomes.pop(1), StorageError)
            assert outcomes == {0: None, 2: None, 3: None}
            assert store.failed_ops == 1
            assert await store.count("q") == 2  # 1 and 3
            tg.cancel_scope.cancel()


async def test_bookkeeping_rides_the_next_publish_commit(open_store, row, monkeypatch):
    monkeypatch.setattr(store_sqlite, "BOOKKEEPING_DELAY", 3600.0)  # only a publish ends the wait here
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1), row("q", 2), row("q", 3)]))  # publishes are arriving
        commits = store.commits
        outcomes: list[str] = []
        store.submit_nowait(DeleteMessages("q", [1], on_done=lambda e: outcomes.append(f"ack {e}")))
        store.submit_nowait(UpdateMessages("q", [(2, 9_000, 1, None)],
                                           on_done=lambda e: outcomes.append(f"count {e}")))
        await anyio.wait_all_tasks_blocked()
        assert store.commits == commits and outcomes == []  # no transaction of their own
        assert store.pending_ops == 2
        store.submit_nowait(PutMessages([row("q", 4)], on_done=lambda e: outcomes.append(f"publish {e}")))
        await wait_until(lambda: len(outcomes) == 3)
        assert outcomes == ["ack None", "count None", "publish None"]
        assert store.commits == commits + 1  # one commit for all three
        assert await store.count("q") == 3


async def test_waited_bookkeeping_and_the_row_bound_commit_at_once(open_store, row, monkeypatch):
    monkeypatch.setattr(store_sqlite, "BOOKKEEPING_DELAY", 3600.0)
    monkeypatch.setattr(store_sqlite, "BOOKKEEPING_MAX_ROWS", 4)
    async with open_store() as store:
        await store.write(PutMessages([row("q", i) for i in range(1, 10)]))
        # someone waits on it (write): no holding back
        with anyio.fail_after(WAIT):
            await store.write(DeleteMessages("q", [1]))
        await store.write(PutMessages([row("q", 20)]))
        # fire-and-forget, but as many rows as the bound: committed without a publish
        outcomes: list[Exception | None] = []
        store.submit_nowait(DeleteMessages("q", [2, 3], on_done=outcomes.append))
        store.submit_nowait(DeleteMessages("q", [4, 5], on_done=outcomes.append))
        await wait_until(lambda: len(outcomes) == 2)
        assert outcomes == [None, None]
        assert await store.count("q") == 5


async def test_marks_ride_and_a_waited_callback_commits_at_once(open_store, row, monkeypatch):
    """A delivery mark is bookkeeping like a count; an op whose callback someone awaits
    (an ACK that asked for its outcome: base.waited) is not held back."""
    monkeypatch.setattr(store_sqlite, "BOOKKEEPING_DELAY", 3600.0)
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1), row("q", 2)]))  # publishes are arriving
        commits = store.commits
        outcomes: list[str] = []
        store.submit_nowait(MarkDelivered("q", [(PLAIN_LANE, 0, 1)], on_done=lambda e: outcomes.append(f"mark {e}")))
        await anyio.wait_all_tasks_blocked()
        assert store.commits == commits and outcomes == []  # held for the next publish
        store.submit_nowait(DeleteMessages("q", [2], on_done=waited(lambda e: outcomes.append(f"ack {e}"))))
        await wait_until(lambda: len(outcomes) == 2)
        assert sorted(outcomes) == ["ack None", "mark None"] and store.commits == commits + 1


async def test_bookkeeping_without_publishes_is_not_held(open_store, row, monkeypatch):
    monkeypatch.setattr(store_sqlite, "BOOKKEEPING_DELAY", 3600.0)
    async with open_store() as store:
        # nothing published lately: an ack commits at once, it waits for no publish
        outcomes: list[Exception | None] = []
        store.submit_nowait(DeleteMessages("q", [1], on_done=outcomes.append))
        await wait_until(lambda: outcomes == [None])
        assert store.commits == 1


async def test_no_automatic_checkpoint_and_the_wal_stays_bounded(open_store, row, monkeypatch, db_path):
    # The background checkpoint never runs here: the actor's bound alone keeps the WAL small.
    monkeypatch.setattr(store_sqlite, "CHECKPOINT_INTERVAL", 3600.0)
    monkeypatch.setattr(store_sqlite, "JOURNAL_SIZE_LIMIT", 32 * 1024)
    monkeypatch.setattr(store_sqlite, "WAL_MAX_BYTES", 128 * 1024)
    wal = str(db_path) + "-wal"
    batch_bytes = 20 * 1024  # payloads of one write below
    async with open_store() as store:
        assert (await store._fetch("PRAGMA wal_autocheckpoint"))[0][0] == 0
        largest = 0
        for n in range(300):  # ~6 MiB of payload through the WAL, inserted then deleted
            ids = range(n * 20 + 1, n * 20 + 21)
            await store.write(PutMessages([row("q", i, payload=os.urandom(1024)) for i in ids]))
            await store.write(DeleteMessages("q", list(ids)))
            largest = max(largest, os.stat(wal).st_size)
        assert store.forced_checkpoints >= 1
        # the WAL passes the bound by at most the commits before the forced checkpoint
        assert largest <= store_sqlite.WAL_MAX_BYTES + 8 * batch_bytes
        assert await store.count("q") == 0


async def test_the_background_checkpoint_runs_on_its_own(open_store, row, monkeypatch, peek):
    monkeypatch.setattr(store_sqlite, "CHECKPOINT_INTERVAL", 0.01)
    async with open_store() as store:
        await store.write(PutMessages([row("q", i) for i in range(1, 50)]))
        await wait_until(lambda: store.checkpoints >= 1)
        assert store.forced_checkpoints == 0
        idle = store.checkpoints
        assert peek("SELECT count(*) FROM messages")[0][0] == 49
        # no commits, no checkpoints: the thread only looks
        await store.write(PutMessages([row("q", 100)]))
        await wait_until(lambda: store.checkpoints > idle)
    assert peek("SELECT count(*) FROM messages")[0][0] == 50
