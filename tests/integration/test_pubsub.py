"""Pub/sub as a user relies on it, against a real broker process.

Absence is proven without sleeping: one publisher's messages reach each
subscription in publish order, so once a subscription sees a sentinel
published after everything else, nothing else is coming to it.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tidings.client.errors import InvalidArgumentError

from tidings import client
from tidings.client import Client, Subscription, connect
from tidings.client.errors import InvalidSubjectError

WAIT = 10.0  # bound on any single wait for a message


async def take_until_sentinel(sub: Subscription, limit: int = 10_000) -> list[str]:
    """Subjects of the messages ``sub`` receives before the first sentinel."""
    got: list[str] = []
    with anyio.fail_after(WAIT):
        for _ in range(limit):
            m = await sub.next()
            if m.headers and m.headers.get("sentinel"):
                return got
            got.append(m.subject)
    raise AssertionError(f"no sentinel within {limit} messages on {sub.pattern!r}")


async def barrier(*clients: Client) -> None:
    """Return once every message the broker had routed to these clients before
    the call has been handed to their subscriptions.

    The broker may write a PONG ahead of messages queued in the same write, so
    one flush is not enough; the second PONG comes in a later write than every
    message queued before the first PING was processed."""
    for c in clients:
        await c.flush()
        await c.flush()


# ------------------------------------------------------------------ wildcards

# pattern -> the subjects of PUBLISHED it must receive, in publish order
PUBLISHED = [
    "orders",
    "orders.eu",
    "orders.eu.created",
    "orders.us.created",
    "orders.eu.created.v2",
    "orders.eu.deleted",
    "billing.eu.created",
    "billing.eu",
    "ordersx.eu.created",
]
EXPECTED = {
    "orders.*": ["orders.eu"],
    "orders.>": ["orders.eu", "orders.eu.created", "orders.us.created", "orders.eu.created.v2",
                 "orders.eu.deleted"],
    "orders.*.created": ["orders.eu.created", "orders.us.created"],
    "*.eu.*": ["orders.eu.created", "orders.eu.deleted", "billing.eu.created", "ordersx.eu.created"],
    "orders.eu.created": ["orders.eu.created"],
    "*.*.*.>": ["orders.eu.created.v2"],
    ">": PUBLISHED,
    "*": ["orders"],
    "billing.>": ["billing.eu.created", "billing.eu"],
    "nothing.>": [],
}
# Published last; every pattern above matches at least one of them.
SENTINELS = ["nothing.end", "orders.end", "orders.end.created", "end.eu.end", "orders.end.end.end",
             "billing.end", "end", "orders.eu.created"]


async def test_wildcards_deliver_each_match_exactly_once(broker) -> None:
    patterns = list(EXPECTED)
    async with connect(broker.url) as a, connect(broker.url) as b, connect(broker.url) as pub:
        # Half the subscriptions on one connection, half on another, and one
        # pattern twice on the same connection (two subscriptions, two copies).
        subs: list[tuple[str, Subscription]] = []
        for i, p in enumerate(patterns):
            subs.append((p, await (a if i % 2 else b).subscribe(p)))
        subs.append(("orders.>", await a.subscribe("orders.>")))
        subs.append(("orders.>", await b.subscribe("orders.>")))

        for s in PUBLISHED:
            await pub.publish(s, b"m:" + s.encode())
        for s in SENTINELS:
            await pub.publish(s, b"", headers={"sentinel": 1})
        await pub.flush()

        for pattern, sub in subs:
            got = await take_until_sentinel(sub)
            assert got == EXPECTED[pattern], pattern


async def test_star_is_one_token_and_gt_needs_at_least_one(broker) -> None:
    async with connect(broker.url) as tc:
        star = await tc.subscribe("a.*")
        gt = await tc.subscribe("a.>")
        for s in ("a", "a.b", "a.b.c", "a.b.c.d", "b.a"):
            await tc.publish(s, s.encode())
        await tc.publish("a.z", b"", headers={"sentinel": 1})
        assert await take_until_sentinel(star) == ["a.b"]
        assert await take_until_sentinel(gt) == ["a.b", "a.b.c", "a.b.c.d"]


async def test_invalid_subjects_are_refused_by_the_client(broker) -> None:
    async with connect(broker.url) as tc:
        for bad in ("a..b", "", "a.>.b", "a b", "a.b."):
            with pytest.raises(InvalidSubjectError):
                await tc.subscribe(bad)
        for bad in ("a.*", "a.>", "a..b", ""):
            with pytest.raises(InvalidSubjectError):
                await tc.publish(bad, b"x")
        # and the connection is fine afterwards
        sub = await tc.subscribe("ok")
        await tc.publish("ok", b"1")
        assert (await sub.next(timeout=WAIT)).payload == b"1"


# --------------------------------------------------------------- queue groups

async def test_queue_group_each_message_to_exactly_one_member(broker) -> None:
    n = 300
    async with connect(broker.url) as c1, connect(broker.url) as c2, connect(broker.url) as c3, \
            connect(broker.url) as pub:
        members = [await c1.subscribe("jobs.>", group="workers"),
                   await c1.subscribe("jobs.>", group="workers"),
                   await c2.subscribe("jobs.>", group="workers")]
        plain = await c3.subscribe("jobs.>")

        for i in range(n):
            await pub.publish("jobs.run", str(i).encode())
        await pub.publish("jobs.run", b"", headers={"sentinel": 1})
        await pub.flush()

        # the plain subscriber gets every message, in order
        got_plain = await take_until_sentinel(plain)
        assert len(got_plain) == n

        await barrier(c1, c2)
        per_member: list[list[int]] = []
        for sub in members:
            items = []
            with anyio.fail_after(WAIT):
                for _ in range(sub.pending):
                    m = await sub.next()
                    if not (m.headers and m.headers.get("sentinel")):
                        items.append(int(m.payload))
            per_member.append(items)

        # every message went to exactly one member, and every member got some
        shared = [i for items in per_member for i in items]
        assert sorted(shared) == list(range(n))
        assert all(len(items) > 0 for items in per_member), [len(x) for x in per_member]
        # each member sees its share in publish order
        for items in per_member:
            assert items == sorted(items)


async def test_queue_group_member_leaving_gets_no_more(broker) -> None:
    async with connect(broker.url) as c1, connect(broker.url) as c2, connect(broker.url) as pub:
        stay = await c1.subscribe("work", group="g")
        leave = await c2.subscribe("work", group="g")
        await leave.close()
        for i in range(20):
            await pub.publish("work", str(i).encode())
        await pub.flush()
        with anyio.fail_after(WAIT):
            got = [int((await stay.next()).payload) for _ in range(20)]
        assert got == list(range(20))


# -------------------------------------------------------------------- ordering

async def test_one_publisher_order_is_kept(broker) -> None:
    n = 10_000
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        sub = await sc.subscribe("seq.>")
        for i in range(n):
            await pub.publish("seq.x", b"", headers={"i": i})
        await pub.flush()
        with anyio.fail_after(30):
            got = [(await sub.next()).headers["i"] for _ in range(n)]  # type: ignore[index]
        assert got == list(range(n))
        assert sub.dropped == 0 and sub.dropped_by_broker == 0


# ------------------------------------------------------- headers and payloads

async def test_headers_round_trip(broker) -> None:
    headers: dict[str, Any] = {
        "type": "OrderCreated",
        "schema": 3,
        "negative": -42,
        "big": 2**62,
        "trace": b"\x00\x01\xff",
        "unicode": "grüße ✓",
        "empty": "",
    }
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        sub = await sc.subscribe("h")
        await pub.publish("h", b"body", headers=headers)
        await pub.publish("h", b"none")
        m = await sub.next(timeout=WAIT)
        assert m.headers == headers
        assert m.payload == b"body"
        assert isinstance(m.headers["trace"], bytes)  # type: ignore[index]
        m2 = await sub.next(timeout=WAIT)
        assert m2.payload == b"none" and not m2.headers


async def _round_trip(broker, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        sub = await sc.subscribe("blob")
        await pub.publish("blob", payload)
        await pub.flush()
        m = await sub.next(timeout=WAIT)
        assert m.payload == payload


@pytest.mark.parametrize("size", [0, 1, 65_536, 900 * 1024, "max_payload"])
async def test_payload_round_trip(broker, size: int | str) -> None:
    if size == "max_payload":
        async with connect(broker.url) as probe:
            size = int(probe.server_info["max_payload"])
    assert isinstance(size, int)
    await _round_trip(broker, size)


async def test_oversized_payload_is_never_delivered_and_connection_stays_usable(broker) -> None:
    """A payload over max_payload is refused (by the client before it is
    sent, or by the broker with a non-fatal ERR) and the connection carries on."""
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        max_payload = pub.server_info["max_payload"]
        sub = await sc.subscribe("big")
        try:
            await pub.publish("big", b"x" * (max_payload + 1))
            await pub.flush()
        except (client.TidingsError, ValueError):
            pass  # refused before it left the client: also what a user may expect
        await pub.publish("big", b"after")
        await pub.flush()
        m = await sub.next(timeout=WAIT)
        assert m.payload == b"after"
        assert not pub.is_closed


async def test_oversized_publish_raises_and_spares_its_neighbours(broker) -> None:
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        max_payload = pub.server_info["max_payload"]
        sub = await sc.subscribe("big")
        await pub.publish("big", b"before")
        with pytest.raises((client.TidingsError, ValueError)):
            await pub.publish("big", b"x" * (max_payload + 1))
            await pub.flush()
        await pub.flush()
        assert (await sub.next(timeout=5)).payload == b"before"


async def test_bad_header_publish_raises_and_spares_its_neighbours(broker) -> None:
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        sub = await sc.subscribe("h")
        await pub.publish("h", b"before")
        with pytest.raises((client.TidingsError, TypeError, ValueError)):
            await pub.publish("h", b"bad", headers={"ratio": 0.5})
            await pub.flush()
        await pub.publish("h", b"after")
        await pub.flush()
        assert (await sub.next(timeout=5)).payload == b"before"
        assert (await sub.next(timeout=5)).payload == b"after"


async def test_much_too_large_publish_raises_a_client_error(broker) -> None:
    async with connect(broker.url) as pub:
        max_payload = pub.server_info["max_payload"]
        with pytest.raises((client.TidingsError, ValueError)):
            await pub.publish("big", b"x" * (max_payload + 256 * 1024))
            await pub.flush(timeout=5)
        await pub.flush(timeout=5)


async def test_close_sends_pending_publishes_even_after_a_refused_frame(broker) -> None:
    async with connect(broker.url) as sc:
        sub = await sc.subscribe("x")
        async with connect(broker.url) as pub:
            with pytest.raises(InvalidArgumentError):
                await pub.publish("x", b"y" * (pub.server_info["max_payload"] + 1))
            # a frame the broker refuses (a float header) earns a connection-level ERR
            try:
                await pub.publish("x", b"bad", headers={"ratio": 0.5})
            except (client.TidingsError, TypeError, ValueError):
                pass  # refused client-side: fine too
            await pub.flush()
            for i in range(10):
                await pub.publish("x", str(i).encode())
            # no flush: leaving the block must send what is pending
        with anyio.fail_after(WAIT):
            got = [int((await sub.next()).payload) for _ in range(10)]
        assert got == list(range(10))


async def test_close_sends_pending_publishes(broker) -> None:
    async with connect(broker.url) as sc:
        sub = await sc.subscribe("x")
        async with connect(broker.url) as pub:
            for i in range(100):
                await pub.publish("x", str(i).encode())
            # no flush: leaving the block sends what is pending
        with anyio.fail_after(WAIT):
            got = [int((await sub.next()).payload) for _ in range(100)]
        assert got == list(range(100))


# -------------------------------------------------- unsubscribe and isolation

async def test_unsubscribe_stops_delivery(broker) -> None:
    async with connect(broker.url) as sc, connect(broker.url) as pub:
        gone = await sc.subscribe("u.>")
        kept = await sc.subscribe("u.>")
        await pub.publish("u.1", b"1")
        await pub.flush()
        assert (await gone.next(timeout=WAIT)).payload == b"1"
        await gone.close()
        await pub.publish("u.2", b"2")
        await pub.publish("u.3", b"", headers={"sentinel": 1})
        await pub.flush()
        # the closed subscription ends its iteration and gets nothing more
        with pytest.raises(StopAsyncIteration):
            await gone.next(timeout=WAIT)
        assert await take_until_sentinel(kept) == ["u.1", "u.2"]
        assert gone.received == 1
        # the broker forgot it: 1 subscription left (kept) + none for pub
        stats = await pub.call("stats")
        assert stats["subscriptions"] == 1


async def test_closing_one_connection_does_not_disturb_others(broker) -> None:
    async with connect(broker.url) as keep, connect(broker.url) as pub:
        kept = await keep.subscribe("iso.>")
        async with connect(broker.url) as leaving:
            lsub = await leaving.subscribe("iso.>")
            await pub.publish("iso.1", b"1")
            await pub.flush()
            assert (await lsub.next(timeout=WAIT)).payload == b"1"
        # after the other connection is gone, the rest keeps working both ways
        for i in range(2, 50):
            await pub.publish(f"iso.{i}", str(i).encode())
        await pub.publish("iso.end", b"", headers={"sentinel": 1})
        await pub.flush()
        got = await take_until_sentinel(kept)
        assert got == [f"iso.{i}" for i in range(1, 50)]
        back = await pub.subscribe("iso.back")
        await keep.publish("iso.back", b"ok")
        assert (await back.next(timeout=WAIT)).payload == b"ok"
        with anyio.fail_after(WAIT):
            while (await pub.call("stats"))["connections"] != 2:
                await pub.flush()
        assert (await pub.call("stats"))["subscriptions"] == 2
