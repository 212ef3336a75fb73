"""OpenTelemetry for the client: producer and consumer spans (the ``otel`` extra).

    tc = await tidings.connect(url, tracing="otel")      # or instrument(tc) on a client
    app = tidings.App(url, tracing="otel")               # the same for an app's client

Once instrumented, a client records

* a span ``publish <subject>`` of kind PRODUCER around each ``publish`` (until the
  broker's confirm for a durable publish; ``publish_nowait``'s ends once it is
  queued), and injects its context into the message's headers through the global
  OpenTelemetry propagator (W3C ``traceparent``/``tracestate`` by default);
* a span ``process <subject>`` of kind CONSUMER around each handler a Worker or
  an App runs for it, a child of the context extracted from the message (the
  producer's span), and current while the handler runs: its publishes continue
  the trace.

Attributes follow OpenTelemetry's messaging semantic conventions:
``messaging.system`` = ``tidings``, ``messaging.destination.name`` (the subject),
``messaging.operation.type`` (``send`` / ``process``), ``messaging.operation.name``
and the older ``messaging.operation`` (``publish`` / ``process``),
``messaging.message.id`` (the publisher's ``msg_id``, when there is one),
``messaging.message.body.size``, and ``messaging.consumer.group.name`` (the queue,
stream group or queue group a handler consumes from). A publish made outside any
OpenTelemetry span but inside a tidings trace context (:mod:`tidings.client.tracing`)
continues that one; a ``traceparent`` the caller set is the producer span's parent.

Instrumenting wraps this client's ``publish`` and ``publish_nowait`` (as
OpenTelemetry's instrumentations do) and sets ``client.tracing``; a client that is
not instrumented never imports opentelemetry and pays nothing for it.
:func:`uninstrument` undoes it. Needs ``pip install 'tidings[otel]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Protocol

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind

from tidings.client.codec import UNSET, Payload, with_json
from tidings.client.tracing import CURRENT, PROPAGATION, Propagation, TraceContext

SYSTEM: Final = "tidings"  # messaging.system
INSTRUMENTATION: Final = "tidings.client"  # the tracer's (instrumentation scope's) name


class Instrumentable(Protocol):
    """What :func:`instrument` needs: a Client."""

    tracing: Propagation


class _HeaderGetter(Getter[dict[str, Any]]):
    """Reads str header values only (a header may also be an int or bytes)."""

    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return list(carrier)


_GETTER: Final = _HeaderGetter()


def _body_size(payload: Any) -> int | None:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode())
    return None


class OtelTracing(Propagation):
    """``client.tracing`` of an instrumented client: OpenTelemetry spans (module docstring)."""

    name = "otel"

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)

    def _parent(self, headers: dict[str, Any] | None) -> Context | None:
        """The producer span's parent: the caller's traceparent, else the current OpenTelemetry
        span, else the tidings trace context a handler runs in, else none (a new trace)."""
        if headers and isinstance(headers.get("traceparent"), str):
            return propagate.extract(headers, getter=_GETTER)
        if trace.get_current_span().get_span_context().is_valid:
            return None
        ctx = CURRENT.get()
        if ctx is None:
            return None
        carrier = {"traceparent": ctx.traceparent}
        if ctx.tracestate is not None:
            carrier["tracestate"] = ctx.tracestate
        return propagate.extract(carrier, getter=_GETTER)

    @contextmanager
    def publishing(self, subject: str, payload: Any, headers: Any, msg_id: Any) -> Iterator[Any]:
        """A PRODUCER span around one publish; yields the headers to send (a copy with the
        span's context injected; a value that is not a dict as it is, for publish to refuse)."""
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": subject,
            "messaging.operation.type": "send", "messaging.operation.name": "publish",
            "messaging.operation": "publish",
        }
        if msg_id is not None:
            attributes["messaging.message.id"] = str(msg_id)
        size = _body_size(payload)
        if size is not None:
            attributes["messaging.message.body.size"] = size
        valid = headers is None or isinstance(headers, dict)
        parent = self._parent(headers if valid else None)
        with self.tracer.start_as_current_span(f"publish {subject}", context=parent, kind=SpanKind.PRODUCER,
                                               attributes=attributes):
            if not valid:
                yield headers
                return
            carrier = dict(headers) if headers else {}
            propagate.inject(carrier)
            yield carrier or None

    @contextmanager
    def processing(self, msg: Any, consumer: str | None = None) -> Iterator[Any]:
        """A CONSUMER span, child of the message's context, current around its handler."""
        headers = msg.headers if isinstance(msg.headers, dict) else {}
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM, "messaging.destination.name": msg.subject,
            "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.operation": "process", "messaging.message.body.size": len(msg.payload),
        }
        msg_id = getattr(msg, "msg_id", None)
        if msg_id is not None:
            attributes["messaging.message.id"] = str(msg_id)
        if consumer is not None:
            attributes["messaging.consumer.group.name"] = consumer
        parent = propagate.extract(headers, getter=_GETTER)
        with self.tracer.start_as_current_span(f"process {msg.subject}", context=parent,
                                               kind=SpanKind.CONSUMER, attributes=attributes) as span:
            sc = span.get_span_context()
            if not sc.is_valid:  # no SDK (a no-op tracer): propagate as without OpenTelemetry
                with PROPAGATION.processing(msg, consumer):
                    yield span
                return
            # A client that is not instrumented, publishing in this handler, continues this span too.
            state = headers.get("tracestate")
            ctx = TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", f"{int(sc.trace_flags):02x}",
                               state if isinstance(state, str) else None)
            token = CURRENT.set(ctx)
            try:
                yield span
            finally:
                CURRENT.reset(token)


def instrument(client: Instrumentable, *, tracer_provider: trace.TracerProvider | None = None) -> None:
    """Record OpenTelemetry spans for ``client`` (see the module docstring): its publishes,
    and the handlers Workers and Apps run on it. ``tracer_provider`` defaults to the global
    one. Instrumenting twice changes nothing."""
    if isinstance(client.tracing, OtelTracing):
        return
    tracing = OtelTracing(tracer_provider)
    publish = getattr(client, "publish")
    publish_nowait = getattr(client, "publish_nowait")

    async def traced_publish(subject: str, payload: Payload = b"", *, headers: dict[str, Any] | None = None,
                             json: Any = UNSET, **options: Any) -> Any:
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        with tracing.publishing(subject, payload, headers, options.get("msg_id")) as sent:
            return await publish(subject, payload, headers=sent, **options)

    def traced_publish_nowait(subject: str, payload: Payload = b"", *, headers: dict[str, Any] | None = None,
                              json: Any = UNSET, **options: Any) -> Any:
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        with tracing.publishing(subject, payload, headers, options.get("msg_id")) as sent:
            return publish_nowait(subject, payload, headers=sent, **options)

    traced_publish.__doc__ = publish.__doc__
    traced_publish_nowait.__doc__ = publish_nowait.__doc__
    setattr(client, "publish", traced_publish)
    setattr(client, "publish_nowait", traced_publish_nowait)
    client.tracing = tracing


def uninstrument(client: Instrumentable) -> None:
    """Stop recording spans for ``client``: its publish methods and tracing are the plain ones again."""
    if not isinstance(client.tracing, OtelTracing):
        return
    for name in ("publish", "publish_nowait"):
        vars(client).pop(name, None)
    client.tracing = PROPAGATION
