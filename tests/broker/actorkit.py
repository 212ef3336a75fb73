"""Helpers for unit tests of the durable actors without a socket or a broker.

:class:`RecordingPeer` stands in for a consumer's connection (the port an
actor pushes frames to) and records every frame. :class:`World` builds what
the durable layer gives its actors -- a DurableContext over a real store,
with the real dead-letter sink -- and starts queue, stream and group actors
in the test's task group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup

from tidings.protocol import frames as F

from tidings.broker.durable.context import DurableContext
from tidings.broker.durable.deadletter import DeadLetters
from tidings.broker.durable.group import GroupActor
from tidings.broker.durable.partition import Partition
from tidings.broker.durable.queue import QueueActor
from tidings.broker.durable.settings import QueueConfig, StreamConfig
from tidings.broker.durable.store.base import PutMessages, PutQueue, StoredMessage
from tidings.broker.durable.store.streams import PutStream, StreamRow
from tidings.broker.durable.stream import StreamActor
from tidings.broker.durable.window import WindowBudget

WAIT: Final = 30.0  # generous bound for anything the actors do on their own (a busy machine)
BUDGET: Final = 64 * 1024 * 1024


class RecordingPeer:
    """A fake connection: unlimited credit, every pushed frame recorded."""

    def __init__(self, number: int = 1, name: str = "peer") -> None:
        self.number = number
        self.name = name
        self.frames: list[list[Any]] = []
        self.consumers: dict[int, Any] = {}
        self.pending_limit = 1 << 30
        self._changed = anyio.Event()

    def end_consumer(self, cid: int, reason: str, **info: Any) -> None:
        self.consumers.pop(cid, None)
        self.push_wire([F.Op.NOTICE, "consumer_closed", {"cid": cid, "reason": reason, **info}])

    def push_wire(self, value: list[Any], size: int = 64) -> None:
        self.frames.append(value)
        self._changed.set()

    def credit(self, wake: Callable[[], None]) -> int:
        return 1 << 30

    def await_credit(self, wake: Callable[[], None]) -> None:
        pass

    def reserve(self, n: int) -> None:
        pass

    def release(self, n: int) -> None:
        pass

    async def wait_pending_below(self, n: int) -> None:
        return

    def deliveries(self, cid: int | None = None) -> list[list[Any]]:
        """Every DELIVER item pushed (to consumer ``cid``), in push order."""
        return [it for f in self.frames if f[0] == F.Op.DELIVER and (cid is None or f[1] == cid) for it in f[2]]

    def notices(self, kind: str) -> list[dict[str, Any]]:
        return [f[2] for f in self.frames if f[0] == F.Op.NOTICE and f[1] == kind]

    async def wait_for(self, what: Callable[[], Any]) -> Any:
        """Wait (bounded by WAIT) until ``what()`` is true after a push; returns it."""
        with anyio.fail_after(WAIT):
            while not (got := what()):
                self._changed = anyio.Event()
                await self._changed.wait()
            return got

    async def deliveries_at_least(self, n: int, cid: int | None = None) -> list[list[Any]]:
        await self.wait_for(lambda: len(self.deliveries(cid)) >= n)
        return self.deliveries(cid)


async def until(what: Callable[[], Any]) -> Any:
    """Poll actor state (bounded by WAIT) until ``what()`` is true."""
    with anyio.fail_after(WAIT):
        while not (got := what()):
            await anyio.sleep(0.01)
        return got


class World:
    """A DurableContext over ``store`` with the real dead-letter sink; actors
    started in ``tg``."""

    def __init__(self, store: Any, tg: TaskGroup) -> None:
        self.store = store
        self.tg = tg
        self.ctx = DurableContext(store, WindowBudget(BUDGET))
        self.queues: dict[str, QueueActor] = {}
        self.dead_letters = DeadLetters(self.ctx, self.queues, self._start_queue)
        self.ctx.dead_letters = self.dead_letters

    async def _start_queue(self, cfg: QueueConfig, count: int) -> QueueActor:
        q = QueueActor(self.ctx, cfg, count)
        self.queues[cfg.name] = q
        await self.tg.start(q.run)
        return q

    async def queue(self, **settings: Any) -> QueueActor:
        """Declare (store, then start) a queue and its dead-letter queue."""
        cfg = QueueConfig.from_args(settings)
        if cfg.dead_letter:
            await self.dead_letters.ensure(cfg.dead_letter)
        await self.store.write(PutQueue(cfg.name, cfg.to_dict(), self.ctx.now_ms()))
        return await self._start_queue(cfg, 0)

    async def publish(self, q: QueueActor, *payloads: bytes) -> list[StoredMessage]:
        """Store messages in ``q`` and hand them to it on commit, as a publish does."""
        now = self.ctx.now_ms()
        rows = [StoredMessage(q.name, self.ctx.next_id(), "s." + q.name, p, None, None, now, now, None, 0, None)
                for p in payloads]

        def done(error: Exception | None) -> None:
            if error is None:
                q.on_committed(rows)

        await self.store.write(PutMessages(rows, [], done))
        return rows

    async def stream(self, **settings: Any) -> StreamActor:
        cfg = StreamConfig.from_args(settings)
        await self.dead_letters.ensure(cfg.dead_letter or "")
        await self.store.write(PutStream(cfg.name, cfg.to_dict(), self.ctx.now_ms()))
        return StreamActor(cfg, [Partition(cfg.name, i, 0, 0, 0) for i in range(cfg.partitions)])

    async def group(self, st: StreamActor, name: str = "g") -> GroupActor:
        g = GroupActor(self.ctx, st, name, {})
        st.groups[name] = g
        await self.tg.start(g.run)
        return g

    async def append(self, st: StreamActor, partition: int, *payloads: bytes) -> list[StreamRow]:
        """Append to one partition of ``st`` and hand the rows to it on commit."""
        part = st.partitions[partition]
        now = self.ctx.now_ms()
        rows = []
        for p in payloads:
            rows.append(StreamRow(st.name, partition, part.next, "s." + st.name, None, p, None, None, now))
            part.next += 1

        def done(error: Exception | None) -> None:
            if error is None:
                st.on_committed({partition: rows})

        await self.store.write(PutMessages([], [], done, stream_rows=rows))
        return rows


async def persisted(actor: Any, *args: Any) -> Exception | None:
    """Wait until everything ``actor`` settled so far is committed; returns the store's error."""
    got: list[Exception | None] = []
    ev = anyio.Event()

    def fn(error: Exception | None) -> None:
        got.append(error)
        ev.set()

    actor.on_persisted(fn, *args)
    with anyio.fail_after(WAIT):
        await ev.wait()
    return got[0]
