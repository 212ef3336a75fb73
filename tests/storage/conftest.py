"""Fixtures for the storage tests: real SQLite files under tmp_path.

    async def test_x(open_store, row):
        async with open_store() as store:       # opened, actor running
            await store.write(PutMessages([row("q", 1)]))
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.broker.durable.store import SqliteStore, StoredMessage


def make_row(queue: str, id: int, *, payload: bytes | None = None, available_ms: int = 1_000,
             headers: dict[str, Any] | None = None, msg_id: str | None = None, **kw: Any) -> StoredMessage:
    """A message with predictable contents: payload defaults to b"<queue>:<id>"."""
    return StoredMessage(queue, id, f"subj.{queue}", payload if payload is not None else f"{queue}:{id}".encode(),
                         headers, msg_id, kw.pop("published_ms", 500), available_ms, **kw)


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
