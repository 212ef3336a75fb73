"""Content-based routing against a real broker (issue 12.4): filtered
subscriptions, queue and stream bindings with a match (across a restart),
queue groups with filters, and bad filters refused with the broker serving.

Absence is proven without sleeping: one publisher's messages reach a
subscription, a queue and a stream in publish order, so once a sentinel
published last has arrived (or been counted), the earlier ones are settled.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tidings.client import Subscription, connect
from tidings.client.errors import ConnectionClosedError, InvalidArgumentError
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from rawclient import RawClient

WAIT = 10.0
JSON = {"content-type": "application/json"}
ORDER: dict[str, Any] = {
    "type": "object", "required": ["order_id", "amount", "region"],
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}, "region": {"type": "string"}},
}
BIG_EU = {"region": [{"prefix": "eu-"}], "data": {"amount": [{"numeric": [">", 100]}]}}


def order(i: int, region: str, amount: float) -> tuple[bytes, dict[str, Any]]:
    return json.dumps({"order_id": f"o-{i}", "amount": amount, "region": region}).encode(), {**JSON, "region": region}


MIX = [("eu-west", 500), ("us-east", 500), ("eu-north", 50), ("eu-north", 150), ("apac", 1000)]
MATCHING = [0, 3]  # indexes of MIX that BIG_EU matches


async def drain(sub: Subscription, stop: str) -> list[Any]:
    """Messages up to (not including) the one whose order_id is ``stop``."""
    got = []
    with anyio.fail_after(WAIT):
        while True:
            m = await sub.next()
            if json.loads(m.payload)["order_id"] == stop:
                return got
            got.append(json.loads(m.payload)["order_id"])


async def publish_mix(tc: Any, subject: str = "orders.placed") -> None:
    for i, (region, amount) in enumerate(MIX):
        payload, headers = order(i, region, amount)
        await tc.publish(subject, payload, headers=headers)
    payload, headers = order(99, "eu-sentinel", 101)  # matches BIG_EU: the last one
    await tc.publish(subject, payload, headers=headers)


async def test_filtered_subscriber_gets_only_matching_messages(broker):
    async with connect(broker.url) as tc:
        await tc.register_schema("OrderPlaced", ORDER)
        await tc.bind_schema("orders.placed", "OrderPlaced")
        big_eu = await tc.subscribe("orders.>", match=BIG_EU)
        headers_only = await tc.subscribe("orders.*", match={"region": [{"prefix": "eu-"}, "apac"]})
        everything = await tc.subscribe("orders.>")
        await publish_mix(tc)
        assert await drain(big_eu, "o-99") == [f"o-{i}" for i in MATCHING]
        assert await drain(headers_only, "o-99") == ["o-0", "o-2", "o-3", "o-4"]
        assert await drain(everything, "o-99") == [f"o-{i}" for i in range(len(MIX))]


async def test_data_filters_see_no_fields_where_no_schema_binds_the_subject(broker):
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("free.>", match={"data": {"amount": [{"exists": False}]}})
        payload, headers = order(1, "eu-west", 500)
        await tc.publish("free.x", payload, headers=headers)  # no schema: the payload is opaque
        with anyio.fail_after(WAIT):
            assert json.loads((await sub.next()).payload)["order_id"] == "o-1"


async def test_queue_binding_with_a_match_stores_only_matching_across_a_restart(broker):
    async with connect(broker.url) as tc:
        await tc.register_schema("OrderPlaced", ORDER)
        await tc.bind_schema("orders.placed", "OrderPlaced")
        await tc.declare_queue("big-eu-orders", bind=[{"subject": "orders.placed", "match": BIG_EU}])
        await tc.declare_queue("all-orders", bind=["orders.placed"])
        await publish_mix(tc)
        assert (await tc.queue_info("big-eu-orders"))["depth"] == len(MATCHING) + 1
        assert (await tc.queue_info("all-orders"))["depth"] == len(MIX) + 1
        # a durable publish that only a filter turned away is answered, not a NoRouteError
        await tc.delete_queue("all-orders")
        payload, headers = order(7, "us-east", 500)
        assert await tc.publish("orders.placed", payload, headers=headers, confirm=True) is None
        info = await tc.queue_info("big-eu-orders")
        assert info["config"]["bind"] == [{"subject": "orders.placed", "match": BIG_EU}]
    broker.terminate()
    broker.restart()
    async with connect(broker.url) as tc:
        await publish_mix(tc)
        info = await tc.queue_info("big-eu-orders")
        assert info["depth"] == 2 * (len(MATCHING) + 1)
        assert info["config"]["bind"] == [{"subject": "orders.placed", "match": BIG_EU}]
        # re-declaring with another filter is a conflict, with the same one it is not
        assert (await tc.declare_queue("big-eu-orders", bind=[{"subject": "orders.placed",
                                                                "match": BIG_EU}]))["created"] is False
        with pytest.raises(Exception) as info_exc:
            await tc.declare_queue("big-eu-orders", bind=[{"subject": "orders.placed", "match": {"x": ["y"]}}])
        assert getattr(info_exc.value, "code", None) == ErrorCode.CONFLICT
        got = []
        async with tc.consume("big-eu-orders") as deliveries:
            with anyio.fail_after(WAIT):
                for _ in range(info["depth"]):
                    d = await deliveries.next()
                    got.append(json.loads(d.payload)["order_id"])
                    await d.ack()
        assert got == ["o-0", "o-3", "o-99"] * 2


async def test_stream_binding_with_a_match_across_a_restart(broker):
    async with connect(broker.url) as tc:
        await tc.declare_stream("eu-orders", bind=[{"subject": "orders.*", "match": {"region": [{"prefix": "eu-"}]}},
                                                   {"subject": "orders.*", "match": {"region": ["apac"]}}])
        await publish_mix(tc)
        info = await tc.stream_info("eu-orders")
        assert sum(p["messages"] for p in info["partitions"]) == 5  # eu-west, eu-north x2, apac, sentinel
    broker.terminate()
    broker.restart()
    async with connect(broker.url) as tc:
        await publish_mix(tc, "orders.shipped")
        info = await tc.stream_info("eu-orders")
        assert sum(p["messages"] for p in info["partitions"]) == 10
        assert len(info["config"]["bind"]) == 2
        got = []
        async for m in tc.read_stream("eu-orders", 0, "earliest"):
            got.append(json.loads(m.payload)["region"])
            if len(got) == 10:
                break
        assert got == ["eu-west", "eu-north", "eu-north", "apac", "eu-sentinel"] * 2


async def test_queue_group_picks_only_among_members_whose_filter_matches(broker):
    async with connect(broker.url) as tc:
        eu = await tc.subscribe("jobs.>", group="workers", match={"region": [{"prefix": "eu-"}]})
        anyone = await tc.subscribe("jobs.>", group="workers")
        us = await tc.subscribe("jobs.>", group="workers", match={"region": ["us-east"]})
        n = 30
        for i in range(n):
            region = ("eu-west", "us-east", "apac")[i % 3]
            await tc.publish("jobs.run", str(i).encode(), headers={"region": region})
        await tc.flush()
        seen: dict[str, list[str]] = {"eu": [], "anyone": [], "us": []}
        done = anyio.Event()

        async def read(name: str, sub: Subscription) -> None:
            while True:
                seen[name].append((await sub.next()).headers["region"])
                if sum(len(v) for v in seen.values()) == n:
                    done.set()

        async with anyio.create_task_group() as tg:
            for name, sub in (("eu", eu), ("anyone", anyone), ("us", us)):
                tg.start_soon(read, name, sub)
            with anyio.fail_after(WAIT):
                await done.wait()
            await tc.flush()  # anything extra (a message twice) would have arrived before the PONG
            await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert set(seen["eu"]) <= {"eu-west"} and set(seen["us"]) <= {"us-east"}
        assert seen["anyone"].count("apac") == n // 3  # no filtered member takes it
        assert sum(len(v) for v in seen.values()) == n  # each message once


async def test_group_members_with_the_same_filter_share_the_load(broker):
    async with connect(broker.url) as tc:
        a = await tc.subscribe("jobs.>", group="eu", match={"region": [{"prefix": "eu-"}]})
        b = await tc.subscribe("jobs.>", group="eu", match={"region": [{"prefix": "eu-"}]})
        watch = await tc.subscribe("jobs.>")
        for i in range(10):
            await tc.publish("jobs.run", str(i).encode(), headers={"region": "us-east" if i % 2 else "eu-west"})
        with anyio.fail_after(WAIT):
            for _ in range(10):
                await watch.next()
        await tc.flush()
        assert a.received + b.received == 5 and a.received and b.received


async def test_invalid_filters_are_refused_and_the_broker_keeps_serving(broker):
    async with connect(broker.url) as tc, connect(broker.url) as other:
        with pytest.raises(InvalidArgumentError) as info:
            await tc.subscribe("a.>", match={"amount": [{"numeric": [">", "100"]}]})
        assert "'amount'" in str(info.value) and "'numeric'" in str(info.value)
        with pytest.raises(InvalidArgumentError) as info:
            await tc.declare_queue("bad-q", bind=[{"subject": "a.b", "match": {"region": [{"prefx": "eu"}]}}])
        assert "'region'" in str(info.value) and "'prefx'" in str(info.value)
        with pytest.raises(InvalidArgumentError):
            await tc.declare_stream("bad-s", bind=[{"subject": "a.b", "match": {"region": "eu"}}])
        with pytest.raises(InvalidArgumentError):
            await tc.declare_queue("bad-q", bind=[{"subject": "a.b", "filter": {}}])
        # each filtered entry is a binding checked per message: max_bind_patterns counts entries
        many = [{"subject": "a.b", "match": {"n": [i]}} for i in range(65)]
        with pytest.raises(InvalidArgumentError) as info:
            await tc.declare_queue("bad-q", bind=many)
        assert "max_bind_patterns" in str(info.value)
        # the broker checks too (a client that does not): INVALID_ARGUMENT for that SUB only
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            rid = rc.next_rid()
            await rc.send_wire([F.Op.SUB, rid, 1, "a.>", None, {"region": [{"exists": "yes"}]}])
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == rid, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.INVALID_ARGUMENT and "'exists'" in err.message
            rid = rc.next_rid()
            await rc.send_wire([F.Op.SUB, rid, 2, "a.>", None, ["not", "a", "map"]])
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == rid, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.INVALID_ARGUMENT
            rid = rc.next_rid()
            await rc.send_wire([F.Op.SUB, rid, 3, "a.>", None, {"region": [b"eu"]}])  # bytes: not JSON
            err = await rc.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == rid, WAIT)
            assert isinstance(err, F.Err) and err.code == ErrorCode.INVALID_ARGUMENT, err
            await rc.ping()
        sub = await other.subscribe("a.>")
        await tc.publish("a.b", b"still serving")
        with anyio.fail_after(WAIT):
            assert (await sub.next()).payload == b"still serving"
        assert "bad-q" not in {q["name"] for q in await tc.list_queues()}


async def test_filters_are_sent_again_after_a_reconnect(broker):
    async with connect(broker.url, reconnect_wait=(0.05, 0.25)) as tc:
        sub = await tc.subscribe("r.>", match={"region": ["eu-west"]})
        broker.terminate()
        broker.restart()
        for _attempt in range(5):  # the loss may be noticed only by this flush: then wait again
            await tc.wait_connected(WAIT * 3)
            try:
                await tc.flush()  # the SUB re-sent on resume is answered before this
                break
            except ConnectionClosedError:
                continue
        await tc.publish("r.x", b"us", headers={"region": "us-east"})
        await tc.publish("r.x", b"eu", headers={"region": "eu-west"})
        with anyio.fail_after(WAIT):
            assert (await sub.next()).payload == b"eu"
