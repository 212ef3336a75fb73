"""A stream's consumer groups: members, partition assignment, delivery, acks, offsets.

One :class:`GroupActor` per group. Where a group assigns partitions:
:meth:`GroupActor._rebalance` (partition i goes to member i mod n, and every
change starts a new generation, announced to each member with an
``assignment`` NOTICE). A partition is delivered in offset order to its
owner with a window of in-flight messages; acks advance the committed
offset contiguously (batched to the store). A failed delivery (nack or ack
deadline) rewinds the partition to that offset, in order; after
max_deliveries the message goes to the stream's dead-letter queue and the
partition moves on.

The actor gets a :class:`DurableContext` (store, budget, dead-letter sink,
counters) and reads its stream only through :class:`StreamView`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.durable.delivery import DELIVERY_OVERHEAD, push_deliveries
from tidings.broker.durable.partition import GAP, READ_PAGE
from tidings.broker.durable.store.base import StorageError, StorageFull
from tidings.broker.durable.store.streams import CommitOffsets, StreamRow
from tidings.broker.durable.window import MESSAGE_OVERHEAD, WINDOW_MIN

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Peer
    from tidings.broker.durable.context import DurableContext, StreamView

log = logging.getLogger(__name__)

#: Seconds a partition pauses after its copy to the DLQ (or an offset commit)
#: failed, before the message is delivered (and dead-lettered) again: no busy
#: loop on a full disk.
STORE_RETRY_DELAY: Final = 1.0


class Member:
    """A connection's membership in a consumer group (one consumer id)."""

    __slots__ = ("conn", "cid", "group", "window", "seq")

    def __init__(self, conn: Peer, cid: int, group: GroupActor, window: int, seq: int) -> None:
        self.conn = conn
        self.cid = cid
        self.group = group
        self.window = window
        self.seq = seq

    @property
    def source(self) -> str:
        return self.group.stream.name

    @property
    def group_name(self) -> str:
        return self.group.name

    def settle(self, items: list[list[Any]]) -> list[int]:
        return self.group.settle(self, items)

    def close(self) -> None:
        self.group.leave(self)


class PState:
    __slots__ = ("index", "owner", "gen", "committed", "cursor", "inflight", "acked", "attempts",
                 "paused_until", "buffer", "dirty", "reading", "persisted", "delivered", "delivered_saved",
                 "seen_below")

    def __init__(self, index: int, committed: int, delivered: int = 0) -> None:
        self.index = index
        self.owner: Member | None = None
        self.gen = 0
        self.committed = committed  # every offset below is acked (in memory)
        self.persisted = committed  # ... and this much of it is committed to the store
        self.delivered = max(delivered, committed)  # every offset below was delivered at least once
        self.delivered_saved = self.delivered
        self.seen_below = self.delivered  # from before a restart: a delivery below this is a redelivery
        self.cursor = committed
        self.inflight: dict[int, tuple[int, StreamRow]] = {}  # offset -> (delivery id, row)
        self.acked: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.paused_until = 0.0
        self.buffer: deque[StreamRow] = deque()
        self.dirty = False
        self.reading = False

    def reset(self) -> None:
        self.inflight.clear()
        self.acked.clear()
        self.buffer.clear()
        self.cursor = self.committed
        self.paused_until = 0.0


