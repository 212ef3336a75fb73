"""The storage actor: group commit, callbacks after commit, backpressure, failure isolation, close."""

from __future__ import annotations

import logging
import sqlite3

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from tidings.broker.durable.store import (
    DeleteMessages,
    PutMessages,
    SqliteStore,
    StorageClosed,
    StorageError,
)


async def test_concurrent_writes_share_commits(open_store, row):
    async with open_store() as store:
        async with anyio.create_task_group() as tg:
            for i in range(1, 501):
                tg.start_soon(store.write, PutMessages([row("q", i)]))
        assert store.committed_ops == 500
        assert store.committed_messages == 500
        assert store.commits < 50, f"{store.commits} commits for 500 concurrent writes: no group commit"
        assert await store.count("q") == 500


async def test_everything_pending_commits_in_one_transaction(open_store, row):
    async with open_store(run=False) as store:
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


async def test_callback_runs_only_after_commit(open_store, row, peek):
    async with open_store() as store:
        seen: list[int] = []

        def on_done(error: Exception | None) -> None:
            assert error is None
            # Another connection sees the row already: the transaction has committed.
            seen.append(peek("SELECT count(*) FROM messages WHERE queue = 'q'")[0][0])

        commits = store.commits
        op = PutMessages([row("q", i) for i in range(1, 11)], on_done=on_done)
        store.submit_nowait(op)
        assert seen == []  # never synchronously, never before the commit
        await store.write(DeleteMessages("q", [999]))
        assert seen == [10]
        assert store.commits > commits


async def test_callback_exception_is_logged_and_actor_survives(open_store, row, caplog):
    def bad(error: Exception | None) -> None:
        raise RuntimeError("callback bug")

    async with open_store() as store:
        store.submit_nowait(PutMessages([row("q", 1)], on_done=bad))
        await store.write(PutMessages([row("q", 2)]))
        await store.write(PutMessages([row("q", 3)]))
        assert await store.count("q") == 3
    assert any("callback raised" in r.getMessage() for r in caplog.records)


async def test_failed_op_fails_alone(open_store, row):
    """A bad op (duplicate key) in a batch fails; the others in its batch still commit."""
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1)]))
        outcomes: dict[int, Exception | None] = {}

        def record(i: int):
            return lambda error: outcomes.__setitem__(i, error)

        for i in range(2, 12):
            ids = [1] if i == 7 else [i]  # op 7 repeats id 1
            store.submit_nowait(PutMessages([row("q", n) for n in ids], on_done=record(i)))
        await store.write(DeleteMessages("q", [12345]))
        assert isinstance(outcomes.pop(7), StorageError)
        assert outcomes == {i: None for i in range(2, 12) if i != 7}
        assert await store.count("q") == 10
        assert store.failed_ops == 1
        assert store.failed_transactions <= 5  # bisection: about log2(10) retries, not 10
        with pytest.raises(StorageError, match="UNIQUE"):
            await store.write(PutMessages([row("q", 1)]))


async def test_malformed_op_is_refused_at_submit(open_store, row):
    async with open_store() as store:
        with pytest.raises(TypeError):
            store.submit_nowait(PutMessages([row("q", 1, headers={"x": object()})]))
        with pytest.raises(TypeError):
            store.submit_nowait("not an op")  # type: ignore[arg-type]
        assert store.pending_ops == 0


async def test_full_mailbox_blocks_submit_until_drained(open_store, row):
    async with open_store(run=False, mailbox_max_messages=10) as store:
        for i in range(1, 6):
            store.submit_nowait(PutMessages([row("q", 2 * i - 1), row("q", 2 * i)]))
        assert store.pending_messages == 10
        with pytest.raises(anyio.WouldBlock):
            store.submit_nowait(PutMessages([row("q", 11)]))
        submitted = anyio.Event()

        async def publisher() -> None:
            await store.submit(PutMessages([row("q", 11)]))
            submitted.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            await wait_all_tasks_blocked()
            assert not submitted.is_set()  # backpressure: waiting for room
            await tg.start(store.run)
            await submitted.wait()
            await store.close()
        assert await _count_after_reopen(store.path) == 11


async def test_close_commits_pending_and_refuses_more(open_store, row):
    async with open_store() as store:
        outcomes: list[Exception | None] = []
        for i in range(1, 101):
            store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
        await store.close()
        assert outcomes == [None] * 100
        with pytest.raises(StorageClosed):
            store.submit_nowait(PutMessages([row("q", 101)]))
        with pytest.raises(StorageClosed):
            await store.submit(PutMessages([row("q", 101)]))
        with pytest.raises(StorageClosed):
            await store.count("q")
    assert await _count_after_reopen(store.path) == 100


