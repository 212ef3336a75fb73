"""Payloads that cannot surprise (issue 15.3): a publish takes bytes-like or
str and nothing else; ``json=`` sends JSON (pydantic models too) with its
content-type; a pub/sub Message and a queue Delivery read it back alike
(``json()``, ``model(T)``, ``text()``, ``data``)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from typing import Any

import anyio
import pytest
from queuetools import WAIT, declare

from tidings.client import Message, connect
from tidings.client.consumer import Delivery

pydantic = pytest.importorskip("pydantic", reason="pydantic is in the test extra: pip install -e '.[test]'")


class OrderPlaced(pydantic.BaseModel):
    order_id: str
    amount_cents: int
    items: list[str] = []


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


@pytest.mark.parametrize("bad, named", [(42, "int"), ({"a": 1}, "dict"), ([b"x"], "list"), (None, "NoneType"),
                                        (OrderPlaced(order_id="o", amount_cents=1), "OrderPlaced")])
async def test_a_payload_that_is_not_bytes_or_str_is_a_type_error(broker, bad: Any, named: str) -> None:
    async with connect(broker.url) as tc, connect(broker.url) as watcher:
        sub = await watcher.subscribe("pay.>")
        for send in (lambda: tc.publish("pay.x", bad), lambda: tc.publish("pay.x", bad, confirm=True),
                     lambda: tc.request("pay.x", bad, timeout=WAIT)):
            with pytest.raises(TypeError, match=f"not {named}: .*json="):
                await send()
        with pytest.raises(TypeError, match=f"not {named}"):
            tc.publish_nowait("pay.x", bad)
        # nothing of them was sent: the next message is the first to arrive
        await tc.publish("pay.x", b"after")
        assert (await sub.next(timeout=WAIT)).payload == b"after"


async def test_bytes_like_and_str_payloads_arrive_as_bytes(broker) -> None:
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("pay.>")
        for payload in (b"b", bytearray(b"ba"), memoryview(b"xmvx")[1:3], "h\u00e9"):
            await tc.publish("pay.x", payload)
        got = [await sub.next(timeout=WAIT) for _ in range(4)]
        assert [m.payload for m in got] == [b"b", b"ba", b"mv", "h\u00e9".encode()]
        assert all(type(m.payload) is bytes and m.content_type is None for m in got)
        assert got[3].text() == "h\u00e9" and got[3].data is got[3].payload


async def test_json_round_trip_on_a_subscription(broker) -> None:
    doc = {"order": "o-1", "amount": 12.5, "tags": ["a", "\u00fc"], "ok": True, "none": None}
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("orders.>")
        await tc.publish("orders.placed", json=doc)
        await tc.publish("orders.placed", json=doc, headers={"type": "OrderPlaced"})
        await tc.publish("orders.placed", json=[1, 2], headers={"content-type": "application/cloudevents+json"})
        await tc.publish_nowait("orders.placed", json=None)
        plain, typed, own, null = [await sub.next(timeout=WAIT) for _ in range(4)]
        assert plain.json() == doc and plain.content_type == "application/json"
        assert plain.headers == {"content-type": "application/json"}
        assert typed.headers == {"type": "OrderPlaced", "content-type": "application/json"}
        assert own.json() == [1, 2] and own.content_type == "application/cloudevents+json"  # the caller's wins
        assert null.payload == b"null" and null.json() is None
    with pytest.raises(ValueError):
        Message("s", b"not json", None, None).json()


async def test_json_round_trip_on_a_queue_delivery(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "billing", "billing.>")
        ack = await tc.publish("billing.due", json={"invoice": 7, "lines": [Line("a", 2)]}, msg_id="inv-7")
        assert ack is not None and ack.queues == 1
        async with tc.consume("billing") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            assert isinstance(d, Delivery)
            assert d.json() == {"invoice": 7, "lines": [{"sku": "a", "qty": 2}]}
            assert d.content_type == "application/json" and d.data is d.payload
            assert d.text() == '{"invoice":7,"lines":[{"sku":"a","qty":2}]}'
            await d.ack()


async def test_pydantic_models_round_trip(broker) -> None:
    order = OrderPlaced(order_id="o-9", amount_cents=1250, items=["tea"])
    async with connect(broker.url) as tc:
        await declare(tc, "orders", "orders.placed")
        sub = await tc.subscribe("orders.>")
        await tc.publish("orders.placed", json=order)
        await tc.publish("orders.placed", json=[order, order], confirm=True)  # models inside a list
        msg = await sub.next(timeout=WAIT)
        assert msg.model(OrderPlaced) == order and msg.content_type == "application/json"
        assert (await sub.next(timeout=WAIT)).model(list[OrderPlaced]) == [order, order]
        async with tc.consume("orders") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            assert d.model(OrderPlaced) == order
            assert d.model(dict[str, Any])["order_id"] == "o-9"
            await d.ack()
        bad = Message("orders.placed", b'{"order_id": "o-1"}', None, None)
        with pytest.raises(pydantic.ValidationError):
            bad.model(OrderPlaced)


async def test_request_and_respond_take_json(broker) -> None:
    async with connect(broker.url) as svc, connect(broker.url) as tc:
        sub = await svc.subscribe("svc.quote")

        async def serve() -> None:
            req = await sub.next(timeout=WAIT)
            q = req.model(OrderPlaced)
            await req.respond(json={"order_id": q.order_id, "price": q.amount_cents * 2})

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            reply = await tc.request("svc.quote", json=OrderPlaced(order_id="q-1", amount_cents=5), timeout=WAIT)
        assert reply.json() == {"order_id": "q-1", "price": 10} and reply.content_type == "application/json"
        with pytest.raises(TypeError, match="not both"):
            await tc.publish("svc.quote", b"raw", json={"a": 1})
        with pytest.raises(ValueError):
            await tc.publish("svc.quote", json={"x": math.nan})  # NaN is not JSON
        with pytest.raises(TypeError, match="cannot encode a set"):
            await tc.publish("svc.quote", json={"x": {1, 2}})


def test_the_client_imports_pydantic_only_when_it_must(monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys, tidings.client; from tidings.client import Message; "
            "m = Message('s', b'[1]', None, None); assert m.json() == [1]; "
            "assert 'pydantic' not in sys.modules, 'importing the client loaded pydantic'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # without pydantic, model(T) of a type that is not a model says how to get it
    monkeypatch.setitem(sys.modules, "pydantic", None)
    with pytest.raises(ImportError, match=r"tidings\[pydantic\]"):
        Message("s", b"[1.5]", None, None).model(list[complex])
