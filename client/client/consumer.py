"""Queue consumers: deliveries with ack/nack/reject/in_progress, batched acks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from tidings.protocol import frames as F
from tidings.protocol.frames import D_META, SM_GENERATION, SM_KEY, SM_OFFSET, SM_PARTITION
from tidings.protocol.numbers import MAX_DURATION_MS

from tidings.client.codec import Body
from tidings.client.errors import StaleDeliveryError, TidingsError, for_code
from tidings.client.events import CloudEvent, Upcasters, event_of
from tidings.client.inbox import Inbox
from tidings.client.units import seconds_to_ms

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class ConsumerPort:
    """What a consumer may ask of its connection: raise if it is closed,
    buffer an ack for the next ACK frame, or send one ACK and await the
    broker's per-item codes."""

    check_open: Callable[[], None]
    queue_ack: Callable[[int, list[Any]], None]
    settle_now: Callable[[int, list[Any]], Awaitable[list[int]]]
    upcasters: Upcasters | None = None  # what Delivery.event lifts old event versions with


class Delivery(Body):
    """One delivery of a durable message to this consumer.

    ``delivery_id`` identifies this delivery (not the message);
    ``message_id`` is the broker's id of the stored message; ``msg_id`` the
    publisher's de-duplication id, if any. ``delivery_count`` counts every
    delivery of the message so far, this one included. ``subject``,
    ``payload``, ``headers`` and the payload accessors ``data``, ``text()``,
    ``json()``, ``model(T)`` and ``content_type`` are those of a pub/sub
    :class:`~tidings.client.message.Message` (:class:`Body`).
    """

    __slots__ = ("delivery_id", "subject", "payload", "headers", "delivery_count", "published_ms",
                 "message_id", "msg_id", "_consumer", "settled", "_cid")

    delivery_id: int
    subject: str
    payload: bytes
    headers: dict[str, Any] | None
    delivery_count: int
    published_ms: int

    def __init__(self, item: list[Any], consumer: QueueConsumer[Any]) -> None:
        self._cid = consumer.cid  # the registration it came through: acks go there (stale after a reconnect)
        # The codec passed only items of exactly frames.DELIVER_FIELDS (the D_* positions);
        # unpacking them is cheaper per delivery than indexing by those constants.
        (self.delivery_id, self.subject, self.payload, self.headers, self.delivery_count, self.published_ms,
         meta) = item
        meta = meta or {}
        self.message_id: int | None = meta.get("id")
        self.msg_id: str | None = meta.get("msg_id")
        self._consumer = consumer
        self.settled = False

    def __repr__(self) -> str:
        return (f"Delivery(subject={self.subject!r}, delivery_id={self.delivery_id}, "
                f"delivery_count={self.delivery_count}, payload=<{len(self.payload)} bytes>)")

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def event(self) -> CloudEvent | None:
        """The CloudEvent this delivery carries, decoded and upcast (see Message.event)."""
        return event_of(self.headers, self.payload, self._consumer._port.upcasters)

    async def ack(self, *, wait: bool = False) -> None:
        """Acknowledge: the broker deletes the message. Returns once buffered
        (acks travel in batches); with ``wait=True`` returns once the broker
        committed it (in a stream group: once the committed offset covering
        it is stored) and raises StaleDeliveryError if this delivery is no
        longer ours (its ack deadline passed and it went to another consumer),
        StorageError/StorageFullError if the commit failed (the message will
        be delivered again)."""
        await self._settle(F.AckAction.ACK, None, wait)

    async def nack(self, delay: float | None = None, *, error: str | None = None, wait: bool = False) -> None:
        """Return the message for another attempt after ``delay`` seconds, or
        after the queue's backoff for this attempt when ``delay`` is None. After
        max_deliveries the broker moves it to the dead-letter queue instead.
        ``error`` (why it failed; the first ``MAX_ERROR_TEXT`` characters) is
        kept with the message and shown in its ``tidings-last-error`` header
        if it is dead-lettered."""
        arg: Any = None if delay is None else seconds_to_ms(delay, "delay", 0, MAX_DURATION_MS)
        if error:
            arg = {"delay": arg, "error": error[:F.MAX_ERROR_TEXT]}
        await self._settle(F.AckAction.NACK, arg, wait)

    async def reject(self, reason: str | None = None, *, wait: bool = False) -> None:
        """Send the message straight to the dead-letter queue with ``reason``
        (its ``tidings-last-error`` header)."""
        await self._settle(F.AckAction.REJECT, reason[:F.MAX_ERROR_TEXT] if reason else None, wait)

    async def in_progress(self, *, wait: bool = False) -> None:
        """Extend the ack deadline: the handler is still working on it."""
        await self._consumer._settle(self, F.AckAction.IN_PROGRESS, None, wait)

    async def _settle(self, action: int, arg: Any, wait: bool) -> None:
        if self.settled:
            raise TidingsError("this delivery was already settled")
        self.settled = True
        await self._consumer._settle(self, action, arg, wait)


