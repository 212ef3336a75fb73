"""A queue's backlog costs disk, not RAM: paging beyond the in-memory
window, and the broker's RSS under a deep backlog (the latter only with
--soak; benchmarks/backlog.py measures the 1M-message bar)."""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import pytest

from client import Client, connect
from queuetools import WAIT, declare

WINDOW = 10_000  # broker.queue.WINDOW: messages of one queue's backlog held in memory
MB = 1024 * 1024


async def publish_many(tc: Client, subject: str, n: int, *, in_flight: int = 2000,
                       delay_every: int = 0, delay: float = 0.0) -> None:
    """Publish ``n`` numbered payloads with confirms; every ``delay_every``-th is delayed."""
    pending: deque[Any] = deque()
    for i in range(n):
        if len(pending) >= in_flight:
            await pending.popleft()
        later = delay if delay_every and i % delay_every == delay_every - 1 else None
        pending.append(tc.publish_nowait(subject, str(i), delay=later, confirm=True))
    while pending:
        await pending.popleft()


async def drain(tc: Client, queue: str, n: int, prefetch: int = 1000) -> list[int]:
    """Consume and ack ``n`` messages; returns their payloads as ints, in delivery order."""
    got = []
    async with tc.consume(queue, prefetch=prefetch) as deliveries:
        for _ in range(n):
            d = await deliveries.next(timeout=WAIT)
            got.append(int(d.payload))
            await d.ack()
    return got


async def test_backlog_beyond_the_window_pages_from_disk_in_order(broker) -> None:
    n = 3 * WINDOW
    async with connect(broker.url) as tc:
        await declare(tc, "deep")
        # every 1000th message is delayed: paging must not lose or reorder the rest
        await publish_many(tc, "deep.a", n, delay_every=1000, delay=0.3)
        info = await tc.queue_info("deep")
        assert info["depth"] == n
        assert info["ready_in_memory"] <= WINDOW and info["on_disk_only"] >= n - WINDOW
        got = await drain(tc, "deep", n)
        delayed = {i for i in range(n) if i % 1000 == 999}
        assert sorted(got) == list(range(n))  # each exactly once
        assert [i for i in got if i not in delayed] == sorted(set(range(n)) - delayed)  # in order
        await tc.flush()
        assert (await tc.queue_info("deep"))["depth"] == 0


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_a_million_queued_messages_cost_disk_not_ram(broker) -> None:
    n = 1_000_000
    async with connect(broker.url, timeout=60) as tc:
        await declare(tc, "million")
        await tc.flush()
        before = broker.rss_bytes()
        await publish_many(tc, "million.a", n)
        grown = broker.rss_bytes() - before
        assert (await tc.queue_info("million"))["depth"] == n
        assert grown <= 100 * MB, f"RSS grew {grown / MB:.1f} MB for {n} queued messages"


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_acked_deliveries_free_their_memory(broker) -> None:
    n = 600_000
    async with connect(broker.url, timeout=60) as tc:
        await declare(tc, "churn", ack_deadline=30.0)  # the default deadline
        await publish_many(tc, "churn.a", n)
        await tc.flush()
        before = broker.rss_bytes()
        with anyio.fail_after(120):
            await drain(tc, "churn", n)
        grown = broker.rss_bytes() - before
        # measured: ~+60 MB with the bug; ~+10 MB with a 1 s deadline (the heap then empties as it goes)
        assert grown <= 25 * MB, f"RSS grew {grown / MB:.1f} MB while {n} messages were acked"
