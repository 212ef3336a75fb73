"""OpenTelemetry producer/consumer spans (client/otel.py, the ``otel`` extra), checked
with the SDK's in-memory exporter against a real broker: a publish records a
PRODUCER span and sends its context; a Worker's or an App's handler runs in a
CONSUMER span whose parent is that producer span; what the handler publishes
continues the trace.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from queuetools import WAIT, declare

pytest.importorskip("opentelemetry.sdk",
                    reason="opentelemetry-sdk is in the test extra: pip install -e '.[test]'")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import tidings
from tidings.client import Worker, connect
from tidings.client.otel import OtelTracing, instrument, uninstrument
from tidings.client.tracing import TraceContext


@pytest.fixture
def spans() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def _sent_by(msg: Any) -> TraceContext:
    ctx = TraceContext.from_headers(msg.headers)
    assert ctx is not None, msg.headers
    return ctx


async def test_publish_records_a_producer_span_and_sends_its_context(broker, spans) -> None:
    provider, exporter = spans
    async with connect(broker.url) as tc:
        instrument(tc, tracer_provider=provider)
        sub = await tc.subscribe("op.>")
        await tc.publish("op.a", b"12345", msg_id="m-1", headers={"k": "v"})
        with anyio.fail_after(WAIT):
            msg = await sub.next()
    span = _named(exporter, "publish op.a")
    assert span.kind is SpanKind.PRODUCER and span.parent is None
    attrs = dict(span.attributes or {})
    assert attrs == {"messaging.system": "tidings", "messaging.destination.name": "op.a",
                     "messaging.operation.type": "send", "messaging.operation.name": "publish",
                     "messaging.operation": "publish", "messaging.message.id": "m-1",
                     "messaging.message.body.size": 5}
    sent = _sent_by(msg)
    assert (sent.trace_id, sent.span_id) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
    assert msg.headers["k"] == "v"


async def test_a_publish_inside_a_span_is_its_child(broker, spans) -> None:
    provider, exporter = spans
    async with connect(broker.url) as tc:
        instrument(tc, tracer_provider=provider)
        with provider.get_tracer("test").start_as_current_span("checkout") as outer:
            await tc.publish("oc.a", b"")
    span = _named(exporter, "publish oc.a")
    assert span.parent is not None and span.parent.span_id == outer.get_span_context().span_id
    assert span.context.trace_id == outer.get_span_context().trace_id


async def test_worker_handler_runs_in_a_consumer_span_and_continues_the_trace(broker, spans) -> None:
    provider, exporter = spans
    async with connect(broker.url) as tc:
        instrument(tc, tracer_provider=provider)
        await declare(tc, "ow")
        out = await tc.subscribe("ow-out.>")
        await tc.publish("ow.a", b"order", msg_id="o-1")

        async def handle(d: Any) -> None:
            assert trace.get_current_span().get_span_context().is_valid
            await tc.publish("ow-out.a", b"done")

        worker = Worker(tc, handle, queue="ow")
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(WAIT):
                msg = await out.next()
            tg.cancel_scope.cancel()
    producer = _named(exporter, "publish ow.a")
    consumer = _named(exporter, "process ow.a")
    follow = _named(exporter, "publish ow-out.a")
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert follow.parent is not None and follow.parent.span_id == consumer.context.span_id
    assert producer.context.trace_id == consumer.context.trace_id == follow.context.trace_id
    assert dict(consumer.attributes or {}) == {
        "messaging.system": "tidings", "messaging.destination.name": "ow.a",
        "messaging.operation.type": "process", "messaging.operation.name": "process",
        "messaging.operation": "process", "messaging.message.body.size": 5, "messaging.message.id": "o-1",
        "messaging.consumer.group.name": "ow"}
    assert _sent_by(msg).span_id == f"{follow.context.span_id:016x}"


async def test_a_failing_handler_marks_its_consumer_span(broker, spans) -> None:
    provider, exporter = spans
    async with connect(broker.url) as tc:
        instrument(tc, tracer_provider=provider)
        await declare(tc, "of", max_deliveries=1)
        await tc.publish("of.a", b"")

        async def handle(d: Any) -> None:
            raise ValueError("no")

        worker = Worker(tc, handle, queue="of", failure_threshold=100)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            async with tc.consume("of.dlq") as dead:
                await (await dead.next(timeout=WAIT)).ack()
            tg.cancel_scope.cancel()
    span = _named(exporter, "process of.a")
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


async def test_app_handlers_run_in_consumer_spans(broker, spans) -> None:
    provider, exporter = spans
    app = tidings.App(broker.url)
    ready = anyio.Event()

    @app.on_startup
    async def setup() -> None:
        instrument(app.client, tracer_provider=provider)
        await declare(app.client, "oa")
        ready.set()

    @app.consumer("oa")
    async def consume(d: Any) -> None:
        await app.client.publish("oa-out.x", b"")

    async with connect(broker.url) as tc:
        instrument(tc, tracer_provider=provider)
        out = await tc.subscribe("oa-out.>")
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.run)
            with anyio.fail_after(WAIT):
                await ready.wait()
            await tc.publish("oa.a", b"")
            with anyio.fail_after(WAIT):
                await out.next()
            app.stop()
    producer, consumer = _named(exporter, "publish oa.a"), _named(exporter, "process oa.a")
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert _named(exporter, "publish oa-out.x").context.trace_id == producer.context.trace_id


async def test_the_connect_option_and_uninstrument(broker, spans) -> None:
    provider, exporter = spans
    async with connect(broker.url, tracing="otel") as tc:
        assert isinstance(tc.tracing, OtelTracing)
        uninstrument(tc)
        assert not isinstance(tc.tracing, OtelTracing) and "publish" not in vars(tc)
        instrument(tc, tracer_provider=provider)
        instrument(tc, tracer_provider=provider)  # twice: once
        await tc.publish("ou.a", b"")
    assert [s.name for s in exporter.get_finished_spans()] == ["publish ou.a"]
    with pytest.raises(ValueError, match="tracing"):
        tidings.Client(broker.url, tracing="zipkin")
