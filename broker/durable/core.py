"""The durable layer: queues, their bindings, dead-lettering, DLQ tools, consuming.

``Durable`` owns the storage actor and one ``QueueActor`` per queue (and,
through ``Streams``, the streams): it declares, deletes, purges and
redrives queues, attaches consumers and settles their acks, and recovers
everything from the store at start. A durable publish is admitted by its
``Admission`` (admission.py: de-dup, ids and offsets, the one store
operation, confirms after the commit), which it builds and exposes as
``self.admission``.
"""

from __future__ import annotations

import logging
import os
import uuid

import anyio
from typing import TYPE_CHECKING, Any, Callable, Final, cast

from anyio.abc import TaskGroup

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol import numbers as N
from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.router import Router
from tidings.broker.durable.admission import Admission
from tidings.broker.durable.context import DurableContext
from tidings.broker.durable.group import Member
from tidings.broker.durable.deadletter import DeadLetters, may_create_on_demand, redriven_headers
from tidings.broker.durable.ids import ClusterContext
from tidings.broker.durable.priority import PriorityQueueActor
from tidings.broker.durable.queue import Consumer, QueueActor
from tidings.broker.durable.shared_queue import SharedQueueActor
from tidings.broker.durable.settings import QueueConfig, StreamConfig, bind_entries, updated, validate_name
from tidings.broker.durable.store.base import (
    Durability,
    DeleteQueue,
    PutQueue,
    StorageError,
    StorageFull,
    Store,
    StoredMessage,
)
from tidings.broker.durable.store.sqlite import SqliteStore
from tidings.broker.durable.streams import Streams
from tidings.broker.durable.targets import FilteredTarget, add_bindings, remove_bindings
from tidings.broker.durable.window import WindowBudget

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Host, Peer

log = logging.getLogger(__name__)

MAX_PREFETCH: Final = N.MAX_PREFETCH  # deliveries one consumer may hold unacked (checked when CONSUME is decoded)
REDRIVE_CHUNK: Final = 5_000  # messages moved per transaction by a redrive
#: Cluster mode: seconds between reads of the catalog version (one indexed read of one
#: row): a queue declared, changed or deleted on another broker is known here within it.
CATALOG_POLL: Final = 1.0


def _err(msg: str, code: ErrorCode, rid: int = 0) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


