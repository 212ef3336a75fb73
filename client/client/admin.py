"""Queue, dead-letter and stream operations: the durable API.

Composed onto the client the way nats.py composes JetStream onto its
connection: :class:`Durable` holds a :class:`DurablePort`, the three things
it may ask of the connection (make a CALL and await the answer, open a
consumer, close one), and nothing else. ``Client`` keeps one as
``tc.durable`` and forwards its methods (``tc.declare_queue(...)`` is
``tc.durable.declare_queue(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncGenerator, Awaitable, Callable, Generic, Protocol, Sequence

import anyio

from tidings.client.consumer import Delivery, DeliveryT, QueueConsumer, StreamMessage


class ConsumerOpener(Protocol):
    """Register a consumer of ``kind`` deliveries on the connection and CONSUME."""

    def __call__(self, name: str, args: dict[str, Any], kind: type[DeliveryT]) -> Awaitable[QueueConsumer[DeliveryT]]:
        ...


@dataclass(frozen=True, slots=True)
class DurablePort:
    """What the durable API may ask of its connection."""

    call: Callable[[str, dict[str, Any]], Awaitable[Any]]  # a named CALL; returns the broker's result
    open_consumer: ConsumerOpener
    close_consumer: Callable[[QueueConsumer[Any]], Awaitable[None]]


class ConsumeContext(Generic[DeliveryT]):
    """``async with tc.consume(queue, prefetch=N) as deliveries:`` (and the
    stream forms): starts the consumer on entry, stops it on exit."""

    def __init__(self, port: DurablePort, name: str, args: dict[str, Any], kind: type[DeliveryT]) -> None:
        self._port = port
        self._name = name
        self._args = args
        self._kind = kind
        self._consumer: QueueConsumer[DeliveryT] | None = None

    async def __aenter__(self) -> QueueConsumer[DeliveryT]:
        self._consumer = await self._port.open_consumer(self._name, self._args, self._kind)
        return self._consumer

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            with anyio.CancelScope(shield=True):
                await self._port.close_consumer(self._consumer)


class Durable:
    """Durable-object operations; every one is a CALL or a consumer on the connection."""

    def __init__(self, port: DurablePort) -> None:
        self._port = port

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        return await self._port.call(method, args)

    async def declare_queue(self, name: str, *, bind: Sequence[str | dict[str, Any]] = (),
                            **settings: Any) -> dict[str, Any]:
        """Create a durable queue (or confirm an identical one exists).

        ``bind``: subject patterns whose publishes are stored in the queue; an
        entry may be ``{"subject": pattern, "match": filter}`` to store only the
        messages the content filter matches (docs/CLIENT.md, "Content filters").
        Settings (all optional): ack_deadline (s), max_deliveries (0 =
        unlimited; default 5), backoff_initial, backoff_multiplier,
        backoff_max, backoff_jitter, backoff_schedule (list of s),
        dead_letter (default "<name>.dlq"), message_ttl (s),
        dead_letter_expired, max_length, overflow ("reject" or
        "dead_letter_oldest"). Raises ConflictError if the queue exists with
        different settings. Returns the queue's info.
        """
        info: dict[str, Any] = await self._call("queue.declare", {"name": name, "bind": list(bind), **settings})
        return info

    async def delete_queue(self, name: str, *, keep_dlq: bool = False) -> dict[str, Any]:
        """Delete a queue and its messages, and its dead-letter queue too unless
        ``keep_dlq`` (a DLQ another queue or stream also uses is kept). Returns
        ``{"deleted", "messages"}`` plus ``"dead_letter": {"deleted", "messages"}``
        when the DLQ went with it."""
        args: dict[str, Any] = {"name": name}
        if keep_dlq:
            args["keep_dlq"] = True
        info: dict[str, Any] = await self._call("queue.delete", args)
        return info

    async def update_queue(self, name: str, **settings: Any) -> dict[str, Any]:
        """Change settings of queue ``name`` in place, for the running queue and
        after a restart. Mutable: ack_deadline (next deliveries), max_deliveries,
        backoff_* (next failure), message_ttl (next publishes), dead_letter_expired,
        max_length and overflow (at once: a lowered max_length with
        "dead_letter_oldest" trims). bind, dead_letter and is_dlq raise
        ImmutableSettingError naming the setting and why. Returns the queue's info."""
        info: dict[str, Any] = await self._call("queue.update", {"name": name, **settings})
        return info

    async def purge_queue(self, name: str) -> int:
        purged: int = (await self._call("queue.purge", {"name": name}))["purged"]
        return purged

    async def queue_info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("queue.info", {"name": name})
        return info

    async def list_queues(self) -> list[dict[str, Any]]:
        queues: list[dict[str, Any]] = await self._call("queue.list", {})
        return queues

    async def peek_queue(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """A queue's stored messages, oldest first, in flight included; they stay
        where they are (nothing is delivered or consumed). Needs consume on it."""
        msgs: list[dict[str, Any]] = await self._call("queue.peek", {"name": queue, "limit": limit, "offset": offset})
        return msgs

    async def dlq_list(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Peek at a dead-letter queue's messages (they stay where they are)."""
        msgs: list[dict[str, Any]] = await self._call("dlq.list", {"name": queue, "limit": limit, "offset": offset})
        return msgs

    async def dlq_redrive(self, queue: str, *, count: int | None = None, to: str | None = None) -> int:
        """Move up to ``count`` (default all) messages from dead-letter queue
        ``queue`` back to their source queue (or to queue ``to``)."""
        args: dict[str, Any] = {"name": queue}
        if count is not None:
            args["count"] = count
        if to is not None:
            args["to"] = to
        moved: int = (await self._call("dlq.redrive", args))["redriven"]
        return moved

    async def dlq_purge(self, queue: str) -> int:
        purged: int = (await self._call("dlq.purge", {"name": queue}))["purged"]
        return purged

    def consume(self, queue: str, *, prefetch: int = 100) -> ConsumeContext[Delivery]:
        """``async with tc.consume(queue, prefetch=N) as deliveries:`` then
        ``async for d in deliveries:``; settle each with ack/nack/reject."""
        return ConsumeContext(self._port, queue, {"queue": queue, "prefetch": prefetch}, Delivery)

    # ----------------------------------------------------------- streams

    async def declare_stream(self, name: str, *, partitions: int = 1, bind: Sequence[str | dict[str, Any]] = (),
                             **settings: Any) -> dict[str, Any]:
        """Create a stream of ``partitions`` ordered partitions bound to ``bind``
        patterns (entries as for :meth:`declare_queue`, filters included) (or confirm an identical one exists; ConflictError if it
        differs). Settings: max_age (s), max_messages and max_bytes (per
        partition), max_deliveries (default 5, then the stream's DLQ),
        ack_deadline (s), backoff_initial/multiplier/max (s), dead_letter."""
        args = {"name": name, "partitions": partitions, "bind": list(bind), **settings}
        info: dict[str, Any] = await self._call("stream.declare", args)
        return info

    async def delete_stream(self, name: str, *, keep_dlq: bool = False) -> dict[str, Any]:
        """Delete a stream, its messages and groups, and its dead-letter queue too
        unless ``keep_dlq`` (a DLQ another queue or stream also uses is kept)."""
        args: dict[str, Any] = {"name": name}
        if keep_dlq:
            args["keep_dlq"] = True
        info: dict[str, Any] = await self._call("stream.delete", args)
        return info

    async def update_stream(self, name: str, **settings: Any) -> dict[str, Any]:
        """Change settings of stream ``name`` in place. Mutable: max_age,
        max_messages, max_bytes (retention runs at once), max_deliveries,
        ack_deadline, backoff_*. partitions, bind and dead_letter raise
        ImmutableSettingError naming the setting and why. Returns the stream's info."""
        info: dict[str, Any] = await self._call("stream.update", {"name": name, **settings})
        return info

    async def stream_groups(self, name: str) -> dict[str, dict[str, Any]]:
        """The consumer groups of stream ``name`` by group name: generation,
        members (connection, client, cid, partitions) and per partition the
        owner, committed offset, lag and in-flight count."""
        groups: dict[str, dict[str, Any]] = await self._call("stream.groups", {"name": name})
        return groups

    async def delete_group(self, stream: str, group: str, *, force: bool = False) -> dict[str, Any]:
        """Delete consumer group ``group`` of ``stream`` and its committed offsets
        (joining it again starts a new group). A group with live members raises
        ConflictError unless ``force``, which ends their consumers first."""
        args: dict[str, Any] = {"name": stream, "group": group}
        if force:
            args["force"] = True
        res: dict[str, Any] = await self._call("stream.group_delete", args)
        return res

    async def stream_info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = await self._call("stream.info", {"name": name})
        return info

    async def list_streams(self) -> list[dict[str, Any]]:
        streams: list[dict[str, Any]] = await self._call("stream.list", {})
        return streams

    def stream_consume(self, stream: str, group: str, *, window: int = 100,
                       start: str = "earliest") -> ConsumeContext[StreamMessage]:
        """``async with tc.stream_consume(stream, group=...) as msgs:`` joins a
        consumer group. Partitions are shared among the group's members and
        each is delivered in order, at most ``window`` unacked at a time;
        ``await m.ack()`` commits. ``start`` applies to a new group."""
        return ConsumeContext(self._port, stream, {"stream": stream, "group": group, "window": window,
                                                   "start": start}, StreamMessage)

    async def read_stream(self, stream: str, partition: int = 0, start: Any = "earliest", *,
                          follow: bool = False, out_of_range: str = "error") -> AsyncGenerator[StreamMessage, None]:
        """Replay one partition outside any group: an async iterator of
        StreamMessage from ``start`` ("earliest", "latest", an offset, or a
        datetime / {"time_ms": ...}), ending at the end of the partition
        unless ``follow``. An offset outside what is retained raises
        OffsetOutOfRangeError, or starts at the earliest with
        ``out_of_range="earliest"``."""
        if hasattr(start, "timestamp"):
            start = {"time_ms": int(start.timestamp() * 1000)}
        args = {"stream": stream, "partition": partition, "start": start, "follow": follow,
                "out_of_range": out_of_range}
        cons = await self._port.open_consumer(stream, args, StreamMessage)
        try:
            async for m in cons:
                yield m
        finally:
            with anyio.CancelScope(shield=True):
                await self._port.close_consumer(cons)
