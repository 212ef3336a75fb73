"""Dead-lettering in one place: the DLQ headers, the moves, DLQ creation, redrive headers.

A queue's poison (max_deliveries), rejected, expired or overflowing
messages move to its dead-letter queue in one transaction with the source
row's deletion; a stream's poison messages are copied there. Either way
the message carries the ``tidings-*`` headers written by
:func:`dead_letter_headers`. A redrive strips them again
(:func:`redriven_headers`). A DLQ named by a declare is created on demand
by :meth:`DeadLetters.ensure`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from tidings.protocol import vocabulary as V

from tidings.broker.durable.settings import DLQ_SUFFIX, QueueConfig, dlq_config, dlq_name
from tidings.broker.durable.store.base import PutMessages, PutQueue, StoredMessage

if TYPE_CHECKING:
    from tidings.broker.durable.context import DeadLetterMoves, DurableContext
    from tidings.broker.durable.queue import QueueActor
    from tidings.broker.durable.store.streams import StreamRow

log = logging.getLogger(__name__)

MAX_LAST_ERROR: Final = 1000  # characters of the last error kept in a dead-lettered message's headers


def dead_letter_headers(headers: dict[str, Any] | None, source: str, reason: str, deliveries: int,
                        error: str | None, now_ms: int, published_ms: int) -> dict[str, Any]:
    """A copy of ``headers`` with the headers every dead-lettered message carries."""
    h = dict(headers or {})
    h[V.H_DLQ_SOURCE] = source
    h[V.H_DLQ_REASON] = reason
    h[V.H_DELIVERY_COUNT] = deliveries
    h[V.H_LAST_ERROR] = (error or "")[:MAX_LAST_ERROR]
    h[V.H_DEAD_LETTERED_AT] = now_ms
    h[V.H_PUBLISHED_AT] = published_ms
    return h


def redriven_headers(headers: dict[str, Any], dlq: str) -> dict[str, Any] | None:
    """``headers`` (a copy, changed in place) without the broker's headers,
    marked as redriven from ``dlq``."""
    for k in [k for k in headers if k.startswith(V.RESERVED_HEADER_PREFIX)]:
        del headers[k]
    headers[V.H_REDRIVEN_FROM] = dlq
    return headers or None


def may_create_on_demand(name: str) -> bool:
    """A queue's declare may create its dead-letter queue ``name`` only if it is DLQ-named."""
    return name.endswith(DLQ_SUFFIX)


class DeadLetters:
    """The dead-letter sink of the durable layer (see context.DeadLetterSink)."""

    def __init__(self, ctx: DurableContext, queues: Mapping[str, QueueActor],
                 start_queue: Callable[[QueueConfig, int], Awaitable[QueueActor]]) -> None:
        self.ctx = ctx
        self.queues = queues
        self._start_queue = start_queue

    async def ensure(self, name: str) -> None:
        """Create the dead-letter queue ``name`` (stored, then started) unless it exists."""
        if name in self.queues:
            return
        dq = dlq_config(name)
        await self.ctx.store.write(PutQueue(dq.name, dq.to_dict(), self.ctx.now_ms()))
        await self._start_queue(dq, 0)

    def from_queue(self, source: str, target: str | None, msgs: list[StoredMessage],
                   reason: str) -> DeadLetterMoves | None:
        dlq = self.queues.get(target or "")
        if dlq is None:
            return None
        ctx = self.ctx
        now = ctx.now_ms()
        moves = []
        for m in msgs:
            h = dead_letter_headers(m.headers, source, reason, m.deliveries, m.last_error, now, m.published_ms)
            h[V.H_ORIGINAL_ID] = m.id
            moves.append((m.id, StoredMessage(dlq.name, ctx.next_id(), m.subject, m.payload, h, m.msg_id,
                                              m.published_ms, now, None, 0, None,
                                              dlq.cfg.priority_of(m.priority))))
        return moves, dlq.on_committed

    def from_stream(self, stream: str, target: str | None, row: StreamRow, reason: str, attempts: int,
                    error: str) -> PutMessages:
        ctx = self.ctx
        dlq = self.queues.get(target or "")
        now = ctx.now_ms()
        h = dead_letter_headers(row.headers, stream, reason, attempts, error, now, row.timestamp_ms)
        h[V.H_STREAM_PARTITION] = row.partition
        h[V.H_STREAM_OFFSET] = row.offset
        if row.key is not None:
            h[V.H_STREAM_KEY] = row.key
        qname = dlq.name if dlq is not None else (target or dlq_name(stream))
        msg = StoredMessage(qname, ctx.next_id(), row.subject, row.payload, h, row.msg_id, row.timestamp_ms,
                            now, None, 0, None, dlq.cfg.priority_of(None) if dlq is not None else None)

        def done(error: Exception | None) -> None:
            if error is None and dlq is not None:
                dlq.on_committed([msg])
            elif error is not None:
                log.error("dead-lettering %s/%d@%d failed: %s", stream, row.partition, row.offset, error)

        return PutMessages([msg], [], done)