class GroupActor:
    def __init__(self, ctx: DurableContext, stream: StreamView, name: str,
                 offsets: dict[int, tuple[int, int]]) -> None:
        self.ctx = ctx
        self.stream = stream  # read only: its name, settings and partition logs
        self.name = name
        self.generation = 0
        self.members: list[Member] = []
        self._seq = 0
        self.parts = []
        for p in stream.partitions:
            c, d = offsets.get(p.index, (p.first, p.first))
            self.parts.append(PState(p.index, max(c, p.first), d))
        self._dids: dict[int, tuple[PState, int, int, Member, float]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._did = 0
        self._wake = anyio.Event()
        self._idle = False
        self._dirty = False
        self._stopped = False
        self.finished = anyio.Event()  # set when run() has returned: it submits nothing more
        self.delivered_count = 0
        self.dead_lettered = 0  # messages this group sent to the stream's dead-letter queue
        self.redelivered = 0
        self._out: dict[Member, list[Any]] = {}
        # Bytes read from disk into each partition's buffer, held against the broker's window
        # budget until that buffer is empty again (a group with members is one open window).
        self._charges: dict[PState, int] = {}
        self._held = 0
        self._open = False
        # (answer, {partition: highest offset the answer waits to see committed})
        self._persist_waiters: list[tuple[Callable[[Exception | None], None], dict[PState, int]]] = []
        # (dead-letter write, partition, offset, attempts): committed before the offsets passing it
        self.ops: list[Any] = []
        self._read_backoff = 0.0
        self._commit_retry_at = 0.0  # after a failed offset commit: when to try again

    def wake(self) -> None:
        self._dirty = True  # seen by the loop even if it is busy awaiting the store right now
        if self._idle:
            self._idle = False
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def close(self, reason: str) -> None:
        """The stream or the group is deleted: every member's consumer is closed and the actor stops."""
        for m in list(self.members):
            m.conn.end_consumer(m.cid, reason)
        self.stop()

    # ------------------------------------------------------------ members

    def join(self, conn: Peer, cid: int, window: int) -> Member:
        self._seq += 1
        m = Member(conn, cid, self, window, self._seq)
        self.members.append(m)
        if not self._open:
            self._open = True
            self.ctx.window_budget.open()
        self._rebalance()
        return m

    def leave(self, m: Member) -> None:
        if m in self.members:
            self.members.remove(m)
            if not self.members and self._open:
                self._open = False
                self.ctx.window_budget.close()
            self._rebalance()

    def _rebalance(self) -> None:
        self.generation += 1
        gen = self.generation
        ms = self.members
        for ps in self.parts:
            owner = ms[ps.index % len(ms)] if ms else None
            if owner is not ps.owner:
                # The old owner's delivery ids stay known until settled or expired,
                # so its acks are refused as STALE_GENERATION.
                ps.owner = owner
                ps.gen = gen
                ps.reset()
                if self._persist_waiters:  # out-of-order acks held in memory are gone
                    self._void_waiters(ps, ps.committed, ErrorCode.STALE_GENERATION,
                                       "the partition was reassigned before the ack was committed")
        for m in ms:
            mine = [ps.index for ps in self.parts if ps.owner is m]
            m.conn.push_wire([F.Op.NOTICE, V.NOTICE_ASSIGNMENT, {"cid": m.cid, "group": self.name,
                                                          "generation": gen, "partitions": mine}], 128)
        self.wake()

    # ---------------------------------------------------------- settling

    def settle(self, member: Member, items: list[list[Any]]) -> list[int]:
        codes = []
        mono = time.monotonic()
        cfg = self.stream.cfg
        for did, action, arg in items:
            entry = self._dids.get(did)
            if entry is None or entry[3] is not member:
                codes.append(int(ErrorCode.STALE_DELIVERY))
                continue
            ps, offset, gen, _m, _dl = entry
            if ps.owner is not member or gen < ps.gen:
                self._dids.pop(did, None)
                codes.append(int(ErrorCode.STALE_GENERATION))
                continue
            if action == F.AckAction.IN_PROGRESS:
                deadline = mono + cfg.ack_deadline
                self._dids[did] = (ps, offset, gen, member, deadline)
                heapq.heappush(self._deadlines, (deadline, did))
                codes.append(0)
                continue
            del self._dids[did]
            got = ps.inflight.get(offset)
            if got is None or got[0] != did:  # voided by a rewind since it was sent
                codes.append(int(ErrorCode.STALE_DELIVERY))
                continue
            del ps.inflight[offset]
            row = got[1]
            if action == F.AckAction.ACK:
                self._acked(ps, offset)
            elif action == F.AckAction.NACK:
                ms, error = F.nack_parts(arg)
                delay = None if ms is None else max(0, int(ms)) / 1000.0
                self._failed(ps, offset, row, delay, error or "nacked")
            else:
                self._dead_letter(ps, row, V.DLQ_REJECTED, str(arg) if arg is not None else "rejected")
            codes.append(0)
        self.wake()
        return codes

    def needs(self, member: Member, items: list[list[Any]]) -> list[tuple[PState, int] | None]:
        """Before settling ``items``: the (partition, offset) each ack or reject
        would let the committed offset pass (None for the others)."""
        out: list[tuple[PState, int] | None] = []
        for did, action, _arg in items:
            e = self._dids.get(did)
            if e is not None and e[3] is member and action in (F.AckAction.ACK, F.AckAction.REJECT):
                out.append((e[0], e[1]))
            else:
                out.append(None)
        return out

    def on_persisted(self, fn: Callable[[Exception | None], None],
                     needs: list[tuple[PState, int] | None] | None = None, codes: list[int] | None = None) -> None:
        """Call ``fn(None)`` once every offset in ``needs`` whose code is 0 is
        below its partition's committed offset as stored: an out-of-order ack
        waits for the commit of the contiguous offset that covers it. Calls
        ``fn(error)`` if that commit fails, or a STALE_* error if a rewind or a
        rebalance voids the ack before it is covered."""
        want: dict[PState, int] = {}
        for n, code in zip(needs or (), codes or ()):
            if n is not None and code == 0 and n[1] > want.get(n[0], -1):
                want[n[0]] = n[1]
        self._persist_waiters.append((fn, want))
        self.wake()

    def _void_waiters(self, ps: PState, offset: int, code: ErrorCode, why: str) -> None:
        """Acks at or above ``offset`` on ``ps`` were voided: their waiters get ``code``."""
        keep = []
        for fn, want in self._persist_waiters:
            if want.get(ps, -1) >= offset:
                fn(RemoteProtocolError(why, code))
            else:
                keep.append((fn, want))
        self._persist_waiters = keep

    def _answer_waiters(self, error: Exception | None, failed: set[PState]) -> None:
        """After a commit of offsets: answer the waiters it covered (or failed)."""
        keep = []
        for fn, want in self._persist_waiters:
            if error is not None and any(ps in failed for ps in want):
                fn(error)
            elif all(ps.persisted > off for ps, off in want.items()):
                fn(None)
            else:
                keep.append((fn, want))
        self._persist_waiters = keep

    def _acked(self, ps: PState, offset: int) -> None:
        ps.attempts.pop(offset, None)
        if offset == ps.committed:
            ps.committed += 1
            acked = ps.acked
            while ps.committed in acked:
                acked.remove(ps.committed)
                ps.committed += 1
            ps.dirty = True
        elif offset > ps.committed:
            ps.acked.add(offset)

    def _failed(self, ps: PState, offset: int, row: StreamRow, delay: float | None, error: str) -> None:
        cfg = self.stream.cfg
        n = ps.attempts.get(offset, 1)
        if cfg.max_deliveries and n >= cfg.max_deliveries:
            self._dead_letter(ps, row, V.DLQ_MAX_DELIVERIES, error)
            return
        # Redeliver from this offset, in order: later in-flight deliveries are void.
        for o in [o for o in ps.inflight if o >= offset]:
            self._dids.pop(ps.inflight.pop(o)[0], None)
        ps.acked = {o for o in ps.acked if o < offset}
        if self._persist_waiters:
            self._void_waiters(ps, offset, ErrorCode.STALE_DELIVERY, "voided by the redelivery of an earlier offset")
        ps.buffer.clear()
        ps.cursor = offset
        d = cfg.backoff(n) if delay is None else delay
        ps.paused_until = time.monotonic() + d

    def _dead_letter(self, ps: PState, row: StreamRow, reason: str, error: str) -> None:
        self.dead_lettered += 1
        attempts = ps.attempts.get(row.offset, 1)
        self.ops.append((self.ctx.dead_letters.from_stream(self.stream.name, self.stream.cfg.dead_letter, row, reason,
                                                         attempts, error),
                         ps, row.offset, attempts))
        self._acked(ps, row.offset)

    def _dead_letter_failed(self, ps: PState, offset: int, attempts: int, exc: StorageError) -> None:
        """The copy to the DLQ failed (a full disk, say): the committed offset
        must not pass the message, so the partition goes back to it and it is
        delivered again after a pause (and tried for the DLQ again)."""
        self.dead_lettered -= 1
        self.ctx.counters.state_failures += 1
        ps.attempts[offset] = attempts  # the next delivery counts on from here
        if ps.committed > offset:
            ps.committed = offset
        for o in [o for o in ps.inflight if o >= offset]:
            self._dids.pop(ps.inflight.pop(o)[0], None)
        ps.acked = {o for o in ps.acked if o < offset}
        ps.buffer.clear()
        ps.cursor = min(ps.cursor, offset)
        ps.paused_until = time.monotonic() + STORE_RETRY_DELAY
        code = ErrorCode.STORAGE_FULL if isinstance(exc, StorageFull) else ErrorCode.STORAGE_ERROR
        self._void_waiters(ps, offset, code, f"the copy to the dead-letter queue failed: {exc}")

    # --------------------------------------------------------------- actor

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._run()
        finally:
            self._charges.clear()
            self._held = self.ctx.window_budget.hold(self._held, 0)
            if self._open:
                self._open = False
                self.ctx.window_budget.close()
            self.finished.set()

    async def _run(self) -> None:
        store = self.ctx.store
        budget = self.ctx.window_budget
        while not self._stopped:
            self._expire()
            need = self._pump()
            if self._charges:
                self._uncharge()
            await self._send()
            # This group's room in the budget, shared by the partitions that need a page.
            per = budget.room(self._held) // len(need) if need else 0
            for ps in need:
                if ps.buffer:
                    continue  # a rewind raced the read
                hwm = self.stream.partitions[ps.index].hwm
                self._charges[ps] = per  # reserved while reading: other windows cannot count on it
                self._held = budget.hold(self._held, sum(self._charges.values()))
                try:
                    rows = await store.read_partition(self.stream.name, ps.index, ps.cursor, READ_PAGE,
                                                      per, WINDOW_MIN)
                except StorageError as exc:
                    self._charges.pop(ps, None)
                    self._held = budget.hold(self._held, sum(self._charges.values()))
                    self._read_backoff = self.ctx.read_failed(self._read_backoff, exc,
                                                         f"group {self.stream.name}/{self.name}")
                    ps.paused_until = time.monotonic() + self._read_backoff
                    continue
                self._read_backoff = 0.0
                ps.buffer.extend(r for r in rows if r.offset < hwm)
                self._charges[ps] = sum(len(r.payload) for r in rows) + MESSAGE_OVERHEAD * len(rows)
                self._held = budget.hold(self._held, sum(self._charges.values()))
            if need:
                continue
            await self._flush_commits()
            if self._dirty:
                self._dirty = False
                continue
            timeout = self._next_timer()
            self._idle = True
            with anyio.move_on_after(timeout):
                await self._wake.wait()
            self._idle = False
            self._dirty = False
            self._wake = anyio.Event()

    def _uncharge(self) -> None:
        """Give the budget back the pages whose buffers are empty (delivered, or
        cleared by a rewind or a new owner)."""
        for ps in [ps for ps in self._charges if not ps.buffer]:
            del self._charges[ps]
        self._held = self.ctx.window_budget.hold(self._held, sum(self._charges.values()))

    def _next_timer(self) -> float:
        t = 3600.0
        mono = time.monotonic()
        if self._deadlines:
            t = min(t, self._deadlines[0][0] - mono)
        for ps in self.parts:
            if ps.paused_until > mono:
                t = min(t, ps.paused_until - mono)
        if self._commit_retry_at:
            t = min(t, self._commit_retry_at - mono)
        return max(t, 0.0)

    def _expire(self) -> None:
        heap = self._deadlines
        if len(heap) > 2 * len(self._dids) + 1024:  # drop entries of settled deliveries
            self._deadlines = heap = [(e[4], did) for did, e in self._dids.items()]
            heapq.heapify(heap)
        mono = time.monotonic()
        while heap and heap[0][0] <= mono:
            deadline, did = heapq.heappop(heap)
            entry = self._dids.get(did)
            if entry is None or entry[4] != deadline:
                continue
            ps, offset = entry[0], entry[1]
            del self._dids[did]
            got = ps.inflight.get(offset)
            if got is not None and got[0] == did:  # not a copy since given to another member
                del ps.inflight[offset]
                self._failed(ps, offset, got[1], None, "ack deadline exceeded")

    def _pump(self) -> list[PState]:
        """Deliver what is available from memory; return partitions needing a disk read."""
        need = []
        mono = time.monotonic()
        cfg = self.stream.cfg
        deadline = mono + cfg.ack_deadline
        out: dict[Member, list[Any]] = {}
        # Credit per connection (see Peer.credit): a member whose connection
        # is full is skipped and the group is woken when it drains. What is taken here is
        # pushed only after the store call in _send, so it is reserved on the connection.
        wake = self.wake
        left: dict[Peer, int] = {}
        taken: dict[Peer, int] = {}
        for ps in self.parts:
            m = ps.owner
            if m is None or ps.paused_until > mono:
                continue
            conn = m.conn
            if conn not in left:
                left[conn] = conn.credit(wake)
                taken[conn] = 0
            if left[conn] <= 0:
                conn.await_credit(wake)
                continue
            part = self.stream.partitions[ps.index]
            if ps.cursor < part.first:
                ps.cursor = part.first
                if ps.committed < part.first:
                    ps.committed = part.first
                    ps.dirty = True
            room = m.window - len(ps.inflight)
            while room > 0 and ps.cursor < part.hwm and left[conn] > 0:
                if ps.buffer and ps.buffer[0].offset < ps.cursor:
                    ps.buffer.popleft()
                    continue
                buffered = bool(ps.buffer)
                if buffered:
                    rows: list[StreamRow] = []
                    while ps.buffer and len(rows) < room:
                        rows.append(ps.buffer.popleft())
                else:
                    got = part.get(ps.cursor, room)
                    if got is None:
                        need.append(ps)
                        break
                    rows = got
                if not rows:
                    break
                items = out.get(m)
                if items is None:
                    items = out[m] = []
                for k, r in enumerate(rows):
                    if left[conn] <= 0:
                        if buffered:
                            ps.buffer.extendleft(reversed(rows[k:]))
                        break
                    if r.offset > ps.cursor:
                        self._skip_to(ps, r.offset)  # missing offsets: failed writes or retention
                    elif r.offset < ps.cursor:
                        continue
                    if r.subject == GAP:
                        self._acked(ps, r.offset)
                        ps.cursor += 1
                        continue
                    self._did += 1
                    did = self._did
                    n = ps.attempts.get(r.offset, 1 if r.offset < ps.seen_below else 0) + 1
                    ps.attempts[r.offset] = n
                    if n > 1:
                        self.redelivered += 1
                    ps.inflight[r.offset] = (did, r)
                    self._dids[did] = (ps, r.offset, ps.gen, m, deadline)
                    heapq.heappush(self._deadlines, (deadline, did))
                    items.append([did, r.subject, r.payload, r.headers, n, r.timestamp_ms,
                                  [ps.index, r.offset, r.key, ps.gen]])
                    size = len(r.payload) + len(r.subject) + DELIVERY_OVERHEAD
                    left[conn] -= size
                    taken[conn] += size
                    ps.cursor += 1
                    room -= 1
                    if ps.cursor > ps.delivered:
                        ps.delivered = ps.cursor
        for conn, n in taken.items():
            if n:
                conn.reserve(n)
            if left[conn] <= 0:
                conn.await_credit(wake)  # woken once what was taken here has been sent
        self._out = out
        return need

    async def _send(self) -> None:
        """Record how far each partition has been delivered, then send: after a
        crash, a message delivered before counts as a redelivery."""
        out, self._out = self._out, {}
        if not out:
            return
        moved = [ps for ps in self.parts if ps.delivered > ps.delivered_saved]
        if not moved:
            self._push_out(out)
            return
        name = self.stream.name
        rows = [(name, self.name, ps.index, ps.persisted, ps.delivered) for ps in moved]
        for ps in moved:
            ps.delivered_saved = ps.delivered

        def sent(error: Exception | None) -> None:
            # The store commits in order, so batches still go out in order; on a
            # failed write they go anyway (at-least-once matters more than the count).
            self._push_out(out)

        await self.ctx.store.submit(CommitOffsets(rows, sent))

    def _push_out(self, out: dict[Member, list[Any]]) -> None:
        for m, items in out.items():
            if m.group is self and m in self.members:
                self.delivered_count += len(items)
                size = push_deliveries(m.conn, m.cid, items)
            else:
                size = sum(len(it[2]) + len(it[1]) + DELIVERY_OVERHEAD for it in items)
            m.conn.release(size)

    def _skip_to(self, ps: PState, offset: int) -> None:
        for o in range(ps.cursor, offset):
            self._acked(ps, o)
        ps.cursor = offset

    async def _flush_dead_letters(self) -> None:
        while self.ops:  # again if a reject came in while a copy was being written
            # Each copy to the DLQ is committed before the offsets that pass it
            # (rare: a synchronous write each), so a failed copy can hold them back.
            ops, self.ops = self.ops, []
            for op, ps, offset, attempts in ops:
                try:
                    await self.ctx.store.write(op)
                except StorageError as exc:
                    self._dead_letter_failed(ps, offset, attempts, exc)

    async def _flush_commits(self) -> None:
        await self._flush_dead_letters()
        dirty = [ps for ps in self.parts if ps.dirty]
        if not dirty:
            if self._persist_waiters:
                self._answer_waiters(None, set())
            return
        rows = [(self.stream.name, self.name, ps.index, ps.committed, ps.delivered) for ps in dirty]
        values = [(ps, ps.committed) for ps in dirty]
        for ps in dirty:
            ps.dirty = False
        self._commit_retry_at = 0.0  # set again if this commit fails

        def done(error: Exception | None) -> None:
            if error is None:
                for ps, c in values:
                    ps.persisted = max(ps.persisted, c)
            else:
                log.error("group %s/%s: committing offsets failed: %s", self.stream.name, self.name, error)
                self.ctx.counters.state_failures += 1
                for ps, _c in values:
                    ps.dirty = True  # tried again with the next flush, at the latest after a pause
                self._commit_retry_at = time.monotonic() + STORE_RETRY_DELAY
            if self._persist_waiters:
                self._answer_waiters(error, {ps for ps, _c in values})

        await self.ctx.store.submit(CommitOffsets(rows, done))

    def info(self) -> dict[str, Any]:
        parts = []
        for ps in self.parts:
            part = self.stream.partitions[ps.index]
            parts.append({"partition": ps.index, "owner": (ps.owner.cid if ps.owner else None),
                          "owner_connection": (ps.owner.conn.number if ps.owner else None),
                          "committed": ps.committed, "persisted": ps.persisted, "lag": part.hwm - ps.committed,
                          "in_flight": len(ps.inflight)})
        return {"generation": self.generation, "members": [
            {"connection": m.conn.number, "client": m.conn.name, "cid": m.cid,
             "partitions": [ps.index for ps in self.parts if ps.owner is m]} for m in self.members],
            "partitions": parts, "delivered": self.delivered_count, "redelivered": self.redelivered}
