"""Ordered partitioned streams: partitions, consumer groups, readers, retention.

A stream is P append-only partitions. A publish's key picks its partition
(protocol.partition.partition_for); keyless publishes go round-robin.
Offsets are assigned when the store operation is submitted (in submission
order, which is commit order), so they are dense and increasing; a
partition's ``hwm`` is one past the last committed offset and only
committed messages are ever delivered.

Consumer groups (one :class:`GroupActor` each) assign partitions to
members and rebalance with a new generation when members come and go. A
partition is delivered in offset order to its owner with a window of
in-flight messages; acks advance the committed offset contiguously
(batched to the store). A failed delivery (nack or ack deadline) rewinds
the partition to that offset, in order; after max_deliveries the message
goes to the stream's dead-letter queue and the partition moves on.
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
from tidings.protocol.partition import partition_for

from tidings.broker.ops.limits import MESSAGE_OVERHEAD, WINDOW_MIN
from tidings.broker.durable.queue import DELIVER_FRAME_BUDGET, DELIVERY_OVERHEAD
from tidings.broker.durable.store.base import StorageError, StorageFull
from tidings.broker.durable.store.streams import StreamRow
from tidings.broker.durable.stream_settings import DEFAULT_WINDOW, StreamConfig

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Peer
    from tidings.broker.durable.core import Durable

log = logging.getLogger(__name__)

TAIL_MESSAGES: Final = 20_000  # newest messages per partition kept in memory for live consumers
TAIL_BYTES: Final = 8 * 1024 * 1024
READ_PAGE: Final = 1_000  # rows per disk read when replaying (fewer when the window budget says so)
READER_HIGH_WATER: Final = 1024 * 1024  # a reader pauses while its connection has this much queued
KEY_CACHE: Final = 65_536  # keys whose partition is remembered per stream
GAP: Final = ""  # subject of a placeholder for an offset whose write failed (never a valid subject)
#: Seconds a partition pauses after its copy to the DLQ failed, before the
#: message is delivered (and dead-lettered) again: no busy loop on a full disk.
STORE_RETRY_DELAY: Final = 1.0
#: Back-off (seconds, first and longest) between attempts of a failed replay read
#: (the database locked by a backup or an admin tool, say); the broker serves on.
READ_RETRY: Final = (0.5, 10.0)


class Partition:
    __slots__ = ("stream", "index", "first", "next", "hwm", "tail", "tail_bytes", "bytes", "changed")

    def __init__(self, stream: str, index: int, first: int, next_offset: int, nbytes: int) -> None:
        self.stream = stream
        self.index = index
        self.first = first  # lowest retained offset
        self.next = next_offset  # next offset to assign
        self.hwm = next_offset  # every offset below is committed
        self.tail: deque[StreamRow] = deque()
        self.tail_bytes = 0
        self.bytes = nbytes
        self.changed = anyio.Event()

    def committed(self, rows: list[StreamRow]) -> None:
        tail = self.tail
        for r in rows:
            tail.append(r)
            n = len(r.payload) + 64
            self.tail_bytes += n
            self.bytes += n
        if rows and rows[-1].offset >= self.hwm:  # never backwards
            self.hwm = rows[-1].offset + 1
        while len(tail) > TAIL_MESSAGES or self.tail_bytes > TAIL_BYTES:
            self.tail_bytes -= len(tail.popleft().payload) + 64
        ev, self.changed = self.changed, anyio.Event()
        ev.set()

    def skip(self, offset: int) -> None:
        """An assigned offset whose write failed (e.g. disk full): it becomes a
        gap that no consumer ever sees. Called in commit order, like committed()."""
        self.committed([StreamRow(self.stream, self.index, offset, GAP, None, b"", None, None, 0)])

    def get(self, offset: int, limit: int) -> list[StreamRow] | None:
        """Rows from ``offset`` (below hwm) out of memory, or None if not cached."""
        tail = self.tail
        if not tail or offset < tail[0].offset or offset < self.first:
            return None
        start = offset - tail[0].offset
        if start >= len(tail):
            return []
        end = min(len(tail), start + limit)
        return [tail[i] for i in range(start, end)]

    def trimmed(self, before: int) -> None:
        self.first = max(self.first, before)
        tail = self.tail
        while tail and tail[0].offset < self.first:
            self.tail_bytes -= len(tail.popleft().payload) + 64


class StreamActor:
    def __init__(self, durable: Durable, cfg: StreamConfig, parts: list[Partition]) -> None:
        self.durable = durable
        self.cfg = cfg
        self.name = cfg.name
        self.partitions = parts
        self.groups: dict[str, GroupActor] = {}
        self.readers: set[Reader] = set()
        self._rr = 0
        self._key_cache: dict[str, int] = {}
        self.published = 0
        self.dead_lettered = 0
        self.trimmed = 0

    def pick(self, key: str | None) -> Partition:
        if key is None:
            self._rr += 1
            return self.partitions[self._rr % len(self.partitions)]
        idx = self._key_cache.get(key)
        if idx is None:  # the hash is pure Python: remember it per key (bounded)
            if len(self._key_cache) >= KEY_CACHE:
                self._key_cache.clear()
            idx = self._key_cache[key] = partition_for(key, len(self.partitions))
        return self.partitions[idx]

    def on_committed(self, rows_by_part: dict[int, list[StreamRow]]) -> None:
        for idx, rows in rows_by_part.items():
            self.partitions[idx].committed(rows)
            self.published += len(rows)
        for g in self.groups.values():
            g.wake()

    def info(self) -> dict[str, Any]:
        parts = [{"partition": p.index, "first": p.first, "next": p.hwm, "messages": p.hwm - p.first}
                 for p in self.partitions]
        groups = {}
        for name, g in self.groups.items():
            groups[name] = g.info()
        return {"name": self.name, "partitions": parts, "groups": groups, "bind": list(self.cfg.bind),
                "published": self.published, "dead_lettered": self.dead_lettered, "trimmed": self.trimmed,
                "readers": len(self.readers), "config": self.cfg.to_dict()}


# ---------------------------------------------------------------- groups

class Member:
    """A connection's membership in a consumer group (one consumer id)."""

    __slots__ = ("conn", "cid", "group", "window", "seq")

    def __init__(self, conn: Peer, cid: int, group: GroupActor, window: int, seq: int) -> None:
        self.conn = conn
        self.cid = cid
        self.group = group
        self.window = window
        self.seq = seq

    def settle(self, items: list[list[Any]]) -> list[int]:
        return self.group.settle(self, items)

    def close(self) -> None:
        self.group.leave(self)

    @property
    def source(self) -> str:
        return self.group.stream.name

    @property
    def group_name(self) -> str:
        return self.group.name


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
    def __init__(self, stream: StreamActor, name: str, offsets: dict[int, tuple[int, int]]) -> None:
        self.stream = stream
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
        self.delivered_count = 0
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

    # ------------------------------------------------------------ members

    def join(self, conn: Peer, cid: int, window: int) -> Member:
        self._seq += 1
        m = Member(conn, cid, self, window, self._seq)
        self.members.append(m)
        if not self._open:
            self._open = True
            self.stream.durable.window_budget.open()
        self._rebalance()
        return m

    def leave(self, m: Member) -> None:
        if m in self.members:
            self.members.remove(m)
            if not self.members and self._open:
                self._open = False
                self.stream.durable.window_budget.close()
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
                delay = None if arg is None else max(0, int(arg)) / 1000.0
                self._failed(ps, offset, row, delay, "nacked")
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
        self.stream.dead_lettered += 1
        attempts = ps.attempts.get(row.offset, 1)
        self.ops.append((self.stream.durable.streams.dead_letter(self.stream, row, reason, attempts, error),
                         ps, row.offset, attempts))
        self._acked(ps, row.offset)

    def _dead_letter_failed(self, ps: PState, offset: int, attempts: int, exc: StorageError) -> None:
        """The copy to the DLQ failed (a full disk, say): the committed offset
        must not pass the message, so the partition goes back to it and it is
        delivered again after a pause (and tried for the DLQ again)."""
        self.stream.dead_lettered -= 1
        self.stream.durable.state_failures += 1
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
            self._held = self.stream.durable.window_budget.hold(self._held, 0)
            if self._open:
                self._open = False
                self.stream.durable.window_budget.close()

    async def _run(self) -> None:
        store = self.stream.durable.store
        budget = self.stream.durable.window_budget
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
                    self._read_backoff = read_failed(self.stream.durable, self._read_backoff, exc,
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
        self._held = self.stream.durable.window_budget.hold(self._held, sum(self._charges.values()))

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
                conn.credit(wake)
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
                    rows = []
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

        await self.stream.durable.streams.commit_offsets(rows, sent)

    def _push_out(self, out: dict[Member, list[Any]]) -> None:
        for m, items in out.items():
            if m.group is self and m in self.members:
                self.delivered_count += len(items)
                size = _push(m.conn, m.cid, items)
            else:
                size = sum(len(it[2]) + len(it[1]) + DELIVERY_OVERHEAD for it in items)
            m.conn.release(size)

    def _skip_to(self, ps: PState, offset: int) -> None:
        for o in range(ps.cursor, offset):
            self._acked(ps, o)
        ps.cursor = offset

    async def _flush_commits(self) -> None:
        while self.ops:  # again if a reject came in while a copy was being written
            # Each copy to the DLQ is committed before the offsets that pass it
            # (rare: a synchronous write each), so a failed copy can hold them back.
            ops, self.ops = self.ops, []
            for op, ps, offset, attempts in ops:
                try:
                    await self.stream.durable.store.write(op)
                except StorageError as exc:
                    self._dead_letter_failed(ps, offset, attempts, exc)
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
                self.stream.durable.state_failures += 1
                for ps, _c in values:
                    ps.dirty = True  # tried again with the next flush, at the latest after a pause
                self._commit_retry_at = time.monotonic() + STORE_RETRY_DELAY
            if self._persist_waiters:
                self._answer_waiters(error, {ps for ps, _c in values})

        await self.stream.durable.streams.commit_offsets(rows, done)

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


def _push(conn: Peer, cid: int, items: list[Any]) -> int:
    """Queue ``items`` as DELIVER frames of at most DELIVER_FRAME_BUDGET; returns their bytes."""
    batch: list[Any] = []
    size = 0
    total = 0
    for it in items:
        batch.append(it)
        size += len(it[2]) + len(it[1]) + DELIVERY_OVERHEAD
        if size >= DELIVER_FRAME_BUDGET:
            conn.push_wire([F.Op.DELIVER, cid, batch], size)
            total += size
            batch, size = [], 0
    if batch:
        conn.push_wire([F.Op.DELIVER, cid, batch], size)
    return total + size


# --------------------------------------------------------------- readers

class Reader:
    """A replay/follow reader of one partition, outside any group. No acks:
    flow control is the connection's outbound buffer."""

    __slots__ = ("conn", "cid", "stream", "partition", "offset", "follow", "scope", "paged")

    def __init__(self, conn: Peer, cid: int, stream: StreamActor, partition: int, offset: int,
                 follow: bool) -> None:
        self.conn = conn
        self.cid = cid
        self.stream = stream
        self.partition = partition
        self.offset = offset
        self.follow = follow
        self.scope = anyio.CancelScope()
        self.paged = 0  # bytes of the page read from disk, held against the window budget until sent

    def settle(self, items: list[list[Any]]) -> list[int]:
        return [0] * len(items)  # readers need no acks; accepted and ignored

    def close(self) -> None:
        self.scope.cancel()
        self.stream.readers.discard(self)

    async def run(self) -> None:
        budget = self.stream.durable.window_budget
        budget.open()
        with self.scope:
            try:
                await self._run()
            finally:
                self.paged = budget.hold(self.paged, 0)
                budget.close()
                self.stream.readers.discard(self)

    async def _run(self) -> None:
        part = self.stream.partitions[self.partition]
        store = self.stream.durable.store
        budget = self.stream.durable.window_budget
        conn = self.conn
        backoff = 0.0
        while True:
            if self.offset < part.first:
                self.offset = part.first
            if self.offset >= part.hwm:
                if not self.follow:
                    conn.consumers.pop(self.cid, None)
                    conn.push_wire([F.Op.NOTICE, V.NOTICE_CONSUMER_CLOSED, {"cid": self.cid, "reason": "end",
                                                                    "next_offset": self.offset}])
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
                    backoff = read_failed(self.stream.durable, backoff, exc,
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
                _push(conn, self.cid, items)
            await conn.wait_pending_below(high)
            self.paged = budget.hold(self.paged, 0)  # sent: what is still queued is below `high`

    @property
    def source(self) -> str:
        return self.stream.name

    group_name = None  # reads without a group


def read_failed(durable: Durable, backoff: float, exc: StorageError, who: str) -> float:
    """Count and log a failed read (the database locked past the busy timeout,
    say); returns the next back-off, doubling from READ_RETRY[0] to READ_RETRY[1]."""
    durable.read_errors += 1
    lo, hi = READ_RETRY
    backoff = min(hi, backoff * 2) if backoff else lo
    log.warning("%s: reading from the store failed, retrying in %.1f s: %s", who, backoff, exc)
    return backoff


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


__all__ = ["StreamActor", "Partition", "GroupActor", "Member", "Reader", "resolve_start", "DEFAULT_WINDOW"]
