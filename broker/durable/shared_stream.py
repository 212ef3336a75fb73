"""Streams shared by several brokers on one PostgreSQL database (cluster mode).

Chosen by Durable when ``cluster = true``; the single-broker path (streams.py,
stream.py) is untouched. What changes:

* Offsets come from the store: a publish's rows carry provisional offsets until
  the commit, where the store takes each partition's block from its counter
  row under a row lock (store/pg_cluster.py). The confirm reports the final one.
* A partition's head (``hwm``) follows the database, not only this broker's own
  commits: :class:`HeadFollower` reads every partition's committed next offset
  in one statement, polling with a bounded backoff (HEAD_POLL_MIN..HEAD_POLL_MAX;
  a local commit that leaves a gap wakes it at once), and appends what other
  brokers wrote to the in-memory tail in offset order, or, when nobody here
  reads the stream or the gap is large, moves the head and lets readers page
  from the store. Readers and groups then see every broker's entries in offset
  order without gaps. LISTEN/NOTIFY is not used (CockroachDB has none).
* Consumer groups span brokers (durable/shared_group.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
from anyio.abc import TaskGroup

from tidings.broker.durable.group import GroupActor
from tidings.broker.durable.partition import READ_PAGE, Partition
from tidings.broker.durable.shared_group import SharedGroup
from tidings.broker.durable.store.base import StorageClosed, StorageError
from tidings.broker.durable.store.pg_cluster import ClusterStore
from tidings.broker.durable.store.streams import StreamRow
from tidings.broker.durable.stream import StreamActor
from tidings.broker.durable.streams import Streams

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext

log = logging.getLogger(__name__)

#: Seconds between two polls of the partitions' heads while other brokers' entries keep
#: arriving (at least), and at most once nothing moved (the wait doubles in between): the
#: longest a reader here waits for an entry written on another broker when all is quiet.
HEAD_POLL_MIN: Final = 0.005
HEAD_POLL_MAX: Final = 0.25


def broker_id() -> str:
    """This broker process's name in the database (group members, leases): unique per
    process, readable by an operator (host, pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def advance(part: Partition, rows: list[StreamRow]) -> bool:
    """Append committed ``rows`` (consecutive offsets) that continue the partition's
    head; rows below it are known already. False if they start past the head (the
    offsets between were written by another broker and are not read yet)."""
    hwm = part.hwm
    if not rows or rows[-1].offset < hwm:
        return True
    first = rows[0].offset
    if first > hwm:
        return False
    part.committed(rows[hwm - first:] if first < hwm else rows)
    if part.next < part.hwm:
        part.next = part.hwm  # the next provisional offset (the store gives the real one)
    return True


def jump(part: Partition, head: int) -> None:
    """Move the head to ``head`` without the rows between: the tail is emptied (it
    must stay dense) and readers page what they need from the store."""
    if head <= part.hwm:
        return
    part.tail.clear()
    part.tail_bytes = 0
    part.hwm = head
    if part.next < head:
        part.next = head
    ev, part.changed = part.changed, anyio.Event()
    ev.set()


def feed(part: Partition, rows: list[StreamRow]) -> None:
    """Append rows read from the store (in offset order), whatever they start at."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].offset != rows[i - 1].offset + 1:
            block = rows[start:i]
            if block[0].offset > part.hwm:  # below: retention removed them
                jump(part, block[0].offset)
            advance(part, block)
            start = i


class SharedStreamActor(StreamActor):
    """A stream whose partitions other brokers append to as well."""

    follower: HeadFollower | None = None

    def on_committed(self, rows_by_part: dict[int, list[StreamRow]]) -> None:
        behind = False
        for idx, rows in rows_by_part.items():
            self.published += len(rows)
            if not advance(self.partitions[idx], rows):
                behind = True
        if behind and self.follower is not None:
            self.follower.wake()  # a hint: another broker committed in between
        for g in self.groups.values():
            g.wake()

    def interested(self) -> bool:
        """Someone here reads the stream: other brokers' entries go to the tail."""
        return bool(self.readers) or any(g.members for g in self.groups.values())


class HeadFollower:
    """Keeps every partition's head at the database's committed head (see the module
    docstring). One per broker; one statement per poll, whatever the number of streams."""

    def __init__(self, ctx: DurableContext, streams: dict[str, StreamActor]) -> None:
        self.ctx = ctx
        self.streams = streams
        self._wake = anyio.Event()
        self.polls = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        wait = HEAD_POLL_MIN
        backoff = 0.0
        while True:
            try:
                moved = await self.poll()
            except StorageClosed:  # the broker is stopping
                return
            except StorageError as exc:
                backoff = self.ctx.read_failed(backoff, exc, "stream heads")
                await anyio.sleep(backoff)
                continue
            backoff = 0.0
            wait = HEAD_POLL_MIN if moved else min(HEAD_POLL_MAX, wait * 2)
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def poll(self) -> bool:
        """One pass: returns whether any head moved. Raises StorageError."""
        store = cast(ClusterStore, self.ctx.store)  # cluster mode: a PostgresStore
        heads = await store.stream_heads()
        self.polls += 1
        moved: set[StreamActor] = set()
        for (name, idx), head in heads.items():
            st = self.streams.get(name)
            if st is None or idx >= len(st.partitions):
                continue
            part = st.partitions[idx]
            if head <= part.hwm:
                continue
            moved.add(st)
            if head - part.hwm > READ_PAGE or not (isinstance(st, SharedStreamActor) and st.interested()):
                jump(part, head)
                continue
            rows = await store.read_partition(name, idx, part.hwm, READ_PAGE)
            if rows:
                feed(part, rows)
            if part.hwm < head:  # retention removed them meanwhile (or they are beyond the page)
                jump(part, head)
        for st in moved:
            for g in st.groups.values():
                g.wake()
        return bool(moved)


class SharedStreams(Streams):
    """Streams for cluster mode: stream actors that follow the database's heads and
    consumer groups that span brokers."""

    shared = True
    stream_class = SharedStreamActor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker_id = broker_id()
        self.follower = HeadFollower(self.ctx, self.streams)

    def _register(self, st: StreamActor) -> None:
        if isinstance(st, SharedStreamActor):
            st.follower = self.follower
        super()._register(st)

    async def start(self, tg: TaskGroup) -> None:
        await super().start(tg)
        tg.start_soon(self.follower.run)
        log.info("streams shared with the other brokers on the database (broker id %s)", self.broker_id)

    async def _start_group(self, st: StreamActor, name: str, offsets: dict[int, tuple[int, int]]) -> GroupActor:
        g = SharedGroup(self.ctx, st, name, offsets, self.broker_id)
        st.groups[name] = g
        assert self._tg is not None
        await self._tg.start(g.run)
        return g

    async def commit_offsets(self, offsets: list[tuple[str, str, int, int, int]], on_done: Any = None,
                             wait: bool = False) -> None:
        # Only a new group's starting offsets come here (Streams.consume): a group that
        # another broker created keeps its own.
        by_group: dict[tuple[str, str], dict[int, int]] = {}
        for stream, group, p, c, _d in offsets:
            by_group.setdefault((stream, group), {})[p] = c
        for (stream, group), starts in by_group.items():
            await cast(ClusterStore, self.store).init_group_offsets(stream, group, starts)
