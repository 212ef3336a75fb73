from __future__ import annotations

from tidings.client import connect


async def test_publish_subscribe_roundtrip(broker) -> None:
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("orders.>")
        await tc.publish("orders.eu.created", b"one", headers={"type": "created"})
        m = await sub.next(timeout=5)
        assert (m.subject, m.payload, m.headers) == ("orders.eu.created", b"one", {"type": "created"})
