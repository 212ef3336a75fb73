"""Fixtures for the storage tests.

`open_store`: a real SQLite file under tmp_path (the SQLite-specific tests).

    async def test_x(open_store, row):
        async with open_store() as store:       # opened, actor running
            await store.write(PutMessages([row("q", 1)]))

`backend`: the contract tests' store, once per backend (sqlite, memory, postgres:
a fresh database on the session's PostgreSQL server, tests/pgserver.py).
`backend.open()` opens a store over the backend's one data set, so opening
again after a close is a restart that sees what was committed.

    async def test_y(backend, row):
        async with backend.open() as store:
            ...
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.storage.storetools import BACKENDS, make_row
from tidings.broker.durable.store import MemoryData, MemoryStore, SqliteStore, Store, StoredMessage
from tidings.broker.durable.store.postgres import PostgresStore


@pytest.fixture
def row() -> Callable[..., StoredMessage]:
    return make_row


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "tidings.db"


@pytest.fixture
def open_store(db_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[SqliteStore]]:
    """`async with open_store(path=None, run=True, **kw) as store`: an open store whose
    actor runs in a task group (unless run=False); closed on exit."""

    @contextlib.asynccontextmanager
    async def _open(path: Path | None = None, *, run: bool = True, **kw: Any) -> AsyncIterator[SqliteStore]:
        store = SqliteStore(path or db_path, **kw)
        await store.open()
        try:
            async with anyio.create_task_group() as tg:
                if run:
                    await tg.start(store.run)
                yield store
                await store.close()
        finally:
            await store.close()

    return _open


@pytest.fixture
def peek(db_path: Path) -> Callable[..., list[Any]]:
    """Query the database through a separate plain sqlite3 connection: what another
    process would see (committed data only)."""

    def _peek(sql: str, params: tuple[Any, ...] = (), path: Path | None = None) -> list[Any]:
        conn = sqlite3.connect(path or db_path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    return _peek


class Backend:
    """One store backend over one data set (a file, or a MemoryData)."""

    def __init__(self, kind: str, tmp_path: Path, url: str = "") -> None:
        self.kind = kind
        self.path = tmp_path / "data" / "tidings.db"
        self.data = MemoryData()
        self.url = url  # postgres: the test's database

    def new(self, **kw: Any) -> Store:
        """A store over this backend's data, not opened."""
        if self.kind == "sqlite":
            return SqliteStore(self.path, **kw)
        if self.kind == "postgres":
            return PostgresStore(self.url, **kw)
        return MemoryStore(self.data, **kw)

    @contextlib.asynccontextmanager
    async def open(self, *, run: bool = True, **kw: Any) -> AsyncIterator[Store]:
        """An open store whose actor runs in a task group (unless run=False); closed on exit."""
        store = self.new(**kw)
        await store.open()
        try:
            async with anyio.create_task_group() as tg:
                if run:
                    await tg.start(store.run)
                yield store
                await store.close()
        finally:
            await store.close()

    async def count_after_reopen(self, queue: str = "q") -> int:
        async with self.open(run=False) as store:
            return await store.count(queue)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""
    return Backend(request.param, tmp_path, url)


@pytest.fixture
def backend_memory(tmp_path: Path) -> Backend:
    """The memory backend alone (MemoryStore's own hooks)."""
    return Backend("memory", tmp_path)
