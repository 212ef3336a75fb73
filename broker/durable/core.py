"""The durable layer: queues, their bindings, confirms, dead-lettering, DLQ tools.

``Durable`` owns the storage actor and one ``QueueActor`` per queue. A
publish whose subject matches bound queues is admitted here (de-duplicated,
checked against max-length), written as one store operation covering every
target queue, and confirmed to the publisher only from the store's
commit callback, which also hands the committed rows to the queue actors.
Message ids are assigned at the moment an operation enters the store's
mailbox, so commit order equals id order.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio
import msgpack
from anyio.abc import TaskGroup

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol import numbers as N
from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.router import Router
from tidings.broker.durable.context import DurableContext
from tidings.broker.durable.group import Member
from tidings.broker.durable.deadletter import DeadLetters, may_create_on_demand, redriven_headers
from tidings.broker.durable.partition import Partition
from tidings.broker.durable.queue import Consumer, QueueActor
from tidings.broker.durable.settings import QueueConfig, validate_name
from tidings.broker.durable.store.base import (
    DeleteQueue,
    ExpireDedup,
    PutMessages,
    PutQueue,
    StorageError,
    StorageFull,
    StoredMessage,
)
from tidings.broker.durable.store.sqlite import SqliteStore
from tidings.broker.durable.store.streams import StreamRow
from tidings.broker.durable.stream import StreamActor
from tidings.broker.durable.streams import Streams
from tidings.broker.durable.window import WindowBudget

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Host, Peer

log = logging.getLogger(__name__)

MAX_PREFETCH: Final = N.MAX_PREFETCH  # deliveries one consumer may hold unacked (checked when CONSUME is decoded)
DEDUP_SWEEP: Final = 30.0  # seconds between sweeps of expired de-duplication entries
REDRIVE_CHUNK: Final = 5_000  # messages moved per transaction by a redrive
RECENT_LIMIT: Final = 100_000  # in-memory de-dup entries for publishes not yet swept (bounded)


def _err(msg: str, code: ErrorCode, rid: int = 0) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


def dedup_key(user: str, msg_id: str) -> str:
    """The de-duplication key of ``msg_id`` published by ``user``: ids are
    scoped per user, so one user's msg_id never makes another user's publish
    a duplicate nor answers it with the first one's result (ids, offsets).

    User names never hold a space (broker/auth.py USER_NAME), so the key is
    unambiguous. In no-users mode there is one identity (``""``) and the key
    is the bare msg_id, as it was before scoping: entries stored by an older
    version keep de-duplicating across an upgrade."""
    return f"{user} {msg_id}" if user else msg_id


class Durable:
    def __init__(self, broker: Host) -> None:
        self.broker = broker
        cfg = broker.config
        self.store = SqliteStore(os.path.join(cfg.data_dir, "tidings.db"), durability=cfg.durability,
                                 max_page_count=cfg.max_db_pages or None,
                                 stall_timeout=cfg.store_stall_timeout)
        self.window_budget = WindowBudget(cfg.window_memory)  # shared by every queue, group and reader
        # What every queue, group and reader actor is given instead of this object.
        self.ctx = DurableContext(self.store, self.window_budget)
        self.now_ms = self.ctx.now_ms
        self.queues: dict[str, QueueActor] = {}
        self.dead_letters = self.ctx.dead_letters = DeadLetters(self.ctx, self.queues, self._start_queue)
        self.bindings: Router[Any] = Router()  # QueueActor and StreamActor targets
        self.streams = Streams(self.ctx, broker, self.queues, self.bindings, self.dead_letters)
        self._tg: TaskGroup | None = None
        self._recent: dict[str, tuple[int, bytes]] = {}  # dedup_key -> (expires_ms, result), until swept
        self._pending_ids: dict[str, list[tuple[Any, int]]] = {}  # dedup_key being stored -> waiting copies
        self.dedup_window_ms = int(cfg.dedup_window * 1000)
        self.confirmed = 0
        self.duplicates = 0
        # Metrics hook: called once per committed publish batch with its admission-to-confirm seconds.
        self.on_confirm_latency: Callable[[float], None] | None = None

    # ------------------------------------------------------------ counters

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
        self.ctx.last_id = await self.store.max_message_id()
        for name, conf, _created in await self.store.load_queues():
            qc = QueueConfig.from_args(conf)
            count = await self.store.count(name)
            await self._start_queue(qc, count)
        await self.streams.start(tg)
        tg.start_soon(self._sweeper)
        log.info("recovered %d queues (%d messages) and %d streams", len(self.queues),
                 sum(q.count for q in self.queues.values()), len(self.streams.streams))

    async def close(self) -> None:
        self.streams.stop()
        for q in self.queues.values():
            q.stop()
        await self.store.close()

    async def _start_queue(self, qc: QueueConfig, count: int) -> QueueActor:
        q = QueueActor(self.ctx, qc, count)
        self.queues[qc.name] = q
        for p in qc.bind:
            self.bindings.add(p, q)
        assert self._tg is not None
        await self._tg.start(q.run)
        return q

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(DEDUP_SWEEP)
            now = self.now_ms()
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
            await self.store.submit(ExpireDedup(now))

    # ------------------------------------------------------------- publish

    def match(self, subject: str) -> list[Any]:
        return self.bindings.match(subject)[0]

    def binding_patterns(self) -> list[str]:
        return sorted({p for q in self.queues.values() for p in q.cfg.bind} | self.streams.patterns())

    async def publish(self, conn: Peer, entries: list[tuple[list[Any], list[Any]]]) -> None:
        """Store each (PUB message, targets) entry -- queues and streams -- in
        one store operation, and confirm each after the commit.

        The steps, in order: :meth:`_claim_ids` (a msg_id already being stored
        is not raced), :meth:`_prior_results` (a msg_id stored before is
        answered, not stored again), room in the store's mailbox, then
        :meth:`_assign` and :meth:`_queue_batch` with no await between them
        (ids and offsets in commit order), and :meth:`_committed` or
        :meth:`_not_stored` from the store's commit callback (confirms only
        after the commit)."""
        admitted = time.perf_counter()
        scope = conn.user.name
        entries, mine = self._claim_ids(conn, entries, scope)
        batch = _Batch(conn, admitted)
        try:
            known = await self._prior_results(batch, entries, scope)
            if known is None:
                return
            # Ids and offsets are assigned only once the store has room, with no
            # await until the operation is queued: queue order == id order ==
            # commit order, which keeps stream offsets dense and in order.
            await self.store.wait_for_space()
            if self._assign(batch, entries, known, scope):
                self._queue_batch(batch)
            else:
                self._confirm(conn, batch.early)
        finally:
            outcome = batch.outcome
            for mid in mine:
                if mid not in batch.deferred:
                    self._release(mid, *outcome.get(mid, (int(ErrorCode.STORAGE_ERROR), "not stored")))

    def _claim_ids(self, conn: Peer, entries: list[tuple[list[Any], list[Any]]],
                   scope: str) -> tuple[list[tuple[list[Any], list[Any]]], list[str]]:
        """De-duplication of concurrent copies: returns the entries to store and
        the msg_ids this publish now stores. A msg_id another publish is still
        storing (its commit not done yet) is not raced: this copy waits and is
        answered with that publish's outcome (:meth:`_release`)."""
        mine: list[str] = []
        kept = []
        pending = self._pending_ids
        for e in entries:
            o = e[0][F.P_OPTS]
            mid = o.get(F.OPT_MSG_ID) if o else None
            if mid is not None:
                mid = dedup_key(scope, mid)
                waiting = pending.get(mid)
                if waiting is not None:
                    waiting.append((conn, e[0][F.P_SEQ]))
                    continue
                pending[mid] = []
                mine.append(mid)
            kept.append(e)
        return kept, mine

    def _release(self, mid: str, code: int, result: Any) -> None:
        """Answer the publishes that waited for ``mid``'s first publish."""
        for fconn, fseq in self._pending_ids.pop(mid, ()):
            if code == 0:
                self.duplicates += 1
                r = dict(result) if isinstance(result, dict) else {}
                r["duplicate"] = True
                item = [fseq, 0, r]
            else:
                item = [fseq, code, result]
            if fseq:
                fconn.push_wire([F.Op.CONFIRM, [item]], 64)

    async def _prior_results(self, batch: _Batch, entries: list[tuple[list[Any], list[Any]]],
                             scope: str) -> dict[str, bytes] | None:
        """De-duplication against earlier publishes: the stored result of each
        msg_id published within the de-dup window (memory first, then the
        store). None if the store could not answer: every entry has then been
        refused with STORAGE_ERROR. Awaits, so it runs before any id is assigned."""
        # Ids the publisher vouches are new (client-generated, first send) are
        # recorded for later resends but need no look-up now.
        with_ids = [dedup_key(scope, m[F.P_OPTS][F.OPT_MSG_ID]) for m, _ in entries
                    if m[F.P_OPTS] and F.OPT_MSG_ID in m[F.P_OPTS] and not m[F.P_OPTS].get(F.OPT_NEW)]
        known: dict[str, bytes] = {}
        if not with_ids:
            return known
        now = self.now_ms()
        missing = []
        for i in with_ids:
            hit = self._recent.get(i)
            if hit is not None and hit[0] > now:
                known[i] = hit[1]
            else:
                missing.append(i)
        if missing:
            try:
                known.update(await self.store.check_dedup(missing, now))
            except StorageError as exc:
                confirms = batch.early
                for m, _ in entries:
                    if m[F.P_SEQ]:
                        confirms.append([m[F.P_SEQ], int(ErrorCode.STORAGE_ERROR), str(exc)])
                self._confirm(batch.conn, confirms)
                return None
        return known

    def _assign(self, batch: _Batch, entries: list[tuple[list[Any], list[Any]]], known: dict[str, bytes],
                scope: str) -> bool:
        """Admission, ids and offsets, rows: answers duplicates and publishes a
        full queue refuses (``batch.early``), gives every other entry its
        message id and, per stream target, its partition offset, and builds
        the rows and de-dup records of one store operation. A plain function:
        nothing awaits between the first id and the caller queueing the
        operation (:meth:`_queue_batch`), so commit order is id order and
        offsets are dense. Returns whether any entry was accepted."""
        ctx = self.ctx
        now = ctx.now_ms()
        confirms = batch.early
        outcome = batch.outcome
        deferred = batch.deferred
        rows = batch.rows
        srows = batch.srows
        dedup = batch.dedup
        accepted = batch.accepted
        reserved: dict[QueueActor, int] = {}
        seen_now: set[str] = set()
        streams = self.streams
        for m, targets in entries:
            seq = m[F.P_SEQ]
            opts = m[F.P_OPTS] or {}
            msg_id = opts.get(F.OPT_MSG_ID)
            key = dedup_key(scope, msg_id) if msg_id is not None else None
            if key is not None and (key in known or key in seen_now):
                self.duplicates += 1
                prior = known.get(key) or self._recent.get(key, (0, b""))[1]
                res = msgpack.unpackb(prior) if prior else {}
                res = dict(res) if isinstance(res, dict) else {}
                outcome.setdefault(key, (0, dict(res)))
                if seq:
                    res["duplicate"] = True
                    confirms.append([seq, 0, res])
                continue
            full = None
            for q in targets:
                if type(q) is not QueueActor:
                    continue
                ml = q.cfg.max_length
                if ml is not None and q.cfg.overflow == "reject" and q.count + reserved.get(q, 0) >= ml:
                    full = q
                    break
            if full is not None:
                why = f"queue {full.name!r} is at its max_length {full.cfg.max_length}"
                if seq:
                    confirms.append([seq, int(ErrorCode.QUEUE_FULL), why])
                if key is not None:
                    outcome.setdefault(key, (int(ErrorCode.QUEUE_FULL), why))
                continue
            mid = ctx.next_id()
            avail = now
            if F.OPT_DELAY in opts:
                avail = now + opts[F.OPT_DELAY]
            if F.OPT_AT in opts:
                avail = max(avail, opts[F.OPT_AT])
            qrows: list[tuple[QueueActor, StoredMessage]] = []
            stream_rows: list[tuple[StreamActor, StreamRow]] = []
            result: dict[str, Any] = {"id": mid, "queues": 0}
            for t in targets:
                if type(t) is QueueActor:
                    ttl = opts.get(F.OPT_TTL)
                    if ttl is None and t.cfg.message_ttl is not None:
                        ttl = int(t.cfg.message_ttl * 1000)
                    row = StoredMessage(t.name, mid, m[F.P_SUBJECT], m[F.P_PAYLOAD], m[F.P_HEADERS], msg_id,
                                        now, avail, (now + ttl) if ttl is not None else None, 0, None)
                    qrows.append((t, row))
                    rows.append(row)
                    reserved[t] = reserved.get(t, 0) + 1
                    result["queues"] += 1
                else:
                    srow = streams.row(t, m, opts.get(F.OPT_KEY), msg_id, now)
                    stream_rows.append((t, srow))
                    srows.append(srow)
                    if "stream" not in result:
                        result["stream"] = t.name
                        result["partition"] = srow.partition
                        result["offset"] = srow.offset
                    else:
                        result.setdefault("streams", []).append([t.name, srow.partition, srow.offset])
            if key is not None:
                seen_now.add(key)
                packed = msgpack.packb(result)
                dedup.append((key, now + self.dedup_window_ms, packed))
                if len(self._recent) < RECENT_LIMIT:
                    self._recent[key] = (now + self.dedup_window_ms, packed)
            accepted.append((seq, result, qrows, stream_rows))
            if key is not None:
                deferred.add(key)
                outcome[key] = (0, result)
        return bool(accepted)

    def _queue_batch(self, batch: _Batch) -> None:
        """Queue the batch's one store operation (never waits: the caller made
        room). If the store refuses it, nothing was stored: every accepted entry
        is refused, its de-dup record dropped and its offsets handed out again."""
        mine = list(batch.deferred)

        def done(error: Exception | None) -> None:
            if error is None:
                self._committed(batch, mine)
            else:
                self._not_stored(batch, mine, error)

        try:
            self.store.submit_nowait(PutMessages(batch.rows, batch.dedup, done, stream_rows=batch.srows))
        except (StorageError, anyio.WouldBlock) as exc:  # closing (or a bug): nothing was stored
            code = ErrorCode.SHUTTING_DOWN if self.broker.shutting_down else ErrorCode.STORAGE_ERROR
            outcome = batch.outcome
            for mid in mine:
                batch.deferred.discard(mid)
                outcome[mid] = (int(code), f"not stored: {exc}")
            done_err = [[seq, int(code), f"not stored: {exc}"] for seq, *_ in batch.accepted if seq]
            self._confirm(batch.conn, list(batch.early) + done_err)
            for mid_entry in batch.dedup:
                self._recent.pop(mid_entry[0], None)  # never stored: a resend must be stored, not deduplicated
            # Nothing was queued and nothing awaited since these offsets were
            # assigned, so they are the newest of their partitions: hand them
            # out again rather than leave gaps (the store never saw them).
            lowest: dict[Partition, int] = {}
            for _seq, _res, _q, srs in batch.accepted:
                for st, sr in srs:
                    part = st.partitions[sr.partition]
                    if sr.offset < lowest.get(part, sr.offset + 1):
                        lowest[part] = sr.offset
            for part, off in lowest.items():
                part.next = off

    def _committed(self, batch: _Batch, mine: list[str]) -> None:
        """The commit callback: confirm every entry (and the copies that waited
        for its msg_id), then hand the committed rows to their queues and streams."""
        for mid in mine:
            self._release(mid, *batch.outcome[mid])
        out = list(batch.early)
        by_queue: dict[QueueActor, list[StoredMessage]] = {}
        by_stream: dict[StreamActor, dict[int, list[StreamRow]]] = {}
        for seq, res, qrs, srs in batch.accepted:
            if seq:
                out.append([seq, 0, res])
            for q, row in qrs:
                lst = by_queue.get(q)
                if lst is None:
                    by_queue[q] = [row]
                else:
                    lst.append(row)
            for st, sr in srs:
                by_stream.setdefault(st, {}).setdefault(sr.partition, []).append(sr)
        self.confirmed += len(batch.accepted)
        self._confirm(batch.conn, out)
        for q, qrows_ in by_queue.items():
            q.on_committed(qrows_)
        for st, parts in by_stream.items():
            st.on_committed(parts)
        if self.on_confirm_latency is not None:
            self.on_confirm_latency(time.perf_counter() - batch.admitted)

    def _not_stored(self, batch: _Batch, mine: list[str], error: Exception) -> None:
        """The commit failed: refuse every accepted entry (STORAGE_FULL or
        STORAGE_ERROR), forget its de-dup record, and turn its stream offsets
        into gaps that are never assigned again."""
        for mid in mine:
            self._release(mid, int(ErrorCode.STORAGE_ERROR), f"not stored: {error}")
        out = list(batch.early)
        code = ErrorCode.STORAGE_FULL if isinstance(error, StorageFull) else ErrorCode.STORAGE_ERROR
        for seq, _res, _q, _s in batch.accepted:
            if seq:
                out.append([seq, int(code), f"not stored: {error}"])
        for mid_entry in batch.dedup:
            self._recent.pop(mid_entry[0], None)
        self._confirm(batch.conn, out)
        # Offsets assigned to this batch were never stored: the streams'
        # partitions must not wait for them, and a restart must not
        # assign them again (nothing stored says they were used).
        nexts: dict[tuple[str, int], int] = {}
        for _seq, _res, _q, srs in batch.accepted:
            for st, sr in srs:
                st.partitions[sr.partition].skip(sr.offset)
                st.on_committed({})
                nexts[(st.name, sr.partition)] = sr.offset + 1
        if nexts:
            self.streams.mark_next([(s, p, n) for (s, p), n in nexts.items()])

    @staticmethod
    def _confirm(conn: Peer, items: list[Any]) -> None:
        if items:
            conn.push_wire([F.Op.CONFIRM, items], 24 * len(items))

    # ------------------------------------------------------------- admin

    async def declare(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        qc = QueueConfig.from_args(args)
        existing = self.queues.get(qc.name)
        if existing is not None:
            if existing.cfg != qc:
                diff = [k for k, v in qc.to_dict().items() if existing.cfg.to_dict().get(k) != v]
                raise _err(f"queue {qc.name!r} exists with different settings ({', '.join(diff)}); "
                           "delete it first to change them", ErrorCode.CONFLICT, rid)
            return {"created": False, **existing.info()}
        self.broker.bindings.check_declare("queue", qc.name, qc.bind, rid)
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

    async def delete(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        q = self._queue(args, rid)
        users = [o.name for o in self.queues.values() if o.cfg.dead_letter == q.name and o is not q]
        if users:
            raise _err(f"queue {q.name!r} is the dead-letter queue of {', '.join(users)}", ErrorCode.CONFLICT, rid)
        q.close("queue deleted")
        for p in q.cfg.bind:
            self.bindings.remove(p, q)
        del self.queues[q.name]
        await self.store.write(DeleteQueue(q.name))
        self.broker.bindings_changed()
        return {"deleted": q.name, "messages": q.count}

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
                                    m.msg_id, m.published_ms, now, None, 0, None)
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

    # ------------------------------------------------------------- calls

    def calls(self) -> dict[str, Callable[..., Any]]:
        return {
            "queue.declare": self.declare,
            "queue.delete": self.delete,
            "queue.purge": self.purge,
            "queue.list": lambda args, rid: self.list_queues(),
            "queue.info": lambda args, rid: self._queue(args, rid).info(),
            "dlq.list": self.dlq_list,
            "dlq.count": lambda args, rid: {"count": self._queue(args, rid).count},
            "dlq.redrive": self.redrive,
            "dlq.purge": self.purge,
            **self.streams.calls(),
        }


class _Batch:
    """One publish's store operation and what its confirms need: built by
    ``Durable._assign``, queued by ``_queue_batch``, answered from the commit."""

    __slots__ = ("conn", "admitted", "early", "outcome", "deferred", "rows", "srows", "dedup", "accepted")

    def __init__(self, conn: Peer, admitted: float) -> None:
        self.conn = conn
        self.admitted = admitted  # perf_counter at admission, for the confirm latency
        self.early: list[Any] = []  # confirms decided before the commit (duplicates, full queues)
        self.outcome: dict[str, tuple[int, Any]] = {}  # dedup key -> (code, result) for waiting copies
        self.deferred: set[str] = set()  # dedup keys whose waiters the commit callback answers
        self.rows: list[StoredMessage] = []  # queue rows
        self.srows: list[StreamRow] = []  # stream rows
        self.dedup: list[tuple[str, int, bytes]] = []  # (key, expires_ms, packed result)
        # (seq, result, [(queue, row)], [(stream, row)]) per accepted entry
        self.accepted: list[tuple[int, dict[str, Any], list[tuple[QueueActor, StoredMessage]],
                                  list[tuple[StreamActor, StreamRow]]]] = []
