"""Fixtures for the actor unit tests: a real store, opened and running.

``store`` is the one place the backend is chosen: every actor test runs on
SQLite (a real file) and on the in-memory store of the Store contract. It gives a factory, used inside the test's own task (a task group
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
from tidings.broker.durable.store.sqlite import SqliteStore

OpenStore = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """``async with store() as s``: an open store whose actor runs in a task group."""

    @contextlib.asynccontextmanager
    async def _open() -> AsyncIterator[Any]:
        s: Any = SqliteStore(tmp_path / "tidings.db") if request.param == "sqlite" else MemoryStore()
        await s.open()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(s.run)
                yield s
                await s.close()
        finally:
            await s.close()

    return _open
