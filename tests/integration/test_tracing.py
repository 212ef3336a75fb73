"""Trace context across hops (issue 12.5): W3C ``traceparent``/``tracestate`` pass
unchanged through pub/sub, queues, streams, dead-letter moves and redrive; a
Worker or an App runs each handler in its message's trace context, so what the
handler publishes continues the trace, without OpenTelemetry (client/tracing.py)
and with it (client/otel.py: spans checked with the SDK's in-memory exporter).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import pytest
from queuetools import WAIT, declare, headers_of

import tidings
from tidings.client import Worker, connect
from tidings.client.tracing import TraceContext, current_trace, use_trace

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TP = f"00-{TRACE_ID}-{PARENT}-01"
TS = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
TRACE = {"traceparent": TP, "tracestate": TS}


def _trace_of(d: Any) -> tuple[Any, Any]:
    h = headers_of(d)
    return h.get("traceparent"), h.get("tracestate")


# ------------------------------------------------------------ the W3C format


@pytest.mark.parametrize("value", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-adds",  # a later version
])
def test_valid_traceparents_parse(value: str) -> None:
    ctx = TraceContext.parse(value, "a=1")
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.tracestate) == (TRACE_ID, PARENT, "a=1")


@pytest.mark.parametrize("value", [
    None, 42, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has 4 fields
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
])
def test_malformed_traceparents_are_ignored(value: Any) -> None:
    assert TraceContext.parse(value) is None
    assert TraceContext.from_headers({"traceparent": value}) is None


def test_a_child_keeps_the_trace_and_the_state_with_a_new_parent() -> None:
    ctx = TraceContext.parse(TP, TS)
    assert ctx is not None
    mine = {"a": "1"}
    out = ctx.child_headers(mine)
    child = TraceContext.from_headers(out)
    assert child is not None and child.trace_id == TRACE_ID and child.span_id != PARENT
    assert (child.flags, out["tracestate"], out["a"]) == ("01", TS, "1")
    assert mine == {"a": "1"}  # the caller's dict is never changed


# ------------------------------------------------- the broker passes them through


async def test_trace_headers_pass_pubsub_queue_and_stream_unchanged(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "tq")
        await tc.declare_stream("ts", partitions=1, bind=["ts.>"])
        sub = await tc.subscribe("tp.>")
        await tc.publish("tp.a", b"x", headers=TRACE)
        await tc.publish("tq.a", b"x", headers=TRACE)
        await tc.publish("ts.a", b"x", headers=TRACE)
        with anyio.fail_after(WAIT):
            assert _trace_of(await sub.next()) == (TP, TS)
        async with tc.consume("tq") as q:
            d = await q.next(timeout=WAIT)
            assert _trace_of(d) == (TP, TS)
            await d.ack()
        async with tc.stream_consume("ts", group="g", start="earliest") as s:
            m = await s.next(timeout=WAIT)
            assert _trace_of(m) == (TP, TS)
            await m.ack()
        with anyio.fail_after(WAIT):
            async for m in tc.read_stream("ts", 0, "earliest"):
                assert _trace_of(m) == (TP, TS)
                break


async def test_trace_headers_survive_a_dead_letter_move_and_a_redrive(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "td", max_deliveries=1)
        await tc.publish("td.a", b"x", headers=TRACE)
        async with tc.consume("td") as q:
            await (await q.next(timeout=WAIT)).nack(error="boom")  # max_deliveries exceeded: to td.dlq
        async with tc.consume("td.dlq") as dead:
            d = await dead.next(timeout=WAIT)
            assert headers_of(d)["tidings-dlq-reason"] == "max_deliveries"
            assert _trace_of(d) == (TP, TS)
        # (leaving the block handed the unsettled delivery back to the DLQ)
        assert await tc.dlq_redrive("td.dlq") == 1
        async with tc.consume("td") as q:
            d = await q.next(timeout=WAIT)
            h = headers_of(d)
            assert h["tidings-redriven-from"] == "td.dlq" and "tidings-dlq-reason" not in h
            assert _trace_of(d) == (TP, TS)
            await d.ack()


# --------------------------------------------- handlers continue the trace (W3C)


async def test_a_worker_handler_publish_continues_the_trace(broker) -> None:
    async with connect(broker.url) as tc:
        await declare(tc, "tw")
        out = await tc.subscribe("tw-out.>")
        await tc.publish("tw.a", b"in", headers=TRACE)
        await tc.publish("tw.b", b"no trace")
        seen: list[Any] = []

        async def handle(d: Any) -> None:
            seen.append(current_trace())
            await tc.publish("tw-out." + d.subject[-1], b"out")

        worker = Worker(tc, handle, queue="tw")
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                got = {m.subject: m async for m in _take(out, 2)}
            tg.cancel_scope.cancel()
        traced = TraceContext.from_headers(got["tw-out.a"].headers)
        assert traced is not None and traced.trace_id == TRACE_ID and traced.span_id != PARENT
        assert got["tw-out.a"].headers["tracestate"] == TS
        assert not got["tw-out.b"].headers  # no trace in, none made up
        assert current_trace() is None  # the context was the handler's only


async def test_a_stream_group_worker_continues_the_trace(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("tsw", partitions=1, bind=["tsw.>"])
        out = await tc.subscribe("tsw-out.>")
        await tc.publish("tsw.a", b"", headers=TRACE, key="k")

        async def handle(m: Any) -> None:
            await tc.publish("tsw-out.a", b"")

        worker = Worker(tc, handle, stream="tsw", group="g")
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                msg = await out.next()
            tg.cancel_scope.cancel()
        ctx = TraceContext.from_headers(msg.headers)
        assert ctx is not None and ctx.trace_id == TRACE_ID and ctx.span_id != PARENT


async def test_app_handlers_continue_the_trace(broker) -> None:
    app = tidings.App(broker.url)
    ready = anyio.Event()

    @app.on_startup
    async def setup() -> None:
        await declare(app.client, "ta")
        ready.set()

    @app.consumer("ta")
    async def consume(d: Any) -> None:
        await app.client.publish("ta-out.consumer", b"")

    @app.subscriber("ta-sub.>")
    async def relay(msg: tidings.Message) -> None:
        await app.client.publish("ta-out.subscriber", b"")

    @app.responder("ta-svc.echo")
    async def echo(msg: tidings.Message) -> str:
        return "ok"

    async with connect(broker.url) as tc:
        out = await tc.subscribe("ta-out.>")
        got: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.run)
            with anyio.fail_after(WAIT):
                await ready.wait()
            await tc.publish("ta.a", b"", headers=TRACE, confirm=True)
            for _ in range(100):  # pub/sub: resent until the app's subscription is there (bounded)
                if "ta-out.subscriber" in got:
                    break
                await tc.publish("ta-sub.x", b"", headers=TRACE)
                with anyio.move_on_after(0.2):
                    while "ta-out.subscriber" not in got:
                        m = await out.next()
                        got[m.subject] = m
            with anyio.fail_after(WAIT):
                while "ta-out.consumer" not in got:
                    m = await out.next()
                    got[m.subject] = m
            with anyio.fail_after(WAIT):
                while True:  # the responder is there once it answers (bounded)
                    try:
                        got["reply"] = await tc.request("ta-svc.echo", b"", headers=TRACE, timeout=WAIT)
                        break
                    except tidings.NoRespondersError:
                        await anyio.sleep(0.02)
            app.stop()
    for subject in ("ta-out.consumer", "ta-out.subscriber", "reply"):
        ctx = TraceContext.from_headers(got[subject].headers)
        assert ctx is not None and ctx.trace_id == TRACE_ID and ctx.span_id != PARENT, subject


async def test_a_caller_traceparent_wins_and_use_trace_starts_one(broker) -> None:
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("tu.>")
        started = TraceContext.new()
        with use_trace(started):
            await tc.publish("tu.a", b"", headers=TRACE)  # the caller's own: unchanged
            await tc.publish("tu.b", b"")
        with anyio.fail_after(WAIT):
            a, b = await sub.next(), await sub.next()
        assert _trace_of(a) == (TP, TS)
        got = TraceContext.from_headers(b.headers)
        assert got is not None and got.trace_id == started.trace_id and got.span_id != started.span_id


def test_the_client_does_not_import_opentelemetry() -> None:
    code = ("import sys, tidings.client, tidings.client.tracing; c = tidings.client.Client(); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "[]"


async def _take(sub: Any, n: int) -> Any:
    for _ in range(n):
        yield await sub.next()
