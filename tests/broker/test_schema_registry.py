"""SchemaRegistry in-process over a MemoryStore: the publish check, binding
precedence, the memo, recovery from the store (broker/schemas/registry.py)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from tidings.broker.durable.store import MemoryData, MemoryStore, PutSchema
from tidings.broker.schemas.registry import SchemaRegistry
from tidings.protocol import ErrorCode, RemoteProtocolError

NUM = {"type": "object", "required": ["n"], "properties": {"n": {"type": "number"}}}
STR = {"type": "object", "required": ["s"], "properties": {"s": {"type": "string"}}}


def msg(subject: str, obj: Any, headers: dict[str, Any] | None = None) -> list[Any]:
    return [subject, json.dumps(obj).encode(), headers, None, 1, None]


async def with_registry(data: MemoryData, fn: Any, queues: dict[str, Any] | None = None) -> None:
    store = MemoryStore(data)
    await store.open()
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        reg = SchemaRegistry(store, (queues or {}).get)
        await reg.load()
        await fn(reg)
        await store.close()


async def test_screen_stamps_valid_refuses_invalid_and_ignores_unbound() -> None:
    async def go(reg: SchemaRegistry) -> None:
        assert not reg.active
        await reg.register({"name": "Num", "schema": NUM}, 1)
        await reg.bind({"pattern": "a.>", "name": "Num"}, 1)
        assert reg.active
        assert reg.screen(msg("b.c", {"x": 1})) is None  # unbound
        m = msg("a.b", {"n": 1})
        assert reg.screen(m) is None and m[2] == {"tidings-schema": "Num", "tidings-schema-version": 1}
        v, dead = reg.screen(msg("a.b", {"n": "x"}))  # type: ignore[misc]
        assert (v.pointer, v.rule, dead) == ("/n", "type", None)
        full = {f"h{i}": "x" for i in range(63)}  # no room for two more headers: not stamped
        m = msg("a.b", {"n": 1}, dict(full))
        assert reg.screen(m) is None and m[2] == full
        await reg.unbind({"pattern": "a.>"}, 1)
        assert not reg.active and reg.screen(msg("a.b", {"n": "x"})) is None  # the memo was cleared

    await with_registry(MemoryData(), go)


async def test_the_most_specific_binding_wins() -> None:
    async def go(reg: SchemaRegistry) -> None:
        await reg.register({"name": "Num", "schema": NUM}, 1)
        await reg.register({"name": "Str", "schema": STR}, 1)
        await reg.bind({"pattern": "orders.>", "name": "Num"}, 1)
        await reg.bind({"pattern": "orders.*.placed", "name": "Str"}, 1)
        await reg.bind({"pattern": "orders.eu.placed", "name": "Num"}, 1)
        assert reg.screen(msg("orders.us.placed", {"s": "x"})) is None  # Str
        assert reg.screen(msg("orders.eu.placed", {"n": 1})) is None  # Num (literal)
        assert reg.screen(msg("orders.x", {"n": 1})) is None  # Num
        assert reg.screen(msg("orders.us.placed", {"n": 1})) is not None

    await with_registry(MemoryData(), go)


async def test_state_is_recovered_and_a_broken_stored_version_is_left_out(caplog) -> None:
    data = MemoryData()

    async def first(reg: SchemaRegistry) -> None:
        await reg.register({"name": "Num", "schema": NUM}, 1)
        await reg.bind({"pattern": "a.b", "name": "Num"}, 1)
        await reg.store.write(PutSchema("Broken", 1, {"type": "bogus"}, "none", 1))

    async def second(reg: SchemaRegistry) -> None:
        assert sorted(reg.schemas) == ["Num"]
        assert reg.active and reg.screen(msg("a.b", {"n": "x"})) is not None
        assert (await reg.register({"name": "Num", "schema": NUM}, 1))["version"] == 1

    await with_registry(data, first)
    await with_registry(data, second)
    assert "Broken version 1 no longer compiles" in caplog.text


async def test_dead_letter_to_a_queue_deleted_since_is_a_refusal() -> None:
    queues: dict[str, Any] = {"dlq": object()}

    async def go(reg: SchemaRegistry) -> None:
        await reg.register({"name": "Num", "schema": NUM}, 1)
        await reg.bind({"pattern": "a.b", "name": "Num", "on_invalid": "dead_letter", "dead_letter": "dlq"}, 1)
        v, dead = reg.screen(msg("a.b", {"n": "x"}, {"k": "v"}))  # type: ignore[misc]
        assert dead is not None and dead[1] == [queues["dlq"]] and dead[0][2]["k"] == "v"
        assert dead[0][2]["tidings-schema-error-pointer"] == "/n"
        del queues["dlq"]
        v, dead = reg.screen(msg("a.b", {"n": "x"}))  # type: ignore[misc]
        assert dead is None and "does not exist" in v.detail

    await with_registry(MemoryData(), go, queues)


@pytest.mark.parametrize("args,code", [
    ({"name": "X", "schema": {"type": 1}}, ErrorCode.SCHEMA_INVALID),
    ({"name": "X"}, ErrorCode.INVALID_ARGUMENT),
    ({"name": "a b", "schema": {}}, ErrorCode.INVALID_ARGUMENT),
    ({"name": "X", "schema": {}, "compatibility": "sideways"}, ErrorCode.INVALID_ARGUMENT),
])
async def test_bad_registrations(args: dict[str, Any], code: ErrorCode) -> None:
    async def go(reg: SchemaRegistry) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            await reg.register(args, 7)
        assert info.value.code == code

    await with_registry(MemoryData(), go)
