"""Fixtures for the actor unit tests: a real store, opened and running.

``store`` is the one place the backend is chosen: every actor test runs on
SQLite (a real file), on the in-memory store of the Store contract and on
PostgreSQL (a fresh database on tests/pgserver.py's server). It gives a factory, used inside the test's own task (a task group
must be entered and left by the same task)::

    async with store() as s:     # opened, its actor running; closed on exit
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings.broker.durable.store.memory import MemoryStore
from tidings.broker.durable.store.postgres import PostgresStore
from tidings.broker.durable.store.sqlite import SqliteStore

OpenStore = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """``async with store() as s``: an open store whose actor runs in a task group."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""

    @contextlib.asynccontextmanager
    async def _open() -> AsyncIterator[Any]:
        s: Any
        if request.param == "sqlite":
            s = SqliteStore(tmp_path / "tidings.db")
        elif request.param == "postgres":
            s = PostgresStore(url)
        else:
            s = MemoryStore()
        await s.open()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(s.run)
                yield s
                await s.close()
        finally:
            await s.close()

    return _open
