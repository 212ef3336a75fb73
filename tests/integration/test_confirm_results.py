"""The CONFIRM result of a durable publish (docs/PROTOCOL.md 7.8): the bare id when
one queue and no stream stored the message and the client announced `confirm_ids` in
its HELLO, the map otherwise (older clients read only the map); the client's
PublishAck and the HTTP gateway read both the same way (issue 14 item 2: no
result dict per message on the common path)."""

from __future__ import annotations

import anyio

from tidings.client import connect
from tidings.client.results import PublishAck
from tidings.protocol import frames as F
from rawclient import RawClient

WAIT = 20.0


async def raw_confirm(rc: RawClient, subject: str, seq: int, opts: dict | None = None) -> list:
    await rc.send(F.Pub([[subject, b"x", None, None, seq, opts]]))
    frame = await rc.read_until(lambda f: isinstance(f, F.Confirm), timeout=WAIT)
    assert isinstance(frame, F.Confirm)
    [item] = frame.items
    return item


async def test_confirm_of_one_queue_is_the_bare_id_and_others_a_map(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("cr-one", bind=["cr.one"])
        await tc.declare_queue("cr-two-a", bind=["cr.two"])
        await tc.declare_queue("cr-two-b", bind=["cr.two"])
        await tc.declare_stream("cr-s", partitions=2, bind=["cr.s"])
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello(options={F.HELLO_CONFIRM_IDS: True})
            seq, code, result = await raw_confirm(rc, "cr.one", 1)
            assert (seq, code) == (1, 0) and type(result) is int and result > 0
            _seq, code, two = await raw_confirm(rc, "cr.two", 2)
            assert code == 0 and isinstance(two, dict) and two["queues"] == 2 and two["id"] > result
            _seq, code, st = await raw_confirm(rc, "cr.s", 3, {"key": "k"})
            assert code == 0 and st["queues"] == 0 and st["stream"] == "cr-s" and st["offset"] == 0
            # a duplicate of a compact one is answered with the map, marked duplicate
            _seq, code, first = await raw_confirm(rc, "cr.one", 4, {"id": "m-1"})
            assert code == 0 and type(first) is int
            _seq, code, dup = await raw_confirm(rc, "cr.one", 5, {"id": "m-1"})
            assert code == 0 and dup == {"id": first, "queues": 1, "duplicate": True}
        # the client reads both forms the same way
        with anyio.fail_after(WAIT):
            ack = await tc.publish("cr.one", b"y", confirm=True)
            assert isinstance(ack, PublishAck) and ack.id is not None and ack.queues == 1
            assert ack.raw == {"id": ack.id, "queues": 1} and not ack.duplicate
            ack2 = await tc.publish("cr.two", b"y", confirm=True)
            assert ack2.queues == 2 and ack2.id > ack.id


async def test_a_client_that_did_not_ask_gets_the_map(broker) -> None:
    """A client from before the compact form (no confirm_ids in HELLO) still reads a map."""
    async with connect(broker.url) as tc:
        await tc.declare_queue("cr-old", bind=["cr.old"])
    async with RawClient.open(broker.host, broker.port) as rc:
        await rc.hello()
        _seq, code, result = await raw_confirm(rc, "cr.old", 1)
        assert code == 0 and isinstance(result, dict) and result["queues"] == 1 and result["id"] > 0


def test_publish_ack_reads_both_forms() -> None:
    a = PublishAck.from_wire(42)
    assert a is not None and (a.id, a.queues, a.duplicate, a.stream) == (42, 1, False, None)
    b = PublishAck.from_wire({"id": 43, "queues": 0, "stream": "s", "partition": 1, "offset": 7})
    assert b is not None and (b.id, b.queues, b.stream, tuple(b)) == (43, 0, "s", (1, 7))
    assert PublishAck.from_wire(None) is None
    assert PublishAck.from_wire(True) is None  # not an id