class StreamMessage(Delivery):
    """A message from a stream: ``partition``, ``offset`` and ``key`` say
    where it sits; ``generation`` is the group generation it was delivered
    under (0 for readers outside a group). In a group, ``ack()`` lets the
    committed offset advance past it; readers need no acks."""

    __slots__ = ("partition", "offset", "key", "generation", "timestamp_ms")

    def __init__(self, item: list[Any], consumer: QueueConsumer[Any]) -> None:
        self._cid = consumer.cid
        (self.delivery_id, self.subject, self.payload, self.headers, self.delivery_count, self.published_ms,
         meta) = item
        self.timestamp_ms = self.published_ms
        meta = meta or [0, 0, None, 0]
        self.partition: int = meta[SM_PARTITION]
        self.offset: int = meta[SM_OFFSET]
        self.key: str | None = meta[SM_KEY]
        self.generation: int = meta[SM_GENERATION]
        self.message_id = None
        self.msg_id = None
        self._consumer = consumer
        self.settled = False

    def __repr__(self) -> str:
        return (f"StreamMessage(subject={self.subject!r}, partition={self.partition}, offset={self.offset}, "
                f"key={self.key!r}, delivery_count={self.delivery_count})")


# What a consumer hands out: Delivery for queues, StreamMessage for streams.
DeliveryT = TypeVar("DeliveryT", bound=Delivery)


class QueueConsumer(Inbox[DeliveryT]):
    """Async iterator of :class:`Delivery` (:class:`StreamMessage` on a stream);
    use via ``async with tc.consume(queue)``.

    The broker never has more than ``prefetch`` unsettled deliveries out to
    this consumer, so the local buffer is bounded by it. Leaving the
    ``async with`` block stops the consumer; the broker returns its
    unsettled messages to the queue at once.
    """

    def __init__(self, port: ConsumerPort, cid: int, queue: str, prefetch: int, kind: type[DeliveryT]) -> None:
        super().__init__()
        self._what = f"delivery from {queue!r}"
        self._port = port
        self._kind = kind
        self.assignment: tuple[int, list[int]] = (0, [])  # (generation, partitions) in a stream group
        self.args: dict[str, Any] = {}  # the CONSUME arguments, re-sent after a reconnect
        self._next_offset: int | None = None
        self.info: Any = None  # what the broker answered to CONSUME
        self.cid = cid
        self.queue = queue
        self.prefetch = prefetch
        self.stale_acks = 0

    def _push(self, items: list[list[Any]]) -> None:
        if self._kind is StreamMessage and items:
            self._next_offset = items[-1][D_META][SM_OFFSET] + 1  # readers resume after what they received
        self._q.extend(items)
        self._wake()

    def _connection_lost(self) -> None:
        """Unsettled deliveries are void (the broker redelivers them); a reader
        keeps what it has and resumes after it."""
        if not self._is_reader():
            self._q.clear()

    def _is_reader(self) -> bool:
        return "stream" in self.args and self.args.get("group") is None

    def _resume_args(self) -> dict[str, Any]:
        args = dict(self.args)
        if self._is_reader() and self._next_offset is not None:
            args["start"] = self._next_offset
            args["out_of_range"] = "earliest"
        return args

    def _wrap(self, raw: list[Any]) -> DeliveryT:
        return self._kind(raw, self)

    async def _settle(self, d: Delivery, action: int, arg: Any, wait: bool) -> None:
        port = self._port
        port.check_open()
        item = [d.delivery_id, int(action), arg]
        if d._cid != self.cid:
            # Delivered before a reconnect: the broker already returned it for redelivery.
            if wait:
                raise StaleDeliveryError(f"delivery {d.delivery_id} was made on a connection that was lost")
            return
        if not wait:
            port.queue_ack(self.cid, item)
            return
        codes = await port.settle_now(self.cid, item)
        if codes and codes[0]:
            raise for_code(codes[0], f"delivery {d.delivery_id} of {self.queue!r} was not settled")

    def _stale(self, n: int) -> None:
        self.stale_acks += n
        log.warning("%d acks on %r were refused as stale (ack deadline passed?)", n, self.queue)