async def test_blocked_submitter_sees_close(open_store, row):
    async with open_store(run=False, mailbox_max_messages=1) as store:
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
    assert await _count_after_reopen(store.path) == 1


async def test_cancelled_actor_leaves_nothing_half_done(open_store, row):
    """Cancelling the actor's task group never abandons an op: the running transaction
    completes (it is shielded) and close() commits whatever is still queued."""
    async with open_store(run=False) as store:
        outcomes: list[Exception | None] = []
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            for i in range(1, 2001):
                store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
            await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        await store.close()
        assert outcomes == [None] * 2000
    assert await _count_after_reopen(store.path) == 2000


async def test_write_reports_metrics(open_store, row):
    async with open_store() as store:
        await store.write(PutMessages([row("q", i) for i in range(1, 6)]))
        assert store.last_batch_ops == 1 and store.last_batch_messages == 5
        assert store.last_commit_seconds > 0 and store.commit_seconds_total >= store.last_commit_seconds
        assert store.pending_ops == store.pending_messages == store.pending_bytes == 0


async def _count_after_reopen(path: str) -> int:
    store = SqliteStore(path)
    await store.open()
    try:
        return await store.count("q")
    finally:
        await store.close()


def test_bad_durability_is_refused(tmp_path):
    with pytest.raises(ValueError):
        SqliteStore(tmp_path / "x.db", "fast")  # type: ignore[arg-type]


async def test_normal_durability_warns(open_store, caplog):
    with caplog.at_level(logging.WARNING, logger="tidings.broker.durable.store.sqlite"):
        async with open_store(durability="normal") as store:
            assert store.durability == "normal"
            sync = (await store._fetch("PRAGMA synchronous"))[0][0]
            assert sync == 1  # NORMAL
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "power loss" in warnings[0].getMessage()


async def test_full_durability_is_default_and_quiet(open_store, caplog):
    with caplog.at_level(logging.WARNING, logger="tidings.broker.durable.store.sqlite"):
        async with open_store() as store:
            assert store.durability == "full"
            assert (await store._fetch("PRAGMA synchronous"))[0][0] == 2  # FULL
            assert (await store._fetch("PRAGMA journal_mode"))[0][0] == "wal"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_second_open_of_a_data_dir_is_refused(open_store, db_path):
    async with open_store():
        other = SqliteStore(db_path)
        with pytest.raises(StorageError, match="another tidings process"):
            await other.open()


async def test_not_a_database_is_refused(tmp_path):
    path = tmp_path / "tidings.db"
    path.write_bytes(b"this is not sqlite" * 100)
    store = SqliteStore(path)
    with pytest.raises(StorageError, match="cannot open"):
        await store.open()
    path.unlink()  # the failed open released the data directory's lock
    store = SqliteStore(path)
    await store.open()
    await store.close()


async def test_database_wide_error_fails_the_batch_without_retries(open_store, row, db_path):
    """An error that is not about one op's data (here: another connection holds the write
    lock past busy_timeout) fails the whole batch at once instead of op by op."""
    async with open_store() as store:
        await store._fetch("PRAGMA busy_timeout = 50")
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            outcomes: list[Exception | None] = []
            for i in range(1, 9):
                store.submit_nowait(PutMessages([row("q", i)], on_done=outcomes.append))
            with pytest.raises(StorageError, match="locked"):
                await store.write(PutMessages([row("q", 9)]))
            assert len(outcomes) == 8 and all(isinstance(e, StorageError) for e in outcomes)
            assert store.failed_ops == 9
            assert store.failed_transactions == 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await store.write(PutMessages([row("q", 10)]))  # and the store carries on
        assert [m.id for m in await store.load_messages("q")] == [10]


async def test_actor_is_cancellable_under_sustained_load(open_store, row):
    """The mailbox never empties here; cancelling the actor must still stop it promptly."""
    async with open_store(run=False, mailbox_max_messages=500) as store:
        ids = iter(range(1, 10**9))

        async def producer() -> None:
            while True:
                await store.submit(PutMessages([row("q", next(ids))]))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as outer:
            outer.start_soon(producer)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    await tg.start(store.run)
                    for _ in range(20):
                        await store.write(PutMessages([row("q", next(ids))]))
                    tg.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        await store.close()
        assert store.pending_ops == 0
