"""Admission of durable publishes: ``Admission.publish`` is where a PUB bound
for queues or streams becomes one store operation and, after its commit,
the publisher's confirms.

What it guarantees:

* de-duplication per user: a ``msg_id`` is scoped to the user who published
  it (:func:`dedup_key`); a copy of a msg_id already stored within the de-dup
  window, or still being stored, is answered with the first one's result
  (ids, offsets) and not stored again;
* ids and offsets in commit order: message ids and stream offsets are
  assigned only once the store has room, with no await until the store
  operation is queued, so queue order == id order == commit order and stream
  offsets stay dense;
* confirms only after the commit: each entry is confirmed (or refused) from
  the store's commit callback, which also hands the committed rows to their
  queues and streams; a publish a full queue refuses, or a duplicate, is
  answered at once.

``Durable`` (core.py) builds one; the broker (app.py) hands the connections'
durable publishes straight to :meth:`Admission.publish`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio
import msgpack

from tidings.protocol import frames as F
from tidings.protocol.errors import ErrorCode

from tidings.broker.durable.queue import QueueActor
from tidings.broker.durable.store.base import (
    ExpireDedup,
    PutMessages,
    StorageError,
    StorageFull,
    StoredMessage,
)

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext
    from tidings.broker.durable.partition import Partition
    from tidings.broker.durable.ports import Peer
    from tidings.broker.durable.store.streams import StreamRow
    from tidings.broker.durable.stream import StreamActor
    from tidings.broker.durable.streams import Streams

DEDUP_SWEEP: Final = 30.0  # seconds between sweeps of expired de-duplication entries
RECENT_LIMIT: Final = 100_000  # in-memory de-dup entries for publishes not yet swept (bounded)


def dedup_key(user: str, msg_id: str) -> str:
    """The de-duplication key of ``msg_id`` published by ``user``: ids are
    scoped per user, so one user's msg_id never makes another user's publish
    a duplicate nor answers it with the first one's result (ids, offsets).

    User names never hold a space (broker/auth.py USER_NAME), so the key is
    unambiguous. In no-users mode there is one identity (``""``) and the key
    is the bare msg_id, as it was before scoping: entries stored by an older
    version keep de-duplicating across an upgrade."""
    return f"{user} {msg_id}" if user else msg_id


class Admission:
    """Admits durable publishes (see the module docstring for what it
    guarantees): de-dup, ids and offsets, the store operation, confirms.

    Given only what it uses: the actors' context (clock, ids, store), the
    streams (offsets, rows, gaps), the de-dup window, and a callable saying
    whether the broker is shutting down."""

    def __init__(self, ctx: DurableContext, streams: Streams, dedup_window: float,
                 shutting_down: Callable[[], bool]) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.now_ms = ctx.now_ms
        self.streams = streams
        self.shutting_down = shutting_down
        self._recent: dict[str, tuple[int, bytes]] = {}  # dedup_key -> (expires_ms, result), until swept
        self._pending_ids: dict[str, list[tuple[Any, int]]] = {}  # dedup_key being stored -> waiting copies
        self.dedup_window_ms = int(dedup_window * 1000)
        self.confirmed = 0
        self.duplicates = 0
        # Metrics hook: called once per committed publish batch with its admission-to-confirm seconds.
        self.on_confirm_latency: Callable[[float], None] | None = None

    async def sweeper(self) -> None:
        """Forget expired de-dup entries, in memory and in the store, every DEDUP_SWEEP seconds."""
        while True:
            await anyio.sleep(DEDUP_SWEEP)
            now = self.now_ms()
            self._recent = {k: v for k, v in self._recent.items() if v[0] > now}
            await self.store.submit(ExpireDedup(now))

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
            if self.ctx.clustered and not await self._reserve_ids(conn, entries):
                return
            if self._assign(batch, entries, known, scope):
                self._queue_batch(batch)
            else:
                self._confirm(conn, batch.early)
        finally:
            outcome = batch.outcome
            for mid in mine:
                if mid not in batch.deferred:
                    self._release(mid, *outcome.get(mid, (int(ErrorCode.STORAGE_ERROR), "not stored")))

    async def _reserve_ids(self, conn: Peer, entries: list[tuple[list[Any], list[Any]]]) -> bool:
        """Cluster mode: ids come in blocks from the database (durable/ids.py). Wait
        until this batch's ids and the store's room are both there (no await
        after); False if no ids could be had: every entry was refused, retriable."""
        ctx = self.ctx
        n = len(entries)
        try:
            while ctx.left() < n:  # type: ignore[attr-defined]
                await ctx.reserve_ids(n)
                await self.store.wait_for_space()
        except StorageError as exc:
            self._confirm(conn, [[m[F.P_SEQ], int(ErrorCode.STORAGE_ERROR), str(exc)]
                                 for m, _ in entries if m[F.P_SEQ]])
            return False
        return True

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
                if not isinstance(q, QueueActor):  # (a PriorityQueueActor is one too)
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
                if isinstance(t, QueueActor):
                    ttl = opts.get(F.OPT_TTL)
                    if ttl is None and t.cfg.message_ttl is not None:
                        ttl = int(t.cfg.message_ttl * 1000)
                    row = StoredMessage(t.name, mid, m[F.P_SUBJECT], m[F.P_PAYLOAD], m[F.P_HEADERS], msg_id,
                                        now, avail, (now + ttl) if ttl is not None else None, 0, None)
                    if t.cfg.max_priority:
                        row.priority = t.cfg.priority_of(opts.get(F.OPT_PRIORITY))
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
            code = ErrorCode.SHUTTING_DOWN if self.shutting_down() else ErrorCode.STORAGE_ERROR
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


class _Batch:
    """One publish's store operation and what its confirms need: built by
    ``Admission._assign``, queued by ``_queue_batch``, answered from the commit."""

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
