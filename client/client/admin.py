"""Queue, dead-letter and stream operations of the client (a mixin of Client)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from tidings.protocol import frames as F

from tidings.client.consumer import ConsumeContext, Delivery, QueueConsumer, StreamMessage
from tidings.client.errors import ConnectionClosedError, NotFoundError, TimeoutError

if TYPE_CHECKING:
    pass


class AdminMixin:
    """Durable-object methods; every one is a CALL or a consumer on the connection."""

    async def declare_queue(self, name: str, *, bind: list[str] | tuple[str, ...] = (),
                            **settings: Any) -> dict[str, Any]:
        """Create a durable queue (or confirm an identical one exists).

        ``bind``: subject patterns whose publishes are stored in the queue.
        Settings (all optional): ack_deadline (s), max_deliveries (0 =
        unlimited; default 5), backoff_initial, backoff_multiplier,
        backoff_max, backoff_jitter, backoff_schedule (list of s),
        dead_letter (default "<name>.dlq"), message_ttl (s),
        dead_letter_expired, max_length, overflow ("reject" or
        "dead_letter_oldest"). Raises ConflictError if the queue exists with
        different settings. Returns the queue's info.
        """
        args = {"name": name, "bind": list(bind), **settings}
        return await self.call("queue.declare", args)  # type: ignore[no-any-return]

    async def delete_queue(self, name: str) -> dict[str, Any]:
        return await self.call("queue.delete", {"name": name})  # type: ignore[no-any-return]

    async def purge_queue(self, name: str) -> int:
        return (await self.call("queue.purge", {"name": name}))["purged"]  # type: ignore[no-any-return]

    async def queue_info(self, name: str) -> dict[str, Any]:
        return await self.call("queue.info", {"name": name})  # type: ignore[no-any-return]

    async def list_queues(self) -> list[dict[str, Any]]:
        return await self.call("queue.list")  # type: ignore[no-any-return]

    async def dlq_list(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Peek at a dead-letter queue's messages (they stay where they are)."""
        return await self.call("dlq.list", {"name": queue, "limit": limit, "offset": offset})  # type: ignore

    async def dlq_redrive(self, queue: str, *, count: int | None = None, to: str | None = None) -> int:
        """Move up to ``count`` (default all) messages from dead-letter queue
        ``queue`` back to their source queue (or to queue ``to``)."""
        args: dict[str, Any] = {"name": queue}
        if count is not None:
            args["count"] = count
        if to is not None:
            args["to"] = to
        return (await self.call("dlq.redrive", args))["redriven"]  # type: ignore[no-any-return]

    async def dlq_purge(self, queue: str) -> int:
        return (await self.call("dlq.purge", {"name": queue}))["purged"]  # type: ignore[no-any-return]

    def consume(self, queue: str, *, prefetch: int = 100) -> ConsumeContext:
        """``async with tc.consume(queue, prefetch=N) as deliveries:`` then
        ``async for d in deliveries:``; settle each with ack/nack/reject."""
        return ConsumeContext(self, queue, {"queue": queue, "prefetch": prefetch})

    async def _start_consumer(self, name: str, args: dict[str, Any],
                              kind: type[Delivery] = Delivery) -> QueueConsumer:
        cid = next(self._cids)
        cons = QueueConsumer(self, cid, name, args.get("prefetch") or args.get("window") or 0, kind)
        cons.args = args
        self._consumers[cid] = cons
        try:
            cons.info = await self._request([F.Op.CONSUME, 0, cid, args])
        except BaseException:
            self._consumers.pop(cid, None)
            raise
        return cons

    # ----------------------------------------------------------- streams

    async def declare_stream(self, name: str, *, partitions: int = 1, bind: list[str] | tuple[str, ...] = (),
                             **settings: Any) -> dict[str, Any]:
        """Create a stream of ``partitions`` ordered partitions bound to ``bind``
        patterns (or confirm an identical one exists; ConflictError if it
        differs). Settings: max_age (s), max_messages and max_bytes (per
        partition), max_deliveries (default 5, then the stream's DLQ),
        ack_deadline (s), backoff_initial/multiplier/max (s), dead_letter."""
        args = {"name": name, "partitions": partitions, "bind": list(bind), **settings}
        return await self.call("stream.declare", args)  # type: ignore[no-any-return]

    async def delete_stream(self, name: str) -> dict[str, Any]:
        return await self.call("stream.delete", {"name": name})  # type: ignore[no-any-return]

    async def stream_info(self, name: str) -> dict[str, Any]:
        return await self.call("stream.info", {"name": name})  # type: ignore[no-any-return]

    async def list_streams(self) -> list[dict[str, Any]]:
        return await self.call("stream.list")  # type: ignore[no-any-return]

    def stream_consume(self, stream: str, group: str, *, window: int = 100,
                       start: str = "earliest") -> ConsumeContext:
        """``async with tc.stream_consume(stream, group=...) as msgs:`` joins a
        consumer group. Partitions are shared among the group's members and
        each is delivered in order, at most ``window`` unacked at a time;
        ``await m.ack()`` commits. ``start`` applies to a new group."""
        return ConsumeContext(self, stream, {"stream": stream, "group": group, "window": window,
                                             "start": start}, StreamMessage)

    async def read_stream(self, stream: str, partition: int = 0, start: Any = "earliest", *,
                          follow: bool = False, out_of_range: str = "error") -> Any:
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
        cons = await self._start_consumer(stream, args, StreamMessage)
        try:
            async for m in cons:
                yield m
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_consumer(cons)

    async def _stop_consumer(self, cons: QueueConsumer) -> None:
        cons._end(None)
        if self._consumers.pop(cons.cid, None) is None or self._closed:
            return
        if self.state != "connected":
            return  # not restored after the reconnect: the broker will never know it
        try:
            await self._request([F.Op.STOP, 0, cons.cid])
        except (ConnectionClosedError, TimeoutError, NotFoundError):
            pass  # the connection went (taking the consumer with it), or it is already gone
