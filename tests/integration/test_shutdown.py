"""Graceful shutdown on SIGTERM: exit 0, tell the clients, deliver what was
already accepted, end every connection."""

from __future__ import annotations

import subprocess
import time

import anyio
import pytest

from tidings.client import ConnectionClosedError, connect
from tidings.protocol import frames as F
from rawclient import RawClient

# The broker's own drain deadline (broker/server.py SHUTDOWN_GRACE) is 5 s;
# a graceful exit must not take much longer than that even in the worst case.
EXIT_BOUND = 10.0


async def test_sigterm_with_no_clients_exits_zero_promptly(broker) -> None:
    t0 = time.monotonic()
    code = await anyio.to_thread.run_sync(broker.terminate, EXIT_BOUND)
    assert code == 0
    assert time.monotonic() - t0 < 4.5  # did not wait out the 5 s drain grace (nobody to drain)
    assert "Traceback" not in broker.stderr()


async def test_sigterm_delivers_flushed_messages_notifies_and_closes(broker) -> None:
    n = 1000
    async with connect(broker.url, reconnect=False) as sc, connect(broker.url, reconnect=False) as pub, \
            RawClient.open(broker.host, broker.port) as raw:
        await raw.hello()
        await raw.subscribe("sd.>", sid=1)
        sub = await sc.subscribe("sd.>")
        for i in range(n):
            await pub.publish("sd.x", str(i).encode())
        await pub.flush()  # the broker has accepted and routed all of them

        t0 = time.monotonic()
        code = await anyio.to_thread.run_sync(broker.terminate, EXIT_BOUND)
        elapsed = time.monotonic() - t0
        assert code == 0
        assert elapsed < EXIT_BOUND
        assert not broker.alive()

        # the library client: every flushed message, then the connection ends
        got: list[int] = []
        with anyio.fail_after(10):
            try:
                async for m in sub:
                    got.append(int(m.payload))
            except ConnectionClosedError:
                pass
        assert got == list(range(n))
        assert sc.is_closed
        with pytest.raises(ConnectionClosedError), anyio.fail_after(10):
            await pub.flush()
        with pytest.raises(ConnectionClosedError):
            await pub.publish("sd.x", b"too late")

        # on the wire: all messages, a NOTICE "shutdown", then EOF
        frames = await raw.read_until_eof(timeout=10)
        delivered = [int(m[1]) for f in frames if isinstance(f, F.Msg) for m in f.messages]
        assert delivered == list(range(n))
        assert any(isinstance(f, F.Notice) and f.kind == "shutdown" for f in frames), frames
    assert "Traceback" not in broker.stderr()


async def test_sigterm_with_idle_clients_exits_promptly(broker) -> None:
    async with connect(broker.url, reconnect=False) as tc, RawClient.open(broker.host, broker.port) as raw:
        await raw.hello()
        await tc.subscribe("idle")
        await tc.flush()
        t0 = time.monotonic()
        try:
            code = await anyio.to_thread.run_sync(broker.terminate, 3.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM with two idle clients took more than {time.monotonic() - t0:.1f}s")
        assert code == 0
