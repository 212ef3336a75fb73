"""The streams half of the durable layer: declare, recover, consume, retain.

Kept apart from core.py (queues) and admission.py (publishes) so each file
reads in one sitting; ``Durable`` owns one ``Streams`` and hands it to its
``Admission``, which stores publishes into queues and streams alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import TaskGroup

from tidings.protocol import numbers as N
from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.durable.targets import FilteredTarget, add_bindings, remove_bindings
from tidings.broker.durable.group import GroupActor
from tidings.broker.durable.partition import Partition
from tidings.broker.durable.reader import Reader, resolve_start
from tidings.broker.durable.settings import DEFAULT_WINDOW, StreamConfig, bind_entries, dlq_name, updated, validate_name
from tidings.broker.durable.store.base import DeleteGroup, StorageError
from tidings.broker.durable.store.streams import CommitOffsets, DeleteStream, MarkStreamNext, PutStream, TrimStream
from tidings.broker.durable.stream import StreamActor

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext
    from tidings.broker.durable.ports import Host, Peer
    from tidings.broker.durable.deadletter import DeadLetters
    from tidings.broker.durable.queue import QueueActor
    from tidings.broker.router import Router

log = logging.getLogger(__name__)

RETENTION_INTERVAL: Final = 5.0  # seconds between background retention passes
MAX_WINDOW: Final = N.MAX_WINDOW  # checked when CONSUME is decoded, and here again


def _err(msg: str, code: ErrorCode, rid: int = 0) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


class Streams:
    # Several brokers on one database (cluster mode) use durable/shared_stream.py's
    # subclass, which overrides these.
    shared = False  # offsets are allocated by the store at commit (pg_cluster.py), not here
    stream_class: type[StreamActor] = StreamActor

    def __init__(self, ctx: DurableContext, broker: Host, queues: Mapping[str, QueueActor],
                 bindings: Router[Any], dead_letters: DeadLetters,
                 filtered: Router[FilteredTarget] | None = None) -> None:
        self.ctx = ctx
        self.broker = broker
        self.queues = queues  # read only: a stream's name must not be a queue's
        self.bindings = bindings  # the publish routing table queues and streams share
        self.filtered: Router[FilteredTarget] = filtered if filtered is not None else Router()  # (targets.py)
        self.dead_letters = dead_letters
        self.streams: dict[str, StreamActor] = {}
        self._tg: TaskGroup | None = None
        self._updating = anyio.Lock()  # one settings update at a time: each starts from the last one's result

    @property
    def store(self) -> Any:
        return self.ctx.store

    async def start(self, tg: TaskGroup) -> None:
        self._tg = tg
        for name, conf, _created in await self.store.load_streams():
            await self.recover(name, conf)
        tg.start_soon(self._retention_loop)

    async def recover(self, name: str, conf: dict[str, Any]) -> StreamActor:
        """Start stream ``name`` from what the store holds (at start, and in cluster
        mode when another broker declared it: Durable.sync_catalog)."""
        cfg = StreamConfig.from_args(conf, stored=True)
        bounds = await self.store.partition_bounds(name)
        floors = await self.store.partition_floors(name)
        marks = await self.store.partition_marks(name)
        offsets = await self.store.load_offsets(name)
        parts = []
        for i in range(cfg.partitions):
            floor = floors.get(i, 0)
            lo, hi, nbytes = bounds.get(i, (floor, floor - 1, 0))
            first = max(lo, floor)
            # Offsets are never reused: not those of failed tail writes (marks),
            # nor any a group already acked past (its offsets commit even when
            # the mark could not be written).
            nxt = max(hi + 1, first, marks.get(i, 0),
                      max((max(c) for g in offsets.values() if (c := g.get(i)) is not None), default=0))
            parts.append(Partition(name, i, first, nxt, nbytes))
        st = self.stream_class(cfg, parts)
        self._register(st)
        for group, committed in offsets.items():
            await self._start_group(st, group, committed)
        return st

    def _register(self, st: StreamActor) -> None:
        self.streams[st.name] = st
        add_bindings(self.bindings, self.filtered, st)

    async def _start_group(self, st: StreamActor, name: str, offsets: dict[int, tuple[int, int]]) -> GroupActor:
        g = GroupActor(self.ctx, st, name, offsets)
        st.groups[name] = g
        assert self._tg is not None
        await self._tg.start(g.run)
        return g

    def stop(self) -> None:
        for st in self.streams.values():
            for g in st.groups.values():
                g.stop()
            for r in list(st.readers):
                r.close()

    def patterns(self) -> set[str]:
        return {p for st in self.streams.values() for p in st.cfg.bind}

    # ---------------------------------------------------------- publishing

    def mark_next(self, marks: list[tuple[str, int, int]]) -> None:
        """Record (stream, partition, next) after a failed tail write, so that the
        offsets it was given are never assigned again after a restart. Called
        from a store callback: never blocks."""
        def done(error: Exception | None) -> None:
            if error is not None:
                self.ctx.counters.state_failures += 1
                log.error("recording the next offsets %s failed: %s (a restart still takes the groups'"
                          " committed offsets into account)", marks, error)

        op = MarkStreamNext(marks, done)
        try:
            self.store.submit_nowait(op)
        except anyio.WouldBlock:
            assert self._tg is not None
            self._tg.start_soon(self._submit_mark, op)
        except StorageError as exc:  # closing: the mark is lost, the groups' offsets remain
            done(exc)

    async def _submit_mark(self, op: MarkStreamNext) -> None:
        try:
            await self.store.submit(op)
        except StorageError as exc:
            assert op.on_done is not None
            op.on_done(exc)

    async def commit_offsets(self, offsets: list[tuple[str, str, int, int, int]], on_done: Any = None,
                             wait: bool = False) -> None:
        op = CommitOffsets(offsets, on_done)
        if wait:
            await self.store.write(op)
        else:
            await self.store.submit(op)

    # ---------------------------------------------------------------- admin

    async def declare(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        cfg = StreamConfig.from_args(args)
        existing = self.streams.get(cfg.name)
        if existing is not None:
            if existing.cfg != cfg:
                diff = [k for k, v in cfg.to_dict().items() if existing.cfg.to_dict().get(k) != v]
                raise _err(f"stream {cfg.name!r} exists with different settings ({', '.join(diff)}); "
                           "change mutable ones with stream.update (`tidings streams update`)", ErrorCode.CONFLICT, rid)
            return {"created": False, **existing.info()}
        if cfg.name in self.queues:
            raise _err(f"{cfg.name!r} is already a queue", ErrorCode.CONFLICT, rid)
        # every entry counts (one pattern with many filters is many bindings, each checked per message)
        self.broker.bindings.check_declare("stream", cfg.name, bind_entries(cfg.bind, cfg.bind_filters), rid)
        await self.dead_letters.ensure(cfg.dead_letter or dlq_name(cfg.name))
        await self.store.write(PutStream(cfg.name, cfg.to_dict(), self.ctx.now_ms()))
        st = self.stream_class(cfg, [Partition(cfg.name, i, 0, 0, 0) for i in range(cfg.partitions)])
        self._register(st)
        self.broker.bindings_changed()
        return {"created": True, **st.info()}

    def _stream(self, args: dict[str, Any], rid: int, key: str = "name") -> StreamActor:
        name = args.get(key)
        st = self.streams.get(name) if isinstance(name, str) else None
        if st is None:
            raise _err(f"no stream named {name!r}", ErrorCode.NOT_FOUND, rid)
        return st

    async def delete(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        st = self._stream(args, rid)
        st.close("stream deleted")
        remove_bindings(self.bindings, self.filtered, st)
        del self.streams[st.name]
        await self.store.write(DeleteStream(st.name))
        self.broker.bindings_changed()
        return {"deleted": st.name}

    async def update(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Change a stream's mutable settings in place (settings.STREAM_IMMUTABLE
        are refused): stored, then live; a tighter retention applies at once."""
        st = self._stream(args, rid)
        async with self._updating:
            try:
                new = updated(st.cfg, args, "stream")
            except RemoteProtocolError as exc:
                exc.rid = rid
                raise
            if new != st.cfg and self.streams.get(st.name) is st:
                await self.store.write(PutStream(st.name, new.to_dict(), self.ctx.now_ms()))
                st.cfg = new
                for g in st.groups.values():
                    g.wake()  # ack_deadline, max_deliveries and backoff apply from the next delivery
                if new.max_age is not None or new.max_messages is not None or new.max_bytes is not None:
                    await self.enforce_retention(st)
        return st.info()

    def groups(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """A stream's consumer groups: members, partitions, committed offsets, lag."""
        return self._stream(args, rid).info()["groups"]

    async def delete_group(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Delete consumer group ``group`` of a stream and its committed offsets.
        A group with members is refused (CONFLICT) unless ``force``: then its
        members' consumers are ended (a consumer_closed NOTICE) first."""
        st = self._stream(args, rid)
        name = args.get("group")
        g = st.groups.get(name) if isinstance(name, str) else None
        if g is None:
            raise _err(f"stream {st.name!r} has no consumer group {name!r}", ErrorCode.NOT_FOUND, rid)
        if g.members and not args.get("force"):
            raise _err(f"consumer group {st.name}/{g.name} has {len(g.members)} live members; stop them "
                       "first, or force the delete to end their consumers", ErrorCode.CONFLICT, rid)
        if st.groups.get(g.name) is g:
            del st.groups[g.name]
        g.close("consumer group deleted")
        await g.finished.wait()  # it submits no offset commit after ours
        await self.store.write(DeleteGroup(st.name, g.name))
        return {"stream": st.name, "deleted": g.name}

    async def enforce_retention(self, st: StreamActor) -> int:
        """Apply max_age/max_messages/max_bytes to every partition; returns rows removed."""
        cfg = st.cfg
        removed = 0
        now = self.ctx.now_ms()
        for part in st.partitions:
            cut = part.first
            if cfg.max_messages is not None:
                cut = max(cut, part.hwm - cfg.max_messages)
            if cfg.max_age is not None:
                c = await self.store.cutoff_by_age(st.name, part.index, now - int(cfg.max_age * 1000))
                if c is not None:
                    cut = max(cut, min(c, part.hwm))
            if cfg.max_bytes is not None:
                c = await self.store.cutoff_by_bytes(st.name, part.index, cfg.max_bytes)
                if c is not None:
                    cut = max(cut, min(c, part.hwm))
            if cut > part.first:
                await self.store.write(TrimStream(st.name, part.index, cut))
                removed += cut - part.first
                part.trimmed(cut)
        st.trimmed += removed
        if removed:
            for g in st.groups.values():
                g.wake()
        return removed

    async def _retention_loop(self) -> None:
        while True:
            await anyio.sleep(RETENTION_INTERVAL)
            for st in list(self.streams.values()):
                c = st.cfg
                if c.max_age is None and c.max_messages is None and c.max_bytes is None:
                    continue
                try:
                    await self.enforce_retention(st)
                except Exception:  # actor boundary: retention must not stop the broker
                    log.exception("retention of stream %s failed", st.name)

    async def trim_now(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        st = self._stream(args, rid)
        return {"removed": await self.enforce_retention(st)}

    # ---------------------------------------------------------- consuming

    async def consume(self, conn: Peer, cid: int, args: dict[str, Any], rid: int) -> dict[str, Any]:
        st = self._stream(args, rid, "stream")
        if cid in conn.consumers:
            raise _err(f"consumer id {cid} is already in use", ErrorCode.INVALID_ARGUMENT, rid)
        group = args.get("group")
        if group is not None:
            validate_name(group, "group")
            if "/" in group:  # consume permissions name a group as STREAM/GROUP (broker/permissions.py)
                raise _err("group names may not contain '/'", ErrorCode.INVALID_ARGUMENT, rid)
            window = args.get("window", DEFAULT_WINDOW)
            if type(window) is not int or not 1 <= window <= MAX_WINDOW:
                raise _err(f"window must be 1..{MAX_WINDOW}", ErrorCode.INVALID_ARGUMENT, rid)
            g = st.groups.get(group)
            if g is None:
                self.broker.caps.check_group(conn, st, rid)
                start = args.get("start", "earliest")
                if start not in ("earliest", "latest"):
                    raise _err("a new group's start must be 'earliest' or 'latest'", ErrorCode.INVALID_ARGUMENT,
                               rid)
                committed = {p.index: (p.first if start == "earliest" else p.hwm) for p in st.partitions}
                g = await self._start_group(st, group, {i: (c, c) for i, c in committed.items()})
                await self.commit_offsets([(st.name, group, i, c, c) for i, c in committed.items()], wait=True)
            m = g.join(conn, cid, window)
            conn.consumers[cid] = m
            return {"stream": st.name, "group": group, "generation": g.generation,
                    "ack_deadline": st.cfg.ack_deadline, "max_deliveries": st.cfg.max_deliveries}
        p = args.get("partition", 0)
        if type(p) is not int or not 0 <= p < len(st.partitions):
            raise _err(f"partition must be 0..{len(st.partitions) - 1}", ErrorCode.INVALID_ARGUMENT, rid)
        part = st.partitions[p]
        start = args.get("start", "earliest")
        oor = args.get("out_of_range", "error")
        if oor not in ("error", "earliest"):
            raise _err("out_of_range must be 'error' or 'earliest'", ErrorCode.INVALID_ARGUMENT, rid)
        at_time = None
        if isinstance(start, dict):
            ts = N.check_int(start.get("time_ms"), "start.time_ms", 0, N.MAX_TIMESTAMP_MS, rid)
            at_time = await self.store.offset_for_time(st.name, p, ts)
            if at_time is None:
                at_time = part.hwm
        try:
            offset = resolve_start(part, start, at_time, oor)
        except RemoteProtocolError as exc:
            exc.rid = rid
            raise
        r = Reader(self.ctx, conn, cid, st, p, offset, bool(args.get("follow", False)), st.forget_reader)
        conn.consumers[cid] = r
        st.readers.add(r)
        assert self._tg is not None
        self._tg.start_soon(r.run)
        return {"stream": st.name, "partition": p, "offset": offset, "first": part.first, "next": part.hwm}

    def calls(self) -> dict[str, Any]:
        return {
            "stream.declare": self.declare,
            "stream.delete": self.delete,
            "stream.list": lambda args, rid: [st.info() for st in sorted(self.streams.values(),
                                                                          key=lambda s: s.name)],
            "stream.info": lambda args, rid: self._stream(args, rid).info(),
            "stream.trim": self.trim_now,
            "stream.update": self.update,
            "stream.groups": self.groups,
            "stream.group_delete": self.delete_group,
        }
