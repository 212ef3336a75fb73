"""net/connection.py's per-read and per-write costs, and the timeouts that replaced
the timer around every read (issue 14, PERF-DURABLE.md light-load proposals 3-4).

A ConnectionActor runs against test_connection_port's StubPort over a real
loopback socket, so its stream is anyio's asyncio SocketStream as in the
broker: no read arms a timer (``anyio.move_on_after``), no write goes through
``SocketStream.send`` while the kernel takes it all, and the heartbeat (PING
after ``heartbeat`` s of silence, close after one more) still holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio._backends._asyncio import SocketStream
from test_connection_port import WAIT, StubPort, read_frame

from tidings.protocol import Connection, Role
from tidings.protocol import frames as F

from tidings.broker.config import Config
from tidings.broker.net.connection import ConnectionActor

ROUND_TRIPS = 200  # PING -> PONG exchanges, each its own read and its own write on the broker's side


@asynccontextmanager
async def serving(port: StubPort, seen: Callable[[Any], None] = lambda stream: None) -> AsyncIterator[Any]:
    """One ConnectionActor behind a loopback listener; yields a connected raw client."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    address = listener.extra(anyio.abc.SocketAttribute.local_address)

    async def serve_one(stream: Any) -> None:
        seen(stream)
        await ConnectionActor(port, stream, 1, "test").run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_one)
        client = await anyio.connect_tcp("127.0.0.1", int(address[1]))
        try:
            yield client
        finally:
            await client.aclose()
            tg.cancel_scope.cancel()
    await listener.aclose()


async def hello(client: Any) -> Connection:
    c = Connection(Role.CLIENT)
    await client.send(c.send(F.Hello(F.PROTOCOL_VERSION, "io-client")))
    assert isinstance(await read_frame(client, c), F.Welcome)
    assert isinstance(await read_frame(client, c), F.Notice)  # what StubPort.opened queues
    return c


async def round_trips(client: Any, c: Connection) -> None:
    for i in range(1, ROUND_TRIPS + 1):
        await client.send(c.send(F.Ping(i)))
        pong = await read_frame(client, c)
        assert isinstance(pong, F.Pong) and pong.rid == i


async def test_reads_arm_no_timer(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of 200 reads used to enter ``anyio.move_on_after(heartbeat)``; now only
    HELLO's timeout does (the heartbeat is one watchdog timer per connection)."""
    timers = 0
    real = anyio.move_on_after

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal timers
        timers += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(anyio, "move_on_after", counting)
    port = StubPort(str(tmp_path))
    with anyio.fail_after(WAIT):
        async with serving(port) as client:
            c = await hello(client)
            before = timers
            await round_trips(client, c)
            during = timers - before
    assert during == 0, f"{during} timers armed for {ROUND_TRIPS} reads"


async def test_writes_below_the_high_water_mark_skip_stream_send(tmp_path: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer writes to the transport directly while the kernel takes everything;
    anyio's ``SocketStream.send`` (a guard, a checkpoint and a drain wait per call)
    used to run for each of the 200 PONG writes."""
    server: list[Any] = []
    sends = 0
    real = SocketStream.send

    async def counting(self: Any, item: bytes) -> None:
        nonlocal sends
        if server and self is server[0]:
            sends += 1
        await real(self, item)

    monkeypatch.setattr(SocketStream, "send", counting)
    port = StubPort(str(tmp_path))
    with anyio.fail_after(WAIT):
        async with serving(port, server.append) as client:
            c = await hello(client)
            before = sends
            await round_trips(client, c)
            during = sends - before
    assert type(server[0]) is SocketStream
    assert during < ROUND_TRIPS // 10, f"{during} SocketStream.send calls for {ROUND_TRIPS} writes"


async def test_silent_client_is_pinged_then_closed(tmp_path: Any) -> None:
    """The watchdog keeps the heartbeat: a client silent for ``heartbeat`` seconds gets a
    PING, and one that stays silent for another ``heartbeat`` is closed."""
    port = StubPort(str(tmp_path))
    port.config = Config(port=0, data_dir=str(tmp_path), heartbeat=0.2)
    with anyio.fail_after(WAIT):
        async with serving(port) as client:
            c = await hello(client)
            ping = await read_frame(client, c)
            assert isinstance(ping, F.Ping)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                extra = await read_frame(client, c)  # nothing more: the broker closes
                raise AssertionError(f"unexpected frame {extra!r}")
            await port.detached.wait()


async def test_answering_client_stays_open(tmp_path: Any) -> None:
    """A client that answers each PING is never closed by the heartbeat."""
    port = StubPort(str(tmp_path))
    port.config = Config(port=0, data_dir=str(tmp_path), heartbeat=0.1)
    with anyio.fail_after(WAIT):
        async with serving(port) as client:
            c = await hello(client)
            for _ in range(4):  # 4 PINGs: at least 8 heartbeats, beyond the 2 that close a silent client
                ping = await read_frame(client, c)
                assert isinstance(ping, F.Ping)
                await client.send(c.send(F.Pong(ping.rid)))
            await client.send(c.send(F.Ping(99)))
            while not isinstance(frame := await read_frame(client, c), F.Pong):
                assert isinstance(frame, F.Ping), frame
            assert frame.rid == 99
            assert "detach" not in port.calls
