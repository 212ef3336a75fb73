"""SqliteStore's actor beyond the contract (test_store_contract.py runs the shared
behaviour on every backend): commits visible to other connections, failure
bisection, durability pragmas, refusing a file that is not a database, and a
database-wide error failing a batch at once."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from tidings.broker.durable.store import (
    DeleteMessages,
    PutMessages,
    SqliteStore,
    StorageError,
)


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

