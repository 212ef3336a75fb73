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
from tidings.broker.durable.store.streams import StreamRow

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext
    from tidings.broker.durable.ports import Peer
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
                r = result_dict(result)
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
        offsets are dense. Returns whether any entry was accepted.

        Hot path (one call per PUB batch): what depends only on the targets
        (which are queues, which streams, their TTL and length limits, the
        batch's row list per queue) is worked out once per distinct target
        list (:meth:`_plan`); per message there is then a row per target and
        the confirm item, whose result is the bare id when the message went
        to one queue and nowhere else (docs/PROTOCOL.md 7.8; :func:`result_dict`)."""
        ctx = self.ctx
        next_id = ctx.next_id
        now = ctx.now_ms()
        confirms = batch.early
        outcome = batch.outcome
        rows = batch.rows
        srows = batch.srows
        dedup = batch.dedup
        done = batch.done
        # the bare-id confirm only for clients that announced they read it (HELLO confirm_ids)
        bare_ids = getattr(batch.conn, "confirm_ids", False)
        reserved: dict[QueueActor, int] = {}
        seen_now: set[str] = set()
        plans: dict[int, _Plan] = {}
        shared = self.streams.shared  # cluster: offsets are given at commit, results fixed up then
        results = batch.dedup_results if shared else None  # and the de-dup records re-encoded
        for m, targets in entries:
            seq = m[F.P_SEQ]
            opts = m[F.P_OPTS]
            if opts:
                msg_id = opts.get(F.OPT_MSG_ID)
                key = dedup_key(scope, msg_id) if msg_id is not None else None
            else:
                opts = _NO_OPTS
                msg_id = key = None
            if key is not None and (key in known or key in seen_now):
                self.duplicates += 1
                prior = known.get(key) or self._recent.get(key, (0, b""))[1]
                res = result_dict(msgpack.unpackb(prior)) if prior else {}
                outcome.setdefault(key, (0, dict(res)))
                if seq:
                    res["duplicate"] = True
                    confirms.append([seq, 0, res])
                continue
            plan = plans.get(id(targets))
            if plan is None:
                plan = plans[id(targets)] = self._plan(batch, targets)
            queues, streams, limited = plan
            if limited:
                full = None
                for q, max_length in limited:
                    if q.count + reserved.get(q, 0) >= max_length:
                        full = q
                        break
                if full is not None:
                    why = f"queue {full.name!r} is at its max_length {full.cfg.max_length}"
                    if seq:
                        confirms.append([seq, int(ErrorCode.QUEUE_FULL), why])
                    if key is not None:
                        outcome.setdefault(key, (int(ErrorCode.QUEUE_FULL), why))
                    continue
                for q, _ml in limited:
                    reserved[q] = reserved.get(q, 0) + 1
            mid = next_id()
            avail = now
            if opts:
                if F.OPT_DELAY in opts:
                    avail = now + opts[F.OPT_DELAY]
                if F.OPT_AT in opts:
                    avail = max(avail, opts[F.OPT_AT])
                ttl_opt = opts.get(F.OPT_TTL)
            else:
                ttl_opt = None
            subject, payload, headers = m[F.P_SUBJECT], m[F.P_PAYLOAD], m[F.P_HEADERS]
            for q, qrows, ttl, prioritized in queues:
                if ttl_opt is not None:
                    ttl = ttl_opt
                row = StoredMessage(q.name, mid, subject, payload, headers, msg_id,
                                    now, avail, None if ttl is None else now + ttl, 0, None)
                if prioritized:
                    row.priority = q.cfg.priority_of(opts.get(F.OPT_PRIORITY))
                qrows.append(row)
                rows.append(row)
            result: int | dict[str, Any] | None
            if bare_ids and not streams and len(queues) == 1:
                result = mid  # the common case: {"id": mid, "queues": 1} on the wire as the bare id
            else:
                result = None
                pkey = opts.get(F.OPT_KEY)
                for st, parts in streams:
                    # The partition's next offset, taken here with no await until the operation
                    # is queued (dense offsets in commit order; see the module docstring).
                    part = st.pick(pkey)
                    off = part.next
                    part.next = off + 1
                    index = part.index
                    srow = StreamRow(st.name, index, off, subject, pkey, payload, headers, msg_id, now)
                    srows.append(srow)
                    lst = parts.get(index)
                    if lst is None:
                        parts[index] = [srow]
                    else:
                        lst.append(srow)
                    if result is None:
                        result = {"id": mid, "queues": len(queues), "stream": st.name, "partition": index,
                                  "offset": off}
                    else:
                        result.setdefault("streams", []).append([st.name, index, off])
                if result is None:
                    result = {"id": mid, "queues": len(queues)}
                elif shared:  # this message's stream rows are the last len(streams) of srows
                    batch.fixups.append((result, srows[-len(streams):]))
            if key is not None:
                seen_now.add(key)
                packed = msgpack.packb(result)
                dedup.append((key, now + self.dedup_window_ms, packed))
                if results is not None:
                    results.append(result)
                if len(self._recent) < RECENT_LIMIT:
                    self._recent[key] = (now + self.dedup_window_ms, packed)
                batch.deferred.add(key)
                outcome[key] = (0, result)
            batch.accepted += 1
            if seq:
                done.append([seq, 0, result])
        return batch.accepted > 0

    @staticmethod
    def _plan(batch: _Batch, targets: list[Any]) -> _Plan:
        """What a message with these targets needs, worked out once per batch and
        target list: per queue (queue, the batch's row list for it, default TTL in
        ms, whether it is a priority queue); per stream (stream, the batch's rows by
        partition); the queues whose max_length refuses (overflow "reject")."""
        queues: list[tuple[QueueActor, list[StoredMessage], int | None, bool]] = []
        streams: list[tuple[StreamActor, dict[int, list[StreamRow]]]] = []
        limited: list[tuple[QueueActor, int]] = []
        for t in targets:
            if isinstance(t, QueueActor):  # (a PriorityQueueActor is one too)
                cfg = t.cfg
                qrows = batch.by_queue.get(t)
                if qrows is None:
                    qrows = batch.by_queue[t] = []
                ttl = None if cfg.message_ttl is None else int(cfg.message_ttl * 1000)
                queues.append((t, qrows, ttl, bool(cfg.max_priority)))
                if cfg.max_length is not None and cfg.overflow == "reject":
                    limited.append((t, cfg.max_length))
            else:
                parts = batch.by_stream.get(t)
                if parts is None:
                    parts = batch.by_stream[t] = {}
                streams.append((t, parts))
        return queues, streams, limited

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
            on_offsets = None
            if batch.dedup_results and batch.srows:
                on_offsets = lambda: self._dedup_with_offsets(batch)  # noqa: E731
            self.store.submit_nowait(PutMessages(batch.rows, batch.dedup, done, stream_rows=batch.srows,
                                                 on_offsets=on_offsets))
        except (StorageError, anyio.WouldBlock) as exc:  # closing (or a bug): nothing was stored
            code = ErrorCode.SHUTTING_DOWN if self.shutting_down() else ErrorCode.STORAGE_ERROR
            outcome = batch.outcome
            for mid in mine:
                batch.deferred.discard(mid)
                outcome[mid] = (int(code), f"not stored: {exc}")
            done_err = [[item[0], int(code), f"not stored: {exc}"] for item in batch.done]
            self._confirm(batch.conn, list(batch.early) + done_err)
            for mid_entry in batch.dedup:
                self._recent.pop(mid_entry[0], None)  # never stored: a resend must be stored, not deduplicated
            # Nothing was queued and nothing awaited since these offsets were
            # assigned, so they are the newest of their partitions: hand them
            # out again rather than leave gaps (the store never saw them).
            for st, parts in batch.by_stream.items():
                for index, srs in parts.items():
                    st.partitions[index].next = srs[0].offset  # rows are in offset order per partition

    def _dedup_with_offsets(self, batch: _Batch) -> list[tuple[str, int, bytes]]:
        """Cluster mode, inside the commit transaction: the batch's de-dup records
        encoded again with the offsets the store has just given its stream rows."""
        _final_offsets(batch)
        out = []
        for (key, expires, _old), res in zip(batch.dedup, batch.dedup_results):
            packed = msgpack.packb(res)
            out.append((key, expires, packed))
            if key in self._recent:
                self._recent[key] = (expires, packed)
        return out

    def _committed(self, batch: _Batch, mine: list[str]) -> None:
        """The commit callback: confirm every entry (and the copies that waited
        for its msg_id), then hand the committed rows to their queues and streams."""
        if self.streams.shared:  # the store gave the stream rows their offsets at commit
            _final_offsets(batch)
        for mid in mine:
            self._release(mid, *batch.outcome[mid])
        early = batch.early
        self.confirmed += batch.accepted
        self._confirm(batch.conn, early + batch.done if early else batch.done)
        for q, qrows in batch.by_queue.items():
            if qrows:
                q.on_committed(qrows)
        for st, parts in batch.by_stream.items():
            if parts:
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
        for item in batch.done:
            out.append([item[0], int(code), f"not stored: {error}"])
        for mid_entry in batch.dedup:
            self._recent.pop(mid_entry[0], None)
        self._confirm(batch.conn, out)
        # Offsets assigned to this batch were never stored: the streams'
        # partitions must not wait for them, and a restart must not
        # assign them again (nothing stored says they were used).
        if self.streams.shared:  # offsets are taken at commit: a failed one took none
            return
        nexts: dict[tuple[str, int], int] = {}
        for sr in batch.srows:  # in assignment order, as before
            st = batch.stream_of(sr.stream)
            st.partitions[sr.partition].skip(sr.offset)
            st.on_committed({})
            nexts[(st.name, sr.partition)] = sr.offset + 1
        if nexts:
            self.streams.mark_next([(s, p, n) for (s, p), n in nexts.items()])

    @staticmethod
    def _confirm(conn: Peer, items: list[Any]) -> None:
        if items:
            conn.push_wire([F.Op.CONFIRM, items], 24 * len(items))


def _final_offsets(batch: _Batch) -> None:
    """Cluster mode: put the offsets the store allocated at commit into the results
    (confirms, and the copies waiting on a msg_id, read them)."""
    for res, srs in batch.fixups:
        first = srs[0]
        res["partition"], res["offset"] = first.partition, first.offset
        if len(srs) > 1:
            res["streams"] = [[sr.stream, sr.partition, sr.offset] for sr in srs[1:]]


class _Batch:
    """One publish's store operation and what its confirms need: built by
    ``Admission._assign``, queued by ``_queue_batch``, answered from the commit."""

    __slots__ = ("conn", "admitted", "early", "outcome", "deferred", "rows", "srows", "dedup", "accepted",
                 "done", "by_queue", "by_stream", "dedup_results", "fixups")

    def __init__(self, conn: Peer, admitted: float) -> None:
        self.conn = conn
        self.admitted = admitted  # perf_counter at admission, for the confirm latency
        self.early: list[Any] = []  # confirms decided before the commit (duplicates, full queues)
        self.outcome: dict[str, tuple[int, Any]] = {}  # dedup key -> (code, result) for waiting copies
        self.deferred: set[str] = set()  # dedup keys whose waiters the commit callback answers
        self.rows: list[StoredMessage] = []  # queue rows
        self.srows: list[StreamRow] = []  # stream rows
        self.dedup: list[tuple[str, int, bytes]] = []  # (key, expires_ms, packed result)
        self.accepted = 0  # entries stored by this operation
        self.done: list[list[Any]] = []  # their confirm items [seq, 0, result] (seq > 0 only)
        self.by_queue: dict[QueueActor, list[StoredMessage]] = {}  # the rows again, per queue
        self.by_stream: dict[StreamActor, dict[int, list[StreamRow]]] = {}  # and per stream and partition
        self.dedup_results: list[Any] = []  # cluster mode: each dedup entry's result
        self.fixups: list[tuple[dict[str, Any], list[StreamRow]]] = []  # cluster: results with stream rows

    def stream_of(self, name: str) -> StreamActor:
        return next(st for st in self.by_stream if st.name == name)


_Plan = tuple[list[tuple[QueueActor, list[StoredMessage], "int | None", bool]],
              list[tuple["StreamActor", dict[int, list["StreamRow"]]]], list[tuple[QueueActor, int]]]
_NO_OPTS: Final[dict[str, Any]] = {}


def result_dict(result: Any) -> dict[str, Any]:
    """A confirm result (or a stored de-dup result) as a new dict: the bare id form
    means ``{"id": id, "queues": 1}``."""
    if isinstance(result, dict):
        return dict(result)
    if isinstance(result, int):
        return {"id": result, "queues": 1}
    return {}
