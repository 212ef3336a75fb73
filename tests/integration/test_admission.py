"""Admission before HELLO: descriptor exhaustion, the descriptor clamp, and
silent connections (issue 10.1).

Silent sockets must neither crash the broker (EMFILE in accept) nor take
the slots of real clients: connections that have not said HELLO are
capped apart from max_connections, the oldest evicted at the cap.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import AsyncIterator, Iterator

import anyio
from anyio.abc import SocketStream

from tidings.client import connect
from test_hostile_clients import assert_control_works

WAIT = 20.0


@contextlib.contextmanager
def low_fd_limit(soft: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE while a broker is started (the
    child inherits it), then restore it for the test's own sockets."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@contextlib.asynccontextmanager
async def silent_sockets(host: str, port: int, n: int) -> AsyncIterator[list[SocketStream]]:
    """``n`` TCP connections that never send a byte."""
    socks: list[SocketStream] = []
    try:
        for _ in range(n):
            socks.append(await anyio.connect_tcp(host, port))
        yield socks
    finally:
        for s in socks:
            await s.aclose()


async def stats_until(c, pred, what: str) -> dict:
    """Poll stats (bounded) until ``pred(stats)`` holds."""
    with anyio.fail_after(WAIT):
        while True:
            st = await c.call("stats")
            if pred(st):
                return st
            await c.flush()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_accept_survives_running_out_of_descriptors(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_HELLO_TIMEOUT": "60"})
    async with connect(broker.url) as control:
        # Leave the broker a handful of descriptors (below what the start-up clamp assumed),
        # so accept() itself fails with EMFILE.
        soft = open_fds(broker.pid) + 8
        _old, hard = resource.prlimit(broker.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (soft, hard))
        async with silent_sockets(broker.host, broker.port, 40):
            with anyio.fail_after(WAIT):
                while "cannot accept connections" not in broker.stderr():
                    await control.flush()
            assert broker.alive()
            # the open connection is served throughout
            await assert_control_works(control, "emfile")
            assert (await control.call("stats"))["accept_errors"] >= 1
        # the silent sockets are gone: a real client gets in again
        async with connect(broker.url, timeout=WAIT) as late:
            await assert_control_works(late, "after_emfile")
    assert broker.alive()


async def test_max_connections_is_clamped_to_the_descriptor_limit(start_broker) -> None:
    with low_fd_limit(256):
        broker = start_broker(env={"TIDINGS_HELLO_TIMEOUT": "60"})
    assert "open-file limit is 256" in broker.stderr()
    async with connect(broker.url) as control:
        st = await control.call("stats")
        assert 0 < st["max_connections"] < 256 - 64
        # more silent sockets than the broker has descriptors: the pending cap (clamped
        # too) evicts the oldest, so the broker never runs out and real clients get in
        async with silent_sockets(broker.host, broker.port, 300):
            await stats_until(control, lambda s: s["handshakes_evicted"] >= 1, "evictions")
            async with connect(broker.url, timeout=WAIT) as real:
                await assert_control_works(real, "clamped")
            st = await control.call("stats")
            assert st["accept_errors"] == 0
            assert st["pending_handshakes"] < 256 - 64
    assert broker.alive()


async def test_silent_connections_do_not_take_the_slots_of_real_clients(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_CONNECTIONS": "50", "TIDINGS_HELLO_TIMEOUT": "60"})
    # 50 silent sockets used to fill max_connections = 50; 150 also overflow the
    # per-address pending cap (128), so the oldest are evicted
    async with silent_sockets(broker.host, broker.port, 150):
        async with connect(broker.url, timeout=WAIT) as real:
            await assert_control_works(real, "real")
            st = await stats_until(real, lambda s: s["handshakes_evicted"] >= 150 - 128, "evictions")
            assert st["pending_handshakes"] <= 128
        async with connect(broker.url, timeout=WAIT) as real2:
            await assert_control_works(real2, "real2")
    assert broker.alive()
