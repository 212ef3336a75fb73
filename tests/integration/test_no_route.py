"""No silent loss on a mistyped subject (issue 15.1): a publish that asks for a
confirm and reaches no queue, stream or subscriber raises NoRouteError, and
nothing is stored; a confirm publish that live subscribers took is confirmed;
a fire-and-forget publish to nobody stays silent (that is pub/sub)."""

from __future__ import annotations

import pytest
from queuetools import WAIT, declare
from rawclient import RawClient

import tidings
from tidings.client import connect
from tidings.client.errors import NoRouteError, for_code
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F


async def test_a_confirm_publish_to_a_mistyped_subject_raises_and_stores_nothing(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "orders", "orders.placed")
        ack = await tc.publish("orders.placed", b"o-1", msg_id="o-1", confirm=True)
        assert ack is not None and ack.queues == 1
        with pytest.raises(tidings.NoRouteError) as info:
            await tc.publish("orders.placd", b"o-2", msg_id="o-2", confirm=True)
        assert "orders.placd" in str(info.value)
        assert info.value.code == ErrorCode.NO_ROUTE and info.value.retriable is False
        # a durable option asks for a confirm by itself: the same answer without confirm=True
        with pytest.raises(NoRouteError):
            await tc.publish("orders.placd", b"o-3", msg_id="o-3")
        with pytest.raises(NoRouteError):
            await tc.publish("orders.placd", b"o-4", delay=0.01)
        assert (await tc.queue_info("orders"))["depth"] == 1
        assert sum(q["depth"] for q in await tc.list_queues()) == 1  # orders and its dead-letter queue
        assert await tc.list_streams() == []
        # the msg_id of a refused publish was not recorded: once the subject exists, it is stored
        await declare(tc, "typos", "orders.placd")
        ack = await tc.publish("orders.placd", b"o-2", msg_id="o-2", confirm=True)
        assert ack is not None and ack.queues == 1 and not ack.duplicate
        assert tc.state == "connected"


async def test_publish_nowait_reports_no_route_through_its_result(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "jobs", "jobs.run")
        good = tc.publish_nowait("jobs.run", b"1", confirm=True)
        bad = tc.publish_nowait("jobs.rnu", b"2", confirm=True)
        also_good = tc.publish_nowait("jobs.run", b"3", confirm=True)
        ack = await good
        assert ack is not None and ack.queues == 1
        with pytest.raises(NoRouteError):
            await bad
        assert bad.done()
        ack = await also_good
        assert ack is not None and ack.queues == 1
        assert (await tc.queue_info("jobs"))["depth"] == 2


async def test_a_confirm_publish_taken_by_a_live_subscriber_is_confirmed(broker) -> None:
    """confirm=True means "tell me it was taken": a subscriber took it, nothing durable holds it."""
    async with connect(broker.url) as tc, connect(broker.url) as watcher:
        sub = await watcher.subscribe("events.>")
        grp = await watcher.subscribe("tasks.*", group="workers")
        assert await tc.publish("events.started", b"e", confirm=True) is None
        assert (await sub.next(timeout=WAIT)).payload == b"e"
        assert await tc.publish_nowait("tasks.a", b"t", confirm=True) is None
        assert (await grp.next(timeout=WAIT)).payload == b"t"
        await sub.close()
        with pytest.raises(NoRouteError):  # nobody listens there any more
            await tc.publish("events.started", b"lost", confirm=True)


async def test_fire_and_forget_to_nobody_stays_silent(broker) -> None:
    async with connect(broker.url) as tc:
        assert await tc.publish("nobody.listens", b"x") is None
        assert await tc.publish("nobody.listens", b"x", confirm=False, msg_id="m-1") is None
        await tc.flush(timeout=WAIT)
        assert tc.last_server_error is None and tc.state == "connected"


async def test_the_wire_answer_is_a_confirm_with_code_22(broker) -> None:
    async with RawClient.open(broker.host, broker.port) as rc:
        await rc.hello()
        await rc.send_wire([F.Op.PUB, [["no.such.subject", b"x", None, None, 7, None]]])
        confirm = await rc.read_until(lambda f: isinstance(f, F.Confirm), WAIT)
        assert isinstance(confirm, F.Confirm)
        [(seq, code, message)] = confirm.items
        assert (seq, code) == (7, 22) and "no.such.subject" in message


def test_the_code_maps_to_no_route_error() -> None:
    err = for_code(int(ErrorCode.NO_ROUTE), "no queue, stream or subscriber for 'x'")
    assert type(err) is NoRouteError and tidings.NoRouteError is NoRouteError
