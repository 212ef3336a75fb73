"""Trace context across hops: W3C ``traceparent``/``tracestate``, carried by the client itself.

The broker passes both headers through unchanged (pub/sub, queues, streams,
dead-letter moves, redrive). The client continues a trace across a handler:

* a :class:`~tidings.client.worker.Worker` or :class:`~tidings.client.app.App`
  runs each handler in its message's trace context (:meth:`Propagation.processing`
  sets :data:`CURRENT` from the message's headers, and resets it after);
* a publish made while :data:`CURRENT` is set and without a ``traceparent`` of
  its own gets one with the same trace id and a new parent (span) id, and the
  ``tracestate`` unchanged (Client._message: one ContextVar.get per publish).

A malformed ``traceparent`` (not ``version-traceid-spanid-flags`` in lowercase
hex, an all-zero id, version ``ff``) is ignored: no context, nothing continued.
This needs no OpenTelemetry; with the ``otel`` extra, ``connect(tracing="otel")``
(:mod:`tidings.client.otel`) makes real producer and consumer spans instead.
"""

from __future__ import annotations

import random
import re
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Final

from tidings.protocol.vocabulary import TRACEPARENT, TRACESTATE

# version 2 hex, trace id 32, parent id 16, flags 2; a later version may append "-..." (W3C 3.2.4)
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?",
                                 re.DOTALL)
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One W3C trace context: ``trace_id`` (32 hex), ``span_id`` (16 hex: the
    parent of what continues it), ``flags`` (2 hex) and ``tracestate`` (as
    received, or None)."""

    trace_id: str
    span_id: str
    flags: str = "01"
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    @classmethod
    def parse(cls, traceparent: Any, tracestate: Any = None) -> TraceContext | None:
        """The context a ``traceparent`` value names, or None if it is malformed
        (W3C trace-context: a version 00 value is exactly 55 characters; a later
        version's extra fields are ignored; ``ff``, all-zero ids are invalid).
        A ``tracestate`` that is not a str is dropped."""
        if type(traceparent) is not str:
            return None
        m = _TRACEPARENT.fullmatch(traceparent)
        if m is None:
            return None
        version, trace_id, span_id, flags, rest = m.groups()
        if version == "ff" or (version == "00" and rest is not None):
            return None
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return cls(trace_id, span_id, flags, tracestate if type(tracestate) is str else None)

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None) -> TraceContext | None:
        """The context a message's headers carry, or None (no or a malformed ``traceparent``)."""
        if not headers:
            return None
        value = headers.get(TRACEPARENT)
        if value is None:
            return None
        return cls.parse(value, headers.get(TRACESTATE))

    @classmethod
    def new(cls, *, sampled: bool = True) -> TraceContext:
        """A new trace (random ids): ``with use_trace(TraceContext.new()):`` starts one by hand."""
        return cls(f"{_nonzero(128):032x}", new_span_id(), "01" if sampled else "00")

    def child(self) -> TraceContext:
        """The same trace, a new span id: what a publish made in this context carries."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.tracestate)

    def child_headers(self, headers: dict[str, Any] | None) -> dict[str, Any]:
        """A copy of ``headers`` with a child ``traceparent`` (and ``tracestate`` when there is
        one). The caller's dict is never changed."""
        out = dict(headers) if headers else {}
        out[TRACEPARENT] = f"00-{self.trace_id}-{new_span_id()}-{self.flags}"
        if self.tracestate is not None:
            out[TRACESTATE] = self.tracestate
        return out


def _nonzero(bits: int) -> int:
    # W3C: an all-zero id is invalid. random (not secrets): ids need to be unique, not secret,
    # and getrandbits is what OpenTelemetry's SDK uses too.
    while True:
        value = random.getrandbits(bits)
        if value:
            return value


def new_span_id() -> str:
    """A random, non-zero 64-bit span id in 16 lowercase hex digits."""
    return f"{_nonzero(64):016x}"


# The trace context the running code continues: set around each handler by a Worker or an App
# (or by hand with use_trace), read by every publish. A ContextVar: each task has its own.
CURRENT: ContextVar[TraceContext | None] = ContextVar("tidings_trace", default=None)


def current_trace() -> TraceContext | None:
    """The trace context publishes continue here, or None."""
    return CURRENT.get()


class use_trace:
    """``with use_trace(ctx):`` publishes made inside continue ``ctx`` (None: no trace);
    the previous context is restored on leaving."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: TraceContext | None) -> None:
        self._ctx = ctx
        self._token: Token[TraceContext | None] | None = None

    def __enter__(self) -> TraceContext | None:
        self._token = CURRENT.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            CURRENT.reset(self._token)
            self._token = None


class _Nothing:
    """The context of a message without a trace: costs nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING: Final = _Nothing()


class Propagation:
    """How a client traces (``Client.tracing``): this base class propagates the W3C
    context itself and records no spans; :class:`tidings.client.otel.OtelTracing`
    adds OpenTelemetry spans."""

    name = "w3c"

    def processing(self, msg: Any, consumer: str | None = None) -> AbstractContextManager[Any]:
        """A context manager to run a handler of ``msg`` (a Message, Delivery or
        StreamMessage) in: its trace context when its headers carry one.
        ``consumer`` names the queue, stream group or subscription (for spans)."""
        ctx = TraceContext.from_headers(msg.headers)
        if ctx is None:
            return _NOTHING
        return use_trace(ctx)


PROPAGATION: Final = Propagation()  # stateless: every client without OpenTelemetry shares it
