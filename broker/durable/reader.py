"""Stream readers: replay or follow one partition outside any consumer group.

A :class:`Reader` pages the partition from memory (its tail) or the store,
within the window budget, and pushes DELIVER frames as the connection's
outbound buffer drains; no acks. :func:`resolve_start` turns a reader's
``start`` into an offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Final

import anyio

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.durable.delivery import DELIVERY_OVERHEAD, push_deliveries
from tidings.broker.durable.partition import GAP, READ_PAGE, Partition
from tidings.broker.durable.store.base import StorageError
from tidings.broker.durable.window import MESSAGE_OVERHEAD, WINDOW_MIN

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Peer
    from tidings.broker.durable.context import DurableContext, StreamView

READER_HIGH_WATER: Final = 1024 * 1024  # a reader pauses while its connection has this much queued


class Reader:
    """A replay/follow reader of one partition, outside any group. No acks:
    flow control is the connection's outbound buffer."""

    __slots__ = ("ctx", "conn", "cid", "stream", "partition", "offset", "follow", "scope", "paged", "_on_close")

    def __init__(self, ctx: DurableContext, conn: Peer, cid: int, stream: StreamView, partition: int,
                 offset: int, follow: bool, on_close: Callable[[Reader], None]) -> None:
        self.ctx = ctx
        self.conn = conn
        self.cid = cid
        self.stream = stream  # read only: its name and partition logs
        self.partition = partition
        self._on_close = on_close  # the stream forgets this reader
        self.offset = offset
        self.follow = follow
        self.scope = anyio.CancelScope()
        self.paged = 0  # bytes of the page read from disk, held against the window budget until sent

    @property
    def source(self) -> str:
        return self.stream.name

    group_name = None  # reads without a group

    def settle(self, items: list[list[Any]]) -> list[int]:
        return [0] * len(items)  # readers need no acks; accepted and ignored

    def close(self) -> None:
        self.scope.cancel()
        self._on_close(self)

    async def run(self) -> None:
        budget = self.ctx.window_budget
        budget.open()
        with self.scope:
            try:
                await self._run()
            finally:
                self.paged = budget.hold(self.paged, 0)
                budget.close()
                self._on_close(self)

    async def _run(self) -> None:
        part = self.stream.partitions[self.partition]
        store = self.ctx.store
        budget = self.ctx.window_budget
        conn = self.conn
        backoff = 0.0
        while True:
            if self.offset < part.first:
                self.offset = part.first
            if self.offset >= part.hwm:
                if not self.follow:
                    conn.end_consumer(self.cid, "end", next_offset=self.offset)
                    return
                ev = part.changed
                if self.offset >= part.hwm:
                    await ev.wait()
                continue
            rows = part.get(self.offset, READ_PAGE)
            if rows is None:
                self.paged = budget.hold(self.paged, budget.room(0))  # reserved while reading
                try:
                    rows = await store.read_partition(self.stream.name, self.partition, self.offset, READ_PAGE,
                                                      self.paged, WINDOW_MIN)
                except StorageError as exc:
                    self.paged = budget.hold(self.paged, 0)
                    backoff = self.ctx.read_failed(backoff, exc,
                                                   f"reader of {self.stream.name}/{self.partition}")
                    await anyio.sleep(backoff)
                    continue
                backoff = 0.0
                rows = [r for r in rows if r.offset < part.hwm]
                self.paged = budget.hold(self.paged, sum(len(r.payload) + MESSAGE_OVERHEAD for r in rows))
                if not rows:  # only gaps (or retention) between here and hwm
                    self.offset = max(self.offset + 1, part.first)
                    continue
            # At most `high` bytes per push, pushed only once the mailbox is below `high`:
            # the connection's outbound bytes stay under max_pending_bytes (plus one message).
            high = min(READER_HIGH_WATER, conn.pending_limit // 2)
            items = []
            left = high
            for r in rows:
                self.offset = r.offset + 1
                if r.subject != GAP:
                    items.append([r.offset, r.subject, r.payload, r.headers, 1, r.timestamp_ms,
                                  [self.partition, r.offset, r.key, 0]])
                    left -= len(r.payload) + len(r.subject) + DELIVERY_OVERHEAD
                    if left <= 0:
                        break  # the rest of the page is read again next time
            await conn.wait_pending_below(high)
            if items:
                push_deliveries(conn, self.cid, items)
            await conn.wait_pending_below(high)
            self.paged = budget.hold(self.paged, 0)  # sent: what is still queued is below `high`



def resolve_start(part: Partition, start: Any, offset_for_time: int | None, out_of_range: str) -> int:
    """Turn a reader's start ("earliest", "latest", an offset) into an offset."""
    if start == "earliest":
        return part.first
    if start == "latest":
        return part.hwm
    if offset_for_time is not None:
        return offset_for_time
    if type(start) is not int or start < 0:
        raise RemoteProtocolError("start must be 'earliest', 'latest', an offset or {'time_ms': ...}",
                                  ErrorCode.INVALID_ARGUMENT)
    if start < part.first or start > part.hwm:
        if out_of_range == "earliest":
            return part.first
        raise RemoteProtocolError(
            f"offset {start} is outside partition {part.index}'s range [{part.first}, {part.hwm}]",
            ErrorCode.OFFSET_OUT_OF_RANGE)
    return start
