"""Helpers for the durable-queue integration tests (test_queue_*.py).

Settings are short (tenths of a second) so the suite stays fast, and every
wait is on an event: a delivery arriving (``deliveries.next(timeout=...)``),
a confirm, or the broker's own clock (:func:`broker_time_passes`), never a
sleep that hopes something has happened by then.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

from tidings.client import Client

WAIT: Final = 5.0  # seconds an expected delivery may take before the test fails (generous, for slow CI)

#: Queue settings that make retries immediate and deterministic (no jitter)
#: and keep the ack deadline out of the way unless a test shortens it.
FAST: Final[dict[str, Any]] = {
    "ack_deadline": 30.0,
    "backoff_initial": 0.05,
    "backoff_multiplier": 2.0,
    "backoff_jitter": 0.0,
}

CLOCK_QUEUE: Final = "test.clock"
_ticks = itertools.count(1)


async def declare(tc: Client, name: str, *patterns: str, **settings: Any) -> dict[str, Any]:
    """Declare ``name`` bound to ``patterns`` (default ``name.>``) with FAST settings,
    overridden by ``settings``."""
    return await tc.declare_queue(name, bind=list(patterns or (f"{name}.>",)), **{**FAST, **settings})


async def broker_time_passes(tc: Client, seconds: float) -> None:
    """Return once the broker's own clock has moved ``seconds`` on.

    A message published to a scratch queue with ``delay=seconds`` becomes
    deliverable only when the broker's timer says so, so its arrival is the
    event to wait on: what the broker does with time (TTL, deadlines, the
    de-duplication window) has then seen at least that much of it.
    """
    await tc.declare_queue(CLOCK_QUEUE, bind=[CLOCK_QUEUE])
    tick = f"tick-{next(_ticks)}"
    await tc.publish(CLOCK_QUEUE, tick, delay=seconds)
    async with tc.consume(CLOCK_QUEUE, prefetch=1) as ticks:
        while True:
            d = await ticks.next(timeout=seconds + WAIT)
            await d.ack(wait=True)
            if d.payload == tick.encode():
                return


async def collect(deliveries: Any, n: int, timeout: float = WAIT) -> list[Any]:
    """The next ``n`` deliveries, unsettled."""
    return [await deliveries.next(timeout=timeout) for _ in range(n)]


def headers_of(d: Any) -> dict[str, Any]:
    return dict(d.headers or {})


async def holds(tc: Client, queue: str, n: int, timeout: float = WAIT) -> list[Any]:
    """Wait until ``queue`` has ``n`` messages ready and return them as delivered.

    The broker accepts a reject or nack before the move to the dead-letter
    queue commits, so a test that looks at a DLQ first waits for its
    messages here: it consumes ``n`` and stops, and stopping hands unsettled
    messages straight back to the front of the queue, in order (their
    delivery count goes up by one; a DLQ does not limit deliveries).
    """
    async with tc.consume(queue, prefetch=n) as deliveries:
        return await collect(deliveries, n, timeout)


class Bursts:
    """Bursts of publishes with confirms in flight, across a store outage: every message
    has its own msg_id; ``confirmed`` holds those confirmed, ``refused`` the retriable
    STORAGE_ERRORs (a refusal that is not retriable fails the test)."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.confirmed: set[str] = set()
        self.refused: list[Exception] = []
        self._seq = 0

    async def __call__(self, tc: Client, n: int) -> None:
        from tidings.client.errors import StorageError

        pending = []
        for _ in range(n):
            self._seq += 1
            mid = f"m{self._seq}"
            pending.append((mid, tc.publish_nowait(self.subject, mid, msg_id=mid)))
        for mid, conf in pending:
            try:
                await conf
                self.confirmed.add(mid)
            except StorageError as exc:
                assert exc.retriable
                self.refused.append(exc)
