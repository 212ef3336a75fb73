"""The slow-subscriber policy: a subscriber that stops reading must not grow
the broker's memory, must not slow down healthy subscribers, and is told
(policy "drop": NOTICE slow_consumer) or cut off (policy "disconnect").

The slow subscriber is a raw socket client: handshake and SUB by hand, then
it simply stops reading while a publisher sends 64 MiB. Had the broker
buffered that for it, its RSS would grow by at least as much; the bound
below (24 MiB) leaves room for allocator noise and still catches that.
"""

from __future__ import annotations

import time

import anyio
import pytest

from tidings.client import connect
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from rawclient import RawClient

MAX_PENDING = 262_144
PAYLOAD = 8192
TOTAL_BYTES = 64 * 1024 * 1024
WINDOW = 12  # messages in flight to the healthy subscriber: ~96 KiB, well under MAX_PENDING
RSS_MARGIN = 24 * 1024 * 1024
PROMPT = 15.0  # "at once": far below the heartbeat's 2 x 3600 s, generous for a busy machine


@pytest.mark.parametrize("policy", ["drop", "disconnect"])
async def test_stalled_subscriber_does_not_grow_broker_memory_or_slow_others(start_broker,
                                                                           policy: str) -> None:
    broker = start_broker(env={"TIDINGS_MAX_PENDING_BYTES": str(MAX_PENDING),
                               "TIDINGS_SLOW_CONSUMER": policy})
    n = TOTAL_BYTES // PAYLOAD
    payload = b"p" * PAYLOAD
    async with RawClient.open(broker.host, broker.port) as slow, \
            connect(broker.url) as healthy, connect(broker.url) as pub:
        await slow.hello()
        await slow.subscribe("load.>", sid=1)
        sub = await healthy.subscribe("load.>")
        await pub.flush()
        rss_before = broker.rss_bytes()

        # publish 64 MiB; the healthy subscriber must see every message, in order
        with anyio.fail_after(60):
            for start in range(0, n, WINDOW):
                stop = min(n, start + WINDOW)
                for i in range(start, stop):
                    await pub.publish("load.x", payload, headers={"i": i})
                for i in range(start, stop):
                    m = await sub.next()
                    assert m.headers == {"i": i}
                    assert len(m.payload) == PAYLOAD
        assert sub.dropped == 0 and sub.dropped_by_broker == 0

        rss_after = broker.rss_bytes()
        growth = rss_after - rss_before
        assert growth < RSS_MARGIN, f"broker RSS grew by {growth / 2**20:.1f} MiB for one stalled subscriber"

        stats = await pub.call("stats")
        if policy == "drop":
            assert stats["dropped"] > 0
            # Now the slow client reads again: it gets what fitted in its
            # buffers, then a NOTICE saying how many were dropped.
            received = 0

            def is_notice(f: F.Frame) -> bool:
                nonlocal received
                if isinstance(f, F.Msg):
                    assert f.sid == 1
                    received += len(f.messages)
                return isinstance(f, (F.Notice, F.Err))

            ev = await slow.read_until(is_notice, timeout=20)
            assert isinstance(ev, F.Notice), ev
            assert ev.kind == "slow_consumer"
            assert ev.info.get("sid") == 1
            dropped = ev.info.get("dropped")
            assert isinstance(dropped, int) and dropped > 0
            assert received + dropped <= n
            # the connection is still open and usable after the notice
            await slow.ping(timeout=20)
            assert stats["slow_disconnects"] == 0
        else:
            assert stats["slow_disconnects"] == 1
            # The connection is closed. The SLOW_CONSUMER error is queued behind what the
            # socket already holds; it arrives only if this client reads within the broker's
            # closing flush (SHUTDOWN_FLUSH), which a loaded machine may not give it.
            frames = await slow.read_until_eof(timeout=20)
            errs = [i for i, f in enumerate(frames) if isinstance(f, F.Err)]
            if errs:
                assert frames[errs[0]].code == ErrorCode.SLOW_CONSUMER, frames[errs[0]]
                assert not [f for f in frames[errs[0]:] if isinstance(f, F.Msg)], \
                    "messages after the SLOW_CONSUMER error"

        # the broker and the healthy clients are unaffected
        assert broker.alive()
        await pub.publish("load.y", b"after")
        assert (await sub.next(timeout=10)).payload == b"after"


async def test_slow_consumer_is_disconnected_promptly(start_broker) -> None:
    """A slow consumer that is silent (not reading, not sending) is closed at
    once, not at its next heartbeat (an hour away here, so a generous bound
    tells the two apart on a busy machine too)."""
    broker = start_broker(env={"TIDINGS_MAX_PENDING_BYTES": str(MAX_PENDING),
                               "TIDINGS_SLOW_CONSUMER": "disconnect", "TIDINGS_HEARTBEAT": "3600"})
    async with RawClient.open(broker.host, broker.port) as slow, connect(broker.url) as pub:
        await slow.hello()
        await slow.subscribe("load", sid=1)
        payload = b"p" * PAYLOAD
        with anyio.fail_after(30):
            while (await pub.call("stats"))["slow_disconnects"] == 0:
                for _ in range(64):
                    await pub.publish("load", payload)
                await pub.flush()
        t0 = time.monotonic()
        ev = await slow.read_until(lambda f: isinstance(f, F.Err), timeout=10)
        assert isinstance(ev, F.Err) and ev.code == ErrorCode.SLOW_CONSUMER
        await slow.read_until_eof(timeout=PROMPT)
        assert time.monotonic() - t0 < PROMPT
