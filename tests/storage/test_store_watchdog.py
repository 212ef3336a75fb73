"""A storage transaction that does not return is loud: the batch in flight is
counted, the watchdog logs an ERROR with the stacks, `stalled` flips while it
lasts and the store recovers once the transaction ends.

The stall is real, not simulated: another connection holds the database's
write lock (as a backup or an admin tool can), and the store's busy timeout is
raised so that its BEGIN waits until the test lets go. The test decides when
the stall ends, so nothing here depends on timing."""

from __future__ import annotations

import logging
import sqlite3

import anyio
import pytest

from tidings.broker.durable.store import PutMessages, sqlite as store_sqlite

WAIT = 30.0  # generous bound on each wait: a loaded machine is slow, never this slow


async def wait_until(cond: object) -> None:
    with anyio.fail_after(WAIT):
        while not cond():  # type: ignore[operator]
            await anyio.sleep(0.01)


async def test_a_stalled_transaction_is_counted_logged_and_recovers(open_store, row, db_path, monkeypatch,
                                                                    caplog):
    monkeypatch.setattr(store_sqlite, "BUSY_TIMEOUT_MS", 3_600_000)  # the BEGIN waits until we let go
    caplog.set_level(logging.WARNING, logger="tidings.broker.durable.store.sqlite")
    async with open_store(stall_timeout=0.05) as store:
        assert (store.inflight_ops, store.transaction_seconds, store.stalled) == (0, 0.0, False)
        assert store.stalls == 0
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
        outcomes: list[Exception | None] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.watchdog)
            store.submit_nowait(PutMessages([row("q", 1, payload=b"x" * 100), row("q", 2, payload=b"y" * 50)],
                                            on_done=outcomes.append))
            await wait_until(lambda: store.stalls == 1)
            # the batch being committed is visible, and how long it has run
            assert store.stalled
            assert (store.inflight_ops, store.inflight_messages, store.inflight_bytes) == (1, 2, 150)
            assert store.transaction_seconds > store.stall_timeout
            assert store.transaction_phase == "BEGIN"
            store.submit_nowait(PutMessages([row("q", 3)], on_done=outcomes.append))
            assert store.pending_ops == 1  # waiting behind it
            [rec] = [r for r in caplog.records if r.levelno == logging.ERROR]
            text = rec.getMessage()
            assert "phase BEGIN" in text and "1 ops / 2 messages / 150 bytes in flight" in text
            assert "storage actor task:" in text and "in _transaction" in text  # the actor's await chain
            assert "SQLite thread" in text and "(in a call)" in text  # the thread's stack: SQLite waits
            assert "_connection_worker_thread" in text
            assert outcomes == []

            blocker.execute("COMMIT")  # the stall ends: the batch commits, then the next one
            await wait_until(lambda: len(outcomes) == 2)
            assert outcomes == [None, None]
            assert not store.stalled and store.transaction_seconds == 0.0
            assert (store.inflight_ops, store.inflight_messages, store.inflight_bytes) == (0, 0, 0)
            assert store.transaction_phase == "idle"
            assert any("the stalled batch (1 ops) ended after" in r.getMessage() for r in caplog.records
                       if r.levelno == logging.WARNING)
            assert store.stalls == 1  # reported once per stalled batch
            tg.cancel_scope.cancel()
        blocker.close()
        assert await store.count("q") == 3


def test_stall_timeout_must_be_positive(db_path):
    with pytest.raises(ValueError, match="stall_timeout"):
        store_sqlite.SqliteStore(db_path, stall_timeout=0)


async def test_the_report_tells_an_idle_sqlite_thread_from_a_busy_one(open_store, row):
    # Idle while the actor would await it means a lost completion, not SQLite waiting.
    async with open_store() as store:
        await store.write(PutMessages([row("q", 1)]))
        # The thread may still be handing the result back for a moment: a bounded poll.
        with anyio.fail_after(WAIT):
            while "(idle, waiting for work)" not in (report := store.stack_report()):
                await anyio.sleep(0.01)
        assert "SQLite thread" in report and "store lock: free" in report


async def test_cancelled_waiters_and_reads_leave_no_drift(open_store, row):
    """What the kill -9 test's stall would need and this rules out: a submitter cancelled
    while it waits for space, or a read cancelled while it holds the store's connection,
    leaves the mailbox counters off (`_full()` true with nothing queued) or the actor
    unable to take its lock."""
    async with open_store(run=False, mailbox_max_messages=10) as store:
        done: list[Exception | None] = []
        store.submit_nowait(PutMessages([row("q", i) for i in range(1, 11)], on_done=done.append))
        assert store._full()
        async with anyio.create_task_group() as waiters:
            for i in range(11, 16):
                waiters.start_soon(store.submit, PutMessages([row("q", i)], on_done=done.append))
            await anyio.wait_all_tasks_blocked()
            waiters.cancel_scope.cancel()  # these five never get in
        with anyio.CancelScope() as reading:  # a read cancelled while it holds the lock
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.check_dedup, [f"m{i}" for i in range(500)])
                await anyio.wait_all_tasks_blocked()
                reading.cancel()
        assert (store.pending_ops, store.pending_messages) == (1, 10)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            await store.write(PutMessages([row("q", 99)]))
            assert done == [None]
            assert (store.pending_ops, store.pending_messages, store.pending_bytes) == (0, 0, 0)
            assert not store._full() and store.inflight_ops == 0
            assert await store.count("q") == 11
            await store.close()
