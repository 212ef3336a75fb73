"""The schema registry against a real broker: registration with compatibility
checks, validation at the door (reject and dead-letter), CloudEvents and
upcasters, restarts, and bad input that leaves the broker serving.

Absence is proven without sleeping: one publisher's messages reach a
subscription, a queue and a stream in publish order, so once the sentinel
published after an invalid message has arrived, the invalid one is not coming.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgpack
import pytest

from tidings.client import Client, Subscription, connect
from tidings.client.errors import (
    NotFoundError,
    SchemaIncompatibleError,
    SchemaInvalidError,
    SchemaViolationError,
)
from tidings.protocol import ErrorCode

WAIT = 10.0

ORDER_V1: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["order_id", "amount", "currency"],
    "additionalProperties": False,
    "properties": {
        "order_id": {"type": "string", "minLength": 1},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD"]},
        "items": {"type": "array", "items": {"type": "object", "required": ["sku"],
                                             "properties": {"sku": {"type": "string"}}}},
    },
}
# Backward compatible: an optional field the closed v1 never wrote.
ORDER_V2: dict[str, Any] = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "note": {"type": "string"}}}
GOOD = {"order_id": "o-1", "amount": 12.5, "currency": "EUR", "items": [{"sku": "A1"}]}
BAD_AMOUNT = {**GOOD, "amount": "12.5"}


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


JSON = {"content-type": "application/json"}


async def until_sentinel(sub: Subscription) -> list[Any]:
    got = []
    with anyio.fail_after(WAIT):
        while True:
            m = await sub.next()
            if m.headers and m.headers.get("sentinel"):
                return got
            got.append(m)


async def setup_order_subject(tc: Client, *, on_invalid: str = "reject", dlq: str | None = None) -> None:
    assert await tc.register_schema("OrderPlaced", ORDER_V1, compatibility="backward") == 1
    await tc.declare_queue("orders-q", bind=["orders.>"])
    await tc.declare_stream("orders-s", bind=["orders.>"])
    await tc.bind_schema("orders.placed", "OrderPlaced", on_invalid=on_invalid, dead_letter_queue=dlq)


async def test_invalid_publish_is_refused_with_its_pointer_and_never_seen(broker):
    async with connect(broker.url) as tc:
        await setup_order_subject(tc)
        sub = await tc.subscribe("orders.>")
        with pytest.raises(SchemaViolationError) as info:
            await tc.publish("orders.placed", body(BAD_AMOUNT), headers=JSON)
        assert info.value.pointer == "/amount" and info.value.rule == "type"
        assert not info.value.retriable
        with pytest.raises(SchemaViolationError) as info:
            await tc.publish("orders.placed", body({"amount": 1, "currency": "EUR"}), headers=JSON)
        assert info.value.pointer == "/order_id" and info.value.rule == "required"
        with pytest.raises(SchemaViolationError) as info:
            await tc.publish("orders.placed", body({**GOOD, "items": [{"sku": 7}]}), headers=JSON)
        assert info.value.pointer == "/items/0/sku"
        ack = await tc.publish("orders.placed", body(GOOD), headers=JSON)
        assert ack is not None
        await tc.publish("orders.sentinel", b"", headers={"sentinel": "1"})
        got = await until_sentinel(sub)
        assert [json.loads(m.payload) for m in got] == [GOOD]
        # what it was validated against, stamped by the broker
        assert got[0].headers["tidings-schema"] == "OrderPlaced"
        assert got[0].headers["tidings-schema-version"] == 1
        assert (await tc.queue_info("orders-q"))["depth"] == 2  # the valid one and the sentinel
        async with tc.consume("orders-q") as deliveries:
            with anyio.fail_after(WAIT):
                first = await deliveries.next()
                assert json.loads(first.payload) == GOOD
        info_s = await tc.stream_info("orders-s")
        assert sum(p["messages"] for p in info_s["partitions"]) == 2
        listed = {s["name"]: s for s in await tc.list_schemas()}
        assert listed["OrderPlaced"]["valid"] == 1 and listed["OrderPlaced"]["invalid"] == 3


async def test_refusal_without_a_confirm_is_an_err_and_other_messages_pass(broker):
    async with connect(broker.url) as tc:
        await tc.register_schema("Ping", {"type": "object", "required": ["n"]})
        await tc.bind_schema("pings.*", "Ping")
        sub = await tc.subscribe("pings.>")
        await tc.publish("pings.a", body({"x": 1}))  # pub/sub only: no confirm, refused with an ERR
        await tc.publish("pings.a", body({"n": 1}))
        await tc.publish("pings.sentinel.x", b"", headers={"sentinel": "1"})
        got = await until_sentinel(sub)
        assert [json.loads(m.payload) for m in got] == [{"n": 1}]
        err = tc.last_server_error
        assert isinstance(err, SchemaViolationError) and err.code == ErrorCode.SCHEMA_VIOLATION
        assert err.pointer == "/n" and err.rule == "required"
        assert "pings.a" in str(err)


async def test_dead_letter_mode_stores_the_invalid_message_with_the_violation(broker):
    async with connect(broker.url) as tc:
        await tc.declare_queue("bad-orders")
        await setup_order_subject(tc, on_invalid="dead_letter", dlq="bad-orders")
        sub = await tc.subscribe("orders.>")
        ack = await tc.publish("orders.placed", body(BAD_AMOUNT), headers=JSON)  # confirmed: it was stored
        assert ack is not None
        await tc.publish("orders.sentinel", b"", headers={"sentinel": "1"})
        assert await until_sentinel(sub) == []
        assert (await tc.queue_info("orders-q"))["depth"] == 1  # the sentinel only
        async with tc.consume("bad-orders") as deliveries:
            with anyio.fail_after(WAIT):
                d = await deliveries.next()
        assert json.loads(d.payload) == BAD_AMOUNT and d.subject == "orders.placed"
        h = d.headers
        assert h["tidings-dlq-reason"] == "schema_violation"
        assert h["tidings-schema"] == "OrderPlaced"
        assert h["tidings-schema-error-pointer"] == "/amount"
        assert h["tidings-schema-error-rule"] == "type"
        assert "/amount" in h["tidings-schema-error"]
        with pytest.raises(NotFoundError):  # a dead-letter queue must exist
            await tc.bind_schema("orders.x", "OrderPlaced", on_invalid="dead_letter", dead_letter_queue="nope")


async def test_incompatible_version_is_refused_with_the_reason(broker):
    async with connect(broker.url) as tc:
        assert await tc.register_schema("OrderPlaced", ORDER_V1, compatibility="backward") == 1
        assert await tc.register_schema("OrderPlaced", ORDER_V1) == 1  # the same document: no new version
        changed = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "amount": {"type": "string"}}}
        with pytest.raises(SchemaIncompatibleError) as info:
            await tc.register_schema("OrderPlaced", changed)
        assert "backward: /properties/amount: type changed from number to string" in str(info.value)
        required = {**ORDER_V2, "required": [*ORDER_V1["required"], "note"]}
        report = await tc.check_schema("OrderPlaced", required)
        assert report["compatible"] is False
        assert any("/properties/note: required field added" in r for r in report["reasons"])
        assert (await tc.check_schema("OrderPlaced", ORDER_V2)) == {
            "compatible": True, "reasons": [], "version": 2, "compatibility": "backward"}
        assert await tc.register_schema("OrderPlaced", ORDER_V2) == 2
        assert await tc.register_schema("OrderPlaced", ORDER_V1) == 1  # a known document keeps its version
        # forward_transitive against both: dropping a property the closed v1 requires breaks v1 readers
        dropped = {**ORDER_V2, "required": ["order_id", "amount"],
                   "properties": {k: v for k, v in ORDER_V2["properties"].items() if k != "currency"}}
        with pytest.raises(SchemaIncompatibleError) as info:
            await tc.register_schema("OrderPlaced", dropped, compatibility="forward_transitive")
        assert "forward" in str(info.value) and "currency" in str(info.value)
        got = await tc.get_schema("OrderPlaced")
        assert (got["version"], got["schema"], got["versions"]) == (2, ORDER_V2, 2)
        assert (await tc.get_schema("OrderPlaced", 1))["schema"] == ORDER_V1
        with pytest.raises(NotFoundError):
            await tc.get_schema("OrderPlaced", 9)


async def test_schemas_and_bindings_survive_a_restart(broker):
    async with connect(broker.url) as tc:
        await tc.register_schema("OrderPlaced", ORDER_V1)
        await tc.register_schema("OrderPlaced", ORDER_V2)
        await tc.declare_queue("orders-q", bind=["orders.>"])
        await tc.bind_schema("orders.placed", "OrderPlaced")
    broker.terminate()
    broker.restart()
    async with connect(broker.url) as tc:
        assert (await tc.get_schema("OrderPlaced"))["version"] == 2
        assert [b["pattern"] for b in await tc.list_schema_bindings()] == ["orders.placed"]
        with pytest.raises(SchemaViolationError):
            await tc.publish("orders.placed", body(BAD_AMOUNT), headers=JSON)
        assert await tc.publish("orders.placed", body({**GOOD, "note": "hi"}), headers=JSON) is not None
        assert await tc.register_schema("OrderPlaced", ORDER_V2) == 2
        await tc.unbind_schema("orders.placed")
        assert await tc.publish("orders.placed", body(BAD_AMOUNT), headers=JSON) is not None  # unbound now
        with pytest.raises(NotFoundError):
            await tc.unbind_schema("orders.placed")


async def test_bad_input_gets_typed_errors_and_the_broker_keeps_serving(broker):
    async with connect(broker.url) as tc, connect(broker.url) as other:
        with pytest.raises(SchemaInvalidError):
            await tc.register_schema("Bad", {"type": "bogus"})
        with pytest.raises(SchemaInvalidError):
            await tc.register_schema("Bad", {"$ref": "http://example.invalid/schema.json"})
        with pytest.raises(SchemaInvalidError):
            await tc.register_schema("Bad", {"$schema": "http://json-schema.org/draft-07/schema#"})
        with pytest.raises(NotFoundError):
            await tc.bind_schema("x.y", "Bad")
        await setup_order_subject(tc)
        cases = [
            ({"content-type": "text/plain"}, body(GOOD), "content-type"),
            ({"content-type": "application/json"}, b"{not json", "decode"),
            ({"content-type": "application/msgpack"}, b"\xc1", "decode"),
            ({**JSON, "tidings-schema-version": 7}, body(GOOD), "schema-version"),
            ({**JSON, "tidings-schema-version": "v1"}, body(GOOD), "schema-version"),
            ({**JSON, "ce-dataschema": "urn:schemas:OrderPlaced:3"}, body(GOOD), "schema-version"),
        ]
        for headers, payload, rule in cases:
            with pytest.raises(SchemaViolationError) as info:
                await tc.publish("orders.placed", payload, headers=headers)
            assert info.value.rule == rule, (headers, str(info.value))
        # what passes: msgpack, no content-type (JSON), a named version, a parameterised media type
        assert await tc.publish("orders.placed", msgpack.packb(GOOD),
                                headers={"content-type": "application/msgpack"}) is not None
        assert await tc.publish("orders.placed", body(GOOD)) is not None
        assert await tc.publish("orders.placed", body(GOOD),
                                headers={"content-type": "application/json; charset=utf-8",
                                         "tidings-schema-version": "1"}) is not None
        # and everyone else was served throughout
        assert await other.publish("orders.other", b"anything") is not None
        assert (await other.queue_info("orders-q"))["depth"] == 4


async def test_publish_event_and_read_it_upcast(broker):
    async with connect(broker.url) as tc:
        await tc.register_schema("OrderPlaced", ORDER_V1)
        await tc.register_schema("OrderPlaced", ORDER_V2)
        await tc.bind_schema("orders.placed", "OrderPlaced")
        tc.register_upcaster("OrderPlaced", 1, lambda d: {**d, "note": "upcast from v1"})
        sub = await tc.subscribe("orders.placed")
        await tc.publish_event("orders.placed", type="OrderPlaced", source="/shop", data=GOOD,
                               schema_version=1, id="ev-1", ce_subject="o-1", confirm=True)
        await tc.publish_event("orders.placed", type="OrderPlaced", source="/shop", data={**GOOD, "note": "x"},
                               content_type="application/msgpack",
                               dataschema="https://schemas.example/OrderPlaced/2", confirm=True)
        with pytest.raises(SchemaViolationError):
            await tc.publish_event("orders.placed", type="OrderPlaced", source="/shop", data=BAD_AMOUNT,
                                   confirm=True)
        with anyio.fail_after(WAIT):
            first, second = await sub.next(), await sub.next()
        ev = first.event
        assert ev is not None
        assert (ev.id, ev.source, ev.type, ev.specversion, ev.subject) == ("ev-1", "/shop", "OrderPlaced", "1.0", "o-1")
        assert ev.time is not None and ev.time.endswith("Z")
        assert ev.data == {**GOOD, "note": "upcast from v1"} and ev.version == 2
        ev2 = second.event
        assert ev2 is not None and ev2.data == {**GOOD, "note": "x"} and ev2.version == 2
        assert ev2.datacontenttype == "application/msgpack"
        assert ev2.dataschema == "https://schemas.example/OrderPlaced/2"
        await tc.publish("orders.placed.plain", b"x")  # not an event: .event is None
        plain = await tc.subscribe("plain")
        await tc.publish("plain", b"x")
        with anyio.fail_after(WAIT):
            assert (await plain.next()).event is None


async def test_metrics_count_valid_and_invalid_publishes_per_schema(start_broker):
    from tests.opshttp import metrics_address, scrape, value

    b = start_broker("--metrics-port", "0")
    host, port = metrics_address(b.extra_lines)
    async with connect(b.url) as tc:
        await tc.declare_queue("bad-orders")
        await setup_order_subject(tc, on_invalid="dead_letter", dlq="bad-orders")
        for _ in range(3):
            await tc.publish("orders.placed", body(GOOD), headers=JSON)
        await tc.publish("orders.placed", body(BAD_AMOUNT), headers=JSON)
    samples = await anyio.to_thread.run_sync(scrape, host, port)
    assert value(samples, "tidings_schema_messages_total", schema="OrderPlaced", outcome="valid") == 3
    assert value(samples, "tidings_schema_messages_total", schema="OrderPlaced", outcome="invalid") == 1
    assert value(samples, "tidings_schema_messages_total", schema="OrderPlaced", outcome="dead_lettered") == 1
