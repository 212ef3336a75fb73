"""A client given several brokers of one service (``tidings://a:p,b:p``) resumes on
another when the one it is on dies (issue 13 item 3; docs/CLIENT.md, docs/SCALING.md).

Real brokers on one PostgreSQL database in cluster mode (tests/clustertools.py). The
broker the client is on is killed with ``kill -9``; the client reconnects to the other,
restores its subscription, its queue consumer and stream group membership, and resends its
unconfirmed durable publish, which the other broker stores and confirms.

These tests use only what each broker does for its own clients (pub/sub on the broker
the client reconnects to; the queue and stream declared on every broker), so that they
stay true once queues, streams and pub/sub are shared across brokers: then the same
steps also work with the declarations made once.

The publishes are made unconfirmed for certain by freezing the broker first (SIGSTOP: it
reads, stores and confirms nothing), then killing it (SIGKILL ends a stopped process too).
"""

from __future__ import annotations

import os
import signal
import socket
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from tidings.client import connect

from test_client_resilience import FAST, WAIT, States

QUEUE, STREAM, GROUP = "work", "log", "g"
MEMBER_WAIT = 90.0  # seconds a restored group member may wait for its partition (see its use)


async def _declare_everywhere(brokers: list[Any]) -> None:
    """The queue (bound to jobs.*) and the stream (bound to events.*) on each broker."""
    for b in brokers:
        async with connect(b.url) as tc:
            await tc.declare_queue(QUEUE, bind=["jobs.*"])
            await tc.declare_stream(STREAM, bind=["events.*"])


def _on(brokers: list[Any], address: tuple[str, int] | None) -> Any:
    """The broker at ``address`` (the one a client is connected to)."""
    assert address is not None
    return next(b for b in brokers if (b.host, b.port) == address)


@pytest.mark.parametrize("n", [2, 3])
async def test_kill_9_of_the_broker_the_client_is_on_resumes_on_another(start_cluster, n: int) -> None:
    brokers = start_cluster(n)
    await _declare_everywhere(brokers)
    states = States()
    async with AsyncExitStack() as stack:
        tc = await stack.enter_async_context(connect(start_cluster.urls(), on_state_change=states, **FAST))
        first = _on(brokers, tc.address)
        others = [(b.host, b.port) for b in brokers if b is not first]
        sub = await tc.subscribe("news.>")
        consumer = await stack.enter_async_context(tc.consume(QUEUE, prefetch=10))
        member = await stack.enter_async_context(tc.stream_consume(STREAM, GROUP))

        os.kill(first.pid, signal.SIGSTOP)  # frozen: it takes no publish and confirms none
        job = tc.publish_nowait("jobs.a", b"job-1", msg_id="job-1")  # durable publishes, unconfirmed
        event = tc.publish_nowait("events.a", b"event-1", msg_id="event-1")
        await anyio.to_thread.run_sync(first.kill)  # kill -9 (of a stopped process too)
        await states.wait("reconnected")
        with anyio.fail_after(WAIT):
            assert await job is not None and await event is not None  # resent there, stored, confirmed
        assert tc.address in others
        d = await consumer.next(timeout=WAIT)  # the consumer, restored on the other broker
        assert (d.payload, d.msg_id) == (b"job-1", "job-1")
        await d.ack()
        # The group member, there too. Once groups span brokers, the partition may move to it only
        # when the dead broker's lease lapses: a bound well above any lease, not a wait.
        m = await member.next(timeout=MEMBER_WAIT)
        assert m.payload == b"event-1"
        await m.ack()
        await tc.publish("news.x", b"after")  # the subscription, restored there
        assert (await sub.next(timeout=WAIT)).payload == b"after"
    assert states.names() == ["connected", "disconnected", "reconnected", "closed"]


async def test_connect_tries_the_next_address_when_one_is_down(start_cluster) -> None:
    """A URL whose first brokers are down (nothing listens there) still connects: the
    client tries every address, in its order, until one answers; with none up, one
    ConnectError names each address's failure."""
    from tidings.client.errors import ConnectError

    live = start_cluster(1)[0]
    dead = start_cluster.add()
    dead.terminate()
    url = f"tidings://{dead.host}:{dead.port},{live.host}:{live.port}"
    for _ in range(4):  # the order is shuffled per client: both orders are met
        async with connect(url, **FAST) as tc:
            assert tc.address == (live.host, live.port)
    live.terminate()
    try:
        async with connect(url, **FAST):
            raise AssertionError("connected with no broker up")
    except ConnectError as exc:
        assert f"{dead.host}:{dead.port}" in str(exc) and f"{live.host}:{live.port}" in str(exc), exc


def _nothing_listens() -> str:
    """host:port of a loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_the_cli_and_the_sync_client_take_several_addresses(broker) -> None:
    """`tidings ... --url tidings://down,up` and tidings.sync.connect the same: the
    broker that answers serves them, whichever order the client tries."""
    import tidings.sync

    from test_cli_reads import cli

    url = f"tidings://{_nothing_listens()},{broker.host}:{broker.port}"
    for _ in range(3):
        r = await cli("queues", "declare", "several", "--url", url)
        assert r.code == 0, r.err
    r = await cli("queues", "--url", f"tidings://{_nothing_listens()},{_nothing_listens()}")
    line = r.one_line_failure(1)
    assert "cannot connect to any of the 2 brokers" in line, line

    def sync_side() -> tuple[str, int] | None:
        with tidings.sync.connect(url) as tc:
            assert tc.client.address == (broker.host, broker.port)
            return tc.client.address

    assert await anyio.to_thread.run_sync(sync_side) == (broker.host, broker.port)