class Durable:
    def __init__(self, broker: Host) -> None:
        self.broker = broker
        cfg = broker.config
        self.store: Store
        if cfg.store:  # a postgresql:// URL (validated by Config); asyncpg is imported when it opens
            from tidings.broker.durable.store.postgres import PostgresStore
            self.store = PostgresStore(cfg.store, durability=cast(Durability, cfg.durability),
                                       data_dir=cfg.data_dir, stall_timeout=cfg.store_stall_timeout,
                                       cluster=cfg.cluster)
        else:
            self.store = SqliteStore(os.path.join(cfg.data_dir, "tidings.db"),
                                     durability=cast(Durability, cfg.durability),  # validated by Config
                                     max_page_count=cfg.max_db_pages or None,
                                     stall_timeout=cfg.store_stall_timeout)
        self.window_budget = WindowBudget(cfg.window_memory)  # shared by every queue, group and reader
        # What every queue, group and reader actor is given instead of this object.
        # Several brokers on one database (cluster): ids come in blocks from it (ids.py),
        # and every queue is shared (shared_queue.py).
        self.cluster = cfg.cluster
        self.broker_id = f"{cfg.cluster_address or os.uname().nodename}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.ctx = ClusterContext(self.store, self.window_budget) if self.cluster \
            else DurableContext(self.store, self.window_budget)
        self._catalog_version: int | None = None
        self._catalog_lock = anyio.Lock()
        self.now_ms = self.ctx.now_ms
        self.queues: dict[str, QueueActor] = {}
        self.dead_letters = self.ctx.dead_letters = DeadLetters(self.ctx, self.queues, self._start_queue)
        self.bindings: Router[Any] = Router()  # QueueActor and StreamActor targets
        # Bindings with a content filter (targets.py): matched, then filtered, per message.
        self.filtered: Router[FilteredTarget] = Router()
        self.streams: Streams
        if cfg.cluster:  # several brokers on the database: streams and groups span them
            from tidings.broker.durable.shared_stream import SharedStreams
            self.streams = SharedStreams(self.ctx, broker, self.queues, self.bindings, self.dead_letters,
                                         self.filtered)
        else:
            self.streams = Streams(self.ctx, broker, self.queues, self.bindings, self.dead_letters, self.filtered)
        self._tg: TaskGroup | None = None
        self._updating = anyio.Lock()  # one settings update at a time: each starts from the last one's result
        # Admission of durable publishes (de-dup, ids, confirms): the connections' publish path.
        self.admission = Admission(self.ctx, self.streams, cfg.dedup_window, lambda: broker.shutting_down)

    # ------------------------------------------------------------ counters

    @property
    def confirmed(self) -> int:
        """Durable publishes confirmed after their commit (``Admission``)."""
        return self.admission.confirmed

    @property
    def duplicates(self) -> int:
        """Durable publishes answered as duplicates of an earlier msg_id (``Admission``)."""
        return self.admission.duplicates

    @property
    def state_failures(self) -> int:
        """Store operations changing a message's state (ack, nack, dead-letter
        move, offset mark) that failed: the state was restored in memory."""
        return self.ctx.counters.state_failures

    @property
    def read_errors(self) -> int:
        """Reads (refills, replays) that failed and are retried."""
        return self.ctx.counters.read_errors

    # ------------------------------------------------------------ lifecycle

    async def start(self, tg: TaskGroup) -> None:
        """Open the store, recover every queue, start the actors."""
        self._tg = tg
        await self.store.open()
        await tg.start(self.store.run)
        tg.start_soon(self.store.watchdog)
        if isinstance(self.ctx, ClusterContext):
            await self.ctx.first_block()
            tg.start_soon(self.ctx.refill)
            self._catalog_version = await self.store.catalog_version()  # type: ignore[attr-defined]
        else:
            self.ctx.last_id = await self.store.max_message_id()
        for name, conf, _created in await self.store.load_queues():
            qc = QueueConfig.from_args(conf, stored=True)
            count = await self.store.count(name)
            lanes = [await self.store.count(name, p) for p in range(qc.max_priority + 1)] if qc.max_priority else None
            await self._start_queue(qc, count, lanes)
        await self.streams.start(tg)
        tg.start_soon(self.admission.sweeper)
        if self.cluster:
            tg.start_soon(self._catalog_poller)
        log.info("recovered %d queues (%d messages) and %d streams", len(self.queues),
                 sum(q.count for q in self.queues.values()), len(self.streams.streams))

    async def close(self) -> None:
        self.streams.stop()
        shared = []
        for q in self.queues.values():
            if isinstance(q, SharedQueueActor):
                q.release_all()  # other brokers take over at once, not after the deadlines
                shared.append(q)
            else:
                q.stop()
        with anyio.move_on_after(5.0):  # each gives back what it holds, then stops
            for q in shared:
                await q.stopped.wait()
        await self.store.close()

    async def _start_queue(self, qc: QueueConfig, count: int, lanes: list[int] | None = None) -> QueueActor:
        q: QueueActor
        if self.cluster:
            q = SharedQueueActor(self.ctx, qc, count, self.broker_id)
        elif qc.max_priority:
            q = PriorityQueueActor(self.ctx, qc, count, lanes)
        else:
            q = QueueActor(self.ctx, qc, count)
        self.queues[qc.name] = q
        add_bindings(self.bindings, self.filtered, q)
        assert self._tg is not None
        await self._tg.start(q.run)
        return q

    # ------------------------------------------------------------ bindings

    def match(self, subject: str) -> list[Any]:
        return self.bindings.match(subject)[0]

    def binding_patterns(self) -> list[str]:
        return sorted({p for q in self.queues.values() for p in q.cfg.bind} | self.streams.patterns())

    # ------------------------------------------------------------- admin

    async def declare(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        qc = QueueConfig.from_args(args)
        if self.cluster and qc.max_priority:
            raise _err("priority queues are not available with several brokers (cluster = true) yet; "
                       "declare the queue without max_priority (docs/SCALING.md)", ErrorCode.INVALID_ARGUMENT, rid)
        existing = self.queues.get(qc.name)
        if existing is not None:
            if existing.cfg != qc:
                diff = [k for k, v in qc.to_dict().items() if existing.cfg.to_dict().get(k) != v]
                raise _err(f"queue {qc.name!r} exists with different settings ({', '.join(diff)}); "
                           "change mutable ones with queue.update (`tidings queues update`)", ErrorCode.CONFLICT, rid)
            return {"created": False, **existing.info()}
        # every entry counts (one pattern with many filters is many bindings, each checked per message)
        self.broker.bindings.check_declare("queue", qc.name, bind_entries(qc.bind, qc.bind_filters), rid)
        if qc.dead_letter and qc.dead_letter not in self.queues:
            if may_create_on_demand(qc.dead_letter):
                await self.dead_letters.ensure(qc.dead_letter)
            else:
                raise _err(f"dead-letter queue {qc.dead_letter!r} does not exist; declare it first",
                           ErrorCode.NOT_FOUND, rid)
        await self.store.write(PutQueue(qc.name, qc.to_dict(), self.now_ms()))
        q = await self._start_queue(qc, 0)
        self.broker.bindings_changed()
        return {"created": True, **q.info()}

    def _queue(self, args: dict[str, Any], rid: int, key: str = "name") -> QueueActor:
        name = args.get(key)
        q = self.queues.get(name) if isinstance(name, str) else None
        if q is None:
            raise _err(f"no queue named {name!r}", ErrorCode.NOT_FOUND, rid)
        return q

    async def update(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Change a queue's mutable settings in place: stored first, then the
        live actor takes them (settings.QUEUE_IMMUTABLE are refused)."""
        q = self._queue(args, rid)
        async with self._updating:
            try:
                new = updated(q.cfg, args, "queue")
            except RemoteProtocolError as exc:
                exc.rid = rid
                raise
            if new != q.cfg and self.queues.get(q.name) is q:
                await self.store.write(PutQueue(q.name, new.to_dict(), self.now_ms()))
                q.reconfigure(new)
        return q.info()

    def dead_letter_to_delete(self, args: dict[str, Any], kind: str = "queue") -> str | None:
        """The dead-letter queue a ``queue.delete``/``stream.delete`` call with
        ``args`` deletes with its queue or stream: None with ``keep_dlq``, when
        it does not exist, or when another queue or stream also dead-letters
        into it (it is kept for them)."""
        if args.get("keep_dlq"):
            return None
        name = args.get("name")
        owner: Any = (self.queues if kind == "queue" else self.streams.streams).get(name) \
            if isinstance(name, str) else None
        dl = owner.cfg.dead_letter if owner is not None else None
        if not dl or dl not in self.queues or dl == name:
            return None
        if any(o.cfg.dead_letter == dl for o in self.queues.values() if o is not owner and o.name != dl) or \
                any(st.cfg.dead_letter == dl for st in self.streams.streams.values() if st is not owner):
            return None
        return dl

    async def delete(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Delete a queue and, unless ``keep_dlq``, its dead-letter queue (when
        no other queue or stream dead-letters into it)."""
        q = self._queue(args, rid)
        users = [o.name for o in self.queues.values() if o.cfg.dead_letter == q.name and o is not q]
        if users:
            raise _err(f"queue {q.name!r} is the dead-letter queue of {', '.join(users)}", ErrorCode.CONFLICT, rid)
        dl = self.dead_letter_to_delete(args)
        await self._drop(q)
        out: dict[str, Any] = {"deleted": q.name, "messages": q.count}
        if dl is not None:
            out["dead_letter"] = await self.delete_dead_letter(dl)
        return out

    async def delete_dead_letter(self, name: str) -> dict[str, Any]:
        """Delete dead-letter queue ``name`` with the queue or stream it served."""
        dq = self.queues[name]
        await self._drop(dq)
        return {"deleted": dq.name, "messages": dq.count}

    async def _drop(self, q: QueueActor) -> None:
        q.close("queue deleted")
        remove_bindings(self.bindings, self.filtered, q)
        del self.queues[q.name]
        await self.store.write(DeleteQueue(q.name))
        self.broker.bindings_changed()

    async def purge(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        q = self._queue(args, rid)
        return {"purged": await q.purge()}

    def list_queues(self) -> list[dict[str, Any]]:
        out = []
        for q in sorted(self.queues.values(), key=lambda x: x.name):
            info = q.info()
            dl = self.queues.get(q.cfg.dead_letter or "")
            info["dlq_depth"] = dl.count if dl is not None else None
            del info["config"]
            out.append(info)
        return out

    async def dlq_list(self, args: dict[str, Any], rid: int) -> list[dict[str, Any]]:
        q = self._queue(args, rid)
        limit = args.get("limit", 100)
        offset = args.get("offset", 0)
        if type(limit) is not int or type(offset) is not int or not 0 < limit <= 10_000 or offset < 0:
            raise _err("limit must be 1..10000 and offset >= 0", ErrorCode.INVALID_ARGUMENT, rid)
        try:
            rows = await self.store.list_messages(q.name, limit, offset)
        except StorageError:
            self.ctx.counters.read_errors += 1  # the caller gets STORAGE_ERROR (retriable) and may ask again
            raise
        return [{"id": r.id, "subject": r.subject, "payload": r.payload, "headers": r.headers,
                 "msg_id": r.msg_id, "published_ms": r.published_ms, "deliveries": r.deliveries} for r in rows]

    def is_dead_letter_queue(self, q: QueueActor) -> bool:
        """True if ``q`` was created as a DLQ or a queue or stream dead-letters into it."""
        return (q.cfg.is_dlq or any(o.cfg.dead_letter == q.name for o in self.queues.values() if o is not q)
                or any(st.cfg.dead_letter == q.name for st in self.streams.streams.values()))

    def redrive_destinations(self, args: dict[str, Any]) -> list[QueueActor]:
        """The queues a ``dlq.redrive`` call may move messages into: its ``to``
        queue, or else every queue whose dead-letter queue this is (a message
        goes back only to such a queue, whatever its headers say). Unknown
        names give [] (the call itself answers NOT_FOUND)."""
        name, to = args.get("name"), args.get("to")
        if to is not None:
            dest = self.queues.get(to) if isinstance(to, str) else None
            return [dest] if dest is not None else []
        if not isinstance(name, str) or name not in self.queues:
            return []
        return [o for o in self.queues.values() if o.cfg.dead_letter == name and o.name != name]

    async def redrive(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Move up to ``count`` (default all) ready messages of a DLQ back to
        their source queue, or to ``to``; delivery counts start again.

        Only a dead-letter queue can be redriven (INVALID_ARGUMENT otherwise).
        Without ``to`` a message goes back to the queue named in its
        ``tidings-dlq-source`` header only if that queue dead-letters into
        this DLQ: publishers cannot write that header (protocol/codec.py), and
        this check keeps even a message stored before that rule from crossing
        into another queue. Others stay in the DLQ and are counted as skipped.
        The caller's rights on each destination are checked by the server
        (permissions.redrive_needs) before this runs."""
        q = self._queue(args, rid)
        if not self.is_dead_letter_queue(q):
            raise _err(f"queue {q.name!r} is not a dead-letter queue", ErrorCode.INVALID_ARGUMENT, rid)
        count = args.get("count")
        if count is not None and (type(count) is not int or count < 1):
            raise _err("count must be a positive integer", ErrorCode.INVALID_ARGUMENT, rid)
        dest_name = args.get("to")
        if dest_name is not None:
            validate_name(dest_name)
            if dest_name not in self.queues:
                raise _err(f"no queue named {dest_name!r}", ErrorCode.NOT_FOUND, rid)
        sources = {o.name for o in self.redrive_destinations({"name": q.name})}
        want = count if count is not None else q.count
        moved = 0
        skipped = 0
        while moved + skipped < want:
            taken = await q.take(min(want - moved - skipped, REDRIVE_CHUNK))
            if not taken:
                break
            try:
                await self.ctx.reserve_ids(len(taken))  # cluster mode: ids come in blocks (ids.py)
            except StorageError:
                q.give_back(taken)
                raise
            groups: dict[str, list[tuple[int, StoredMessage]]] = {}
            originals: dict[str, list[StoredMessage]] = {}
            back: list[StoredMessage] = []
            now = self.now_ms()
            for m in taken:
                h = dict(m.headers or {})
                target = dest_name or h.get(V.H_DLQ_SOURCE)
                if not isinstance(target, str) or target not in self.queues or target == q.name or \
                        (dest_name is None and target not in sources):
                    back.append(m)
                    continue
                row = StoredMessage(target, self.ctx.next_id(), m.subject, m.payload, redriven_headers(h, q.name),
                                    m.msg_id, m.published_ms, now, None, 0, None,
                                    self.queues[target].cfg.priority_of(m.priority))
                groups.setdefault(target, []).append((m.id, row))
                originals.setdefault(target, []).append(m)
            for target, moves in groups.items():
                op = q.move_out(target, moves, originals[target], self.queues[target].on_committed)
                await self.store.write(op)
                moved += len(moves)
            if back:
                # messages whose source queue is gone stay in the DLQ; stop so we do not loop on them
                skipped += len(back)
                q.give_back(back)
                break
        return {"redriven": moved, "skipped": skipped}

    # ---------------------------------------------------------- consuming

    def consume(self, conn: Peer, cid: int, args: dict[str, Any], rid: int) -> dict[str, Any]:
        q = self._queue(args, rid, "queue")
        prefetch = args.get("prefetch", 100)
        if type(prefetch) is not int or not 1 <= prefetch <= MAX_PREFETCH:
            raise _err(f"prefetch must be 1..{MAX_PREFETCH}", ErrorCode.INVALID_ARGUMENT, rid)
        if cid in conn.consumers:
            raise _err(f"consumer id {cid} is already in use", ErrorCode.INVALID_ARGUMENT, rid)
        c = Consumer(conn, cid, q, prefetch)
        conn.consumers[cid] = c
        q.attach(c)
        return {"queue": q.name, "prefetch": prefetch, "ack_deadline": q.cfg.ack_deadline}

    def stop(self, conn: Peer, cid: int, rid: int) -> None:
        c = conn.consumers.pop(cid, None)
        if c is None:
            raise _err(f"no consumer {cid}", ErrorCode.NOT_FOUND, rid)
        c.close()

    def settle(self, conn: Peer, ev: F.Ack) -> None:
        c = conn.consumers.get(ev.cid)
        if c is None:
            if ev.rid:
                raise _err(f"no consumer {ev.cid}", ErrorCode.NOT_FOUND, ev.rid)
            return
        member = c if isinstance(c, Member) else None
        needs = member.group.needs(member, ev.items) if ev.rid and member is not None else None
        codes = c.settle(ev.items)
        if ev.rid:
            rid = ev.rid

            def answer(error: Exception | None) -> None:
                # Answered only once the settlement is committed; items that
                # were applied (code 0) carry the store's error if it failed.
                out = codes
                if error is not None:
                    if isinstance(error, RemoteProtocolError):  # voided before it was committed
                        code = int(error.code)
                    else:
                        code = int(ErrorCode.STORAGE_FULL if isinstance(error, StorageFull)
                                   else ErrorCode.STORAGE_ERROR)
                    out = [code if x == 0 else x for x in codes]
                conn.push_wire([F.Op.OK, rid, out], 16 + len(out))

            if member is not None:
                member.group.on_persisted(answer, needs, codes)
            elif isinstance(c, Consumer):
                c.queue.on_persisted(answer)
            else:
                answer(None)  # a stream reader: nothing to commit
        else:
            stale = sum(1 for x in codes if x)
            if stale:
                conn.push_wire([F.Op.NOTICE, V.NOTICE_STALE_ACKS, {"cid": ev.cid, "count": stale}])

    def detach_all(self, conn: Peer) -> None:
        for c in list(conn.consumers.values()):
            c.close()
        conn.consumers.clear()

    # ------------------------------------------------------- the catalog

    async def _catalog_poller(self) -> None:
        """Cluster mode: reload the queues when another broker changed the catalog."""
        backoff = 0.0
        while True:
            await anyio.sleep(backoff or CATALOG_POLL)
            try:
                await self.sync_catalog()
            except StorageError as exc:
                backoff = self.ctx.read_failed(backoff, exc, "catalog")
            else:
                backoff = 0.0

    async def sync_catalog(self) -> bool:
        """Cluster mode: if the catalog version moved, start the queues declared
        elsewhere, take changed settings and bindings, close deleted ones (through the
        paths recovery and update use). Returns whether anything changed here.
        Raises StorageError."""
        async with self._catalog_lock:
            return await self._sync_locked()

    async def _sync_locked(self) -> bool:
        version = await self.store.catalog_version()  # type: ignore[attr-defined]
        if version == self._catalog_version:
            return False
        rows = await self.store.load_queues()
        changed = False
        stored = {name: QueueConfig.from_args(conf, stored=True) for name, conf, _ in rows}
        for name, qc in stored.items():
            q = self.queues.get(name)
            if q is None:
                if name in self.streams.streams:
                    continue
                await self._start_queue(qc, await self.store.count(name))
                changed = True
            elif q.cfg != qc:
                async with self._updating:
                    if q.cfg.bind != qc.bind or q.cfg.bind_filters != qc.bind_filters:
                        remove_bindings(self.bindings, self.filtered, q)
                        q.reconfigure(qc)
                        add_bindings(self.bindings, self.filtered, q)
                        changed = True
                    else:
                        q.reconfigure(qc)
        for name, q in list(self.queues.items()):
            if name not in stored:
                q.close("queue deleted")
                remove_bindings(self.bindings, self.filtered, q)
                del self.queues[name]
                changed = True
        changed = await self._sync_streams() or changed
        self._catalog_version = version
        if changed:
            self.broker.bindings_changed()
        return changed

    async def _sync_streams(self) -> bool:
        """The streams' part of :meth:`sync_catalog` (Streams.recover starts a new one)."""
        streams = self.streams.streams
        stored = {name: conf for name, conf, _ in await self.store.load_streams()}
        changed = False
        for name, conf in stored.items():
            st = streams.get(name)
            if st is None:
                if name not in self.queues:
                    await self.streams.recover(name, conf)
                    changed = True
                continue
            cfg = StreamConfig.from_args(conf, stored=True)
            if cfg != st.cfg:
                if cfg.bind != st.cfg.bind or cfg.bind_filters != st.cfg.bind_filters:
                    remove_bindings(self.bindings, self.filtered, st)
                    st.cfg = cfg
                    add_bindings(self.bindings, self.filtered, st)
                    changed = True
                else:
                    st.cfg = cfg
                for g in st.groups.values():
                    g.wake()
        for name, st in list(streams.items()):
            if name not in stored:
                st.close("stream deleted")
                remove_bindings(self.bindings, self.filtered, st)
                del streams[name]
                changed = True
        return changed

    # ------------------------------------------------------------- calls

    def calls(self) -> dict[str, Callable[..., Any]]:
        return {
            "queue.declare": self.declare,
            "queue.delete": self.delete,
            "queue.update": self.update,
            "queue.purge": self.purge,
            "queue.list": lambda args, rid: self.list_queues(),
            "queue.info": lambda args, rid: self._queue(args, rid).info(),
            "queue.peek": self.dlq_list,  # any queue's stored messages, left in place (`tidings queues peek`)
            "dlq.list": self.dlq_list,
            "dlq.count": lambda args, rid: {"count": self._queue(args, rid).count},
            "dlq.redrive": self.redrive,
            "dlq.purge": self.purge,
            **self.streams.calls(),
            "stream.delete": self.delete_stream,
        } | (self._synced_calls() if self.cluster else {})

    def _synced_calls(self) -> dict[str, Callable[..., Any]]:
        """Cluster mode: each catalog change runs under the catalog lock, after a catalog
        read (a name declared on another broker a moment ago is known first), so the
        poll (sync_catalog) never starts or drops a queue or stream half-way through it."""
        def synced(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def call(args: dict[str, Any], rid: int) -> Any:
                async with self._catalog_lock:
                    await self._sync_locked()
                    return await fn(args, rid)
            return call
        return {"queue.declare": synced(self.declare), "queue.delete": synced(self.delete),
                "queue.update": synced(self.update), "stream.declare": synced(self.streams.declare),
                "stream.delete": synced(self.delete_stream), "stream.update": synced(self.streams.update)}

    async def delete_stream(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Delete a stream and, unless ``keep_dlq``, its dead-letter queue (when
        no other queue or stream dead-letters into it)."""
        dl = self.dead_letter_to_delete(args, "stream")
        out = await self.streams.delete(args, rid)
        if dl is not None and dl in self.queues:
            out["dead_letter"] = await self.delete_dead_letter(dl)
        return out
