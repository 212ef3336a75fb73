"""``tc = await tidings.connect(url)`` and ``await tc.close()`` from any task.

Frameworks open a client in one task and close it in another (a FastAPI
lifespan, a pytest fixture, an aiohttp signal handler), or bound the close
with ``asyncio.wait_for``. The client's task group used to live in the
caller's task, so all of these failed with anyio's "cancel scope in a
different task" error; the regression tests below each do one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import pytest_asyncio

import tidings
from tidings.client import Client
from tidings.client.errors import ConnectError, ConnectionClosedError

WAIT = 10.0  # seconds: a bound for hangs on a busy machine, not a speed check


async def _round_trip(tc: Client) -> None:
    sub = await tc.subscribe("life.x")
    await tc.publish("life.x", b"hello")
    msg = await sub.next(timeout=WAIT)
    assert msg.payload == b"hello"
    await sub.close()


def _client_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("tidings client ")]


async def test_connect_in_one_task_close_in_another(broker) -> None:
    opened: asyncio.Future[Client] = asyncio.get_running_loop().create_future()

    async def startup() -> None:  # like a lifespan's startup: the task ends, the client lives on
        opened.set_result(await tidings.connect(broker.url))

    await asyncio.create_task(startup())
    tc = await opened
    await _round_trip(tc)
    await asyncio.create_task(tc.close())  # like a shutdown hook, in yet another task
    assert tc.is_closed and tc.state == "closed"
    assert _client_tasks() == []


async def test_close_under_wait_for(broker) -> None:
    tc = await tidings.connect(broker.url)
    await _round_trip(tc)
    await asyncio.wait_for(tc.close(), timeout=WAIT)
    assert _client_tasks() == []


async def test_close_is_idempotent_and_errors_after_close_are_clear(broker) -> None:
    tc = await tidings.connect(broker.url)
    await tc.close()
    await tc.close()
    with pytest.raises(ConnectionClosedError, match="the client was closed"):
        await tc.publish("life.x", b"late")
    with pytest.raises(ConnectionClosedError, match="the client was closed"):
        await tc.subscribe("life.>")
    with pytest.raises(ConnectionClosedError, match="the client was closed"):
        await tc.request("life.q", b"?", timeout=1)


async def test_async_with_still_closes_and_propagates_the_block_error(broker) -> None:
    with pytest.raises(KeyError):
        async with tidings.connect(broker.url) as tc:
            await _round_trip(tc)
            raise KeyError("from the block")
    assert tc.is_closed
    assert _client_tasks() == []


async def test_connect_error_is_raised_as_itself_and_leaves_no_task() -> None:
    with pytest.raises(ConnectError):
        await tidings.connect("tidings://127.0.0.1:1", timeout=2)
    assert _client_tasks() == []


async def test_a_client_opens_once(broker) -> None:
    c = tidings.connect(broker.url)
    tc = await c
    try:
        with pytest.raises(RuntimeError, match="opened once"):
            await c
    finally:
        await tc.close()


@pytest_asyncio.fixture
async def fixture_client(broker) -> AsyncIterator[Client]:
    # pytest-asyncio runs a fixture's setup and teardown in different tasks
    tc = await tidings.connect(broker.url)
    yield tc
    await tc.close()


async def test_pytest_fixture_style(fixture_client: Client) -> None:
    await _round_trip(fixture_client)


async def test_async_with_across_tasks_via_exit_stack(broker) -> None:
    """An AsyncExitStack entered in one task and closed in another (how some
    frameworks run their startup and shutdown)."""
    from contextlib import AsyncExitStack

    stack = AsyncExitStack()

    async def enter() -> Client:
        return await stack.enter_async_context(tidings.connect(broker.url))

    tc = await asyncio.create_task(enter())
    await _round_trip(tc)
    with anyio.fail_after(WAIT):
        await asyncio.create_task(stack.aclose())
    assert tc.is_closed
