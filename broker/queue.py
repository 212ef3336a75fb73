"""One actor per durable queue: the in-memory window, deliveries, acks, timers.

Invariant that makes paging safe: messages are ordered by the key
``(available_ms, id)``; every stored message whose key is <= ``cursor`` is
in memory (ready or in flight), every one above it is only on disk and
counted in ``beyond``. Newly committed messages that are due at once take
the fast path into memory while nothing due waits on disk; otherwise they
stay on disk and are paged in, in key order, in batches of at most WINDOW.
So a backlog of millions costs disk, not RAM.

The ready part of the window is bounded in bytes too: by this queue's fair
share of the broker-wide ``window_memory`` budget (limits.WindowBudget),
with WINDOW_MIN messages always allowed so every queue makes progress. A
queue without consumers pages nothing in (except what max_length trimming
needs) and hands what it holds back to the disk, so an idle backlog or a
dead-letter queue costs no RAM; it pages in when a consumer attaches.

Other actors call the non-blocking methods (``on_committed``, ``settle``,
``attach``, ``detach``); they only change state and wake the actor task,
which delivers in batches (one DELIVER frame per consumer per wake-up),
runs the ack-deadline and delay timers, pages from disk, and hands its
store operations to the storage actor in batches.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio

from protocol import frames as F
from protocol.errors import ErrorCode

from .limits import MESSAGE_OVERHEAD, WINDOW_MIN
from .queueconfig import QueueConfig
from .store.base import StoredMessage, UpdateMessages

if TYPE_CHECKING:
    from .connection import ConnectionActor
    from .durable import Durable

log = logging.getLogger(__name__)

WINDOW: Final = 10_000  # messages of a queue's backlog held in memory; the rest stays on disk
DELIVER_FRAME_BUDGET: Final = 512 * 1024  # bytes of payload per DELIVER frame before starting another
DELIVERY_OVERHEAD: Final = 48  # estimated envelope bytes of one DELIVER item, counted against credit


class Consumer:
    """A connection's consumer on one queue, with a prefetch (credit) window."""

    __slots__ = ("conn", "cid", "queue", "prefetch", "inflight")

    def __init__(self, conn: ConnectionActor, cid: int, queue: QueueActor, prefetch: int) -> None:
        self.conn = conn
        self.cid = cid
        self.queue = queue
        self.prefetch = prefetch
        self.inflight: set[int] = set()

    def settle(self, items: list[list[Any]]) -> list[int]:
        return self.queue.settle(self, items)

    def close(self) -> None:
        self.queue.detach(self)


class Inflight:
    __slots__ = ("msg", "consumer", "deadline")

    def __init__(self, msg: StoredMessage, consumer: Consumer, deadline: float) -> None:
        self.msg = msg
        self.consumer = consumer
        self.deadline = deadline


class QueueActor:
    def __init__(self, durable: Durable, config: QueueConfig, count: int) -> None:
        self.durable = durable
        self.cfg = config
        self.name = config.name
        self.ready: deque[StoredMessage] = deque()
        self.inflight: dict[int, Inflight] = {}
        self._deadlines: list[tuple[float, int]] = []
        self.consumers: list[Consumer] = []
        self._rr = 0
        self.count = count
        self.cursor: tuple[int, int] = (-1, -1)
        self.beyond = count
        self.next_due: int | None = None
        self._due_known = count == 0
        self._loading = False
        self._load_due: int | None = None  # earliest due time sent beyond the cursor during a refill
        self._arrived: list[StoredMessage] = []
        self._deletes: list[int] = []
        self._updates: list[tuple[int, int, int, str | None]] = []
        self.ops: list[Any] = []  # other store operations (moves to the DLQ) awaiting submission
        self._refill_lock = anyio.Lock()
        self._ready_bytes = 0  # payload + MESSAGE_OVERHEAD of every message in ``ready``
        self._held = 0  # ... as last reported to the broker's window budget
        self._open = False  # counted as an open window in the budget (has consumers)
        self._did = 0
        self._wake = anyio.Event()
        self._idle = False
        self._dirty = False
        self._stopped = False
        # counters
        self.published = 0
        self.delivered = 0
        self.redelivered = 0
        self.acked = 0
        self.nacked = 0
        self.rejected = 0
        self.dead_lettered = 0
        self.expired = 0

    # ------------------------------------------------------------ inputs

    def wake(self) -> None:
        self._dirty = True  # seen by the loop even if it is busy awaiting the store right now
        if self._idle:
            self._idle = False
            self._wake.set()

    def on_committed(self, rows: list[StoredMessage]) -> None:
        """Messages committed for this queue (publish, dead-letter, redrive)."""
        now = self.durable.now_ms()
        ready = self.ready
        # Only a queue with consumers takes new messages into memory, within its share.
        room = self.durable.window_budget.room(self._ready_bytes) if self.consumers else -1
        added = 0
        for row in rows:
            self.count += 1
            self.published += 1
            if self._loading:
                self._arrived.append(row)
                self._to_beyond(row.available_ms)
                continue
            key = (row.available_ms, row.id)
            if key <= self.cursor:
                ready.append(row)  # committed out of key order: it belongs in memory
                added += len(row.payload) + MESSAGE_OVERHEAD
            elif (row.available_ms <= now and len(ready) < WINDOW and room >= 0
                  and (self.beyond == 0 or (self._due_known and self.next_due is not None
                                            and self.next_due > row.available_ms))
                  and ((size := len(row.payload) + MESSAGE_OVERHEAD) <= room or len(ready) < WINDOW_MIN)):
                ready.append(row)
                self.cursor = key
                room -= size
                added += size
            else:
                self._to_beyond(row.available_ms)
        if added:
            self._ready_bytes += added
            self._report()
        self.wake()

    def _to_beyond(self, available_ms: int) -> None:
        if self._loading and (self._load_due is None or available_ms < self._load_due):
            self._load_due = available_ms
        if self.beyond == 0:
            self.next_due = available_ms
            self._due_known = True
        elif self._due_known and self.next_due is not None and available_ms < self.next_due:
            self.next_due = available_ms
        self.beyond += 1

    def _report(self) -> None:
        """Tell the window budget how many bytes ``ready`` holds now."""
        self._held = self.durable.window_budget.hold(self._held, self._ready_bytes)

    def attach(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        if not self._open:
            self._open = True
            self.durable.window_budget.open()
        self.wake()

    def detach(self, consumer: Consumer) -> None:
        """The consumer stopped or its connection closed: its unacked messages
        return to the front of the queue at once (their delivery counted)."""
        try:
            self.consumers.remove(consumer)
        except ValueError:
            pass
        back = []
        for did in sorted(consumer.inflight):
            inf = self.inflight.pop(did, None)
            if inf is not None:
                back.append(inf.msg)
                self._updates.append((inf.msg.id, inf.msg.available_ms, inf.msg.deliveries, inf.msg.last_error))
        consumer.inflight.clear()
        self.ready.extendleft(reversed(back))
        self._ready_bytes += sum(len(m.payload) for m in back) + MESSAGE_OVERHEAD * len(back)
        if not self.consumers and self._open:
            self._open = False
            self.durable.window_budget.close()
        self.wake()

    def settle(self, consumer: Consumer, items: list[list[Any]]) -> list[int]:
        """Apply ack/nack/reject/in_progress items; returns one code per item
        (0 = done, STALE_DELIVERY = not held by this consumer)."""
        codes: list[int] = []
        inflight = self.inflight
        mine = consumer.inflight
        mono = time.monotonic()
        for did, action, arg in items:
            inf = inflight.get(did)
            if inf is None or inf.consumer is not consumer:
                codes.append(int(ErrorCode.STALE_DELIVERY))
                continue
            if action == F.AckAction.IN_PROGRESS:
                inf.deadline = mono + self.cfg.ack_deadline
                heapq.heappush(self._deadlines, (inf.deadline, did))
                codes.append(0)
                continue
            del inflight[did]
            mine.discard(did)
            msg = inf.msg
            if action == F.AckAction.ACK:
                self.acked += 1
                self.count -= 1
                self._deletes.append(msg.id)
            elif action == F.AckAction.NACK:
                self.nacked += 1
                delay = None if arg is None else max(0, int(arg)) / 1000.0
                self._retry(msg, delay, msg.last_error)
            else:
                self.rejected += 1
                msg.last_error = str(arg) if arg is not None else "rejected"
                self._dead_letter([msg], "rejected")
            codes.append(0)
        self.wake()
        return codes

    # ----------------------------------------------------------- helpers

    def _retry(self, msg: StoredMessage, delay: float | None, error: str | None) -> None:
        msg.last_error = error
        cfg = self.cfg
        if cfg.max_deliveries and msg.deliveries >= cfg.max_deliveries:
            self._dead_letter([msg], "max_deliveries")
            return
        d = cfg.backoff(msg.deliveries) if delay is None else delay
        if d <= 0:
            self.ready.appendleft(msg)
            self._ready_bytes += len(msg.payload) + MESSAGE_OVERHEAD
            self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
            return
        msg.available_ms = self.durable.now_ms() + int(d * 1000)
        self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
        self._to_beyond(msg.available_ms)

    def _dead_letter(self, msgs: list[StoredMessage], reason: str) -> None:
        self.count -= len(msgs)
        self.dead_lettered += len(msgs)
        self.durable.dead_letter(self, msgs, reason)

    def _expire(self, msg: StoredMessage) -> None:
        self.expired += 1
        if self.cfg.dead_letter_expired and self.cfg.dead_letter:
            self._dead_letter([msg], "expired")
        else:
            self.count -= 1
            self._deletes.append(msg.id)

    def purge(self) -> int:
        """Drop every message, in flight ones included (their acks become stale)."""
        n = self.count
        for c in self.consumers:
            c.inflight.clear()
        self.inflight.clear()
        self._deadlines.clear()
        self.ready.clear()
        self._ready_bytes = 0
        self._report()
        self._deletes.clear()
        self._updates.clear()
        self.count = 0
        self.beyond = 0
        self.next_due = None
        self._due_known = True
        self.cursor = (self.durable.now_ms(), self.durable.last_id)
        return n

    # ------------------------------------------------------------- actor

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._run()
        finally:
            self._ready_bytes = 0
            self._report()
            if self._open:
                self._open = False
                self.durable.window_budget.close()

    async def _run(self) -> None:
        while not self._stopped:
            self._expire_deadlines()
            self._deliver()
            self._report()
            await self._flush_ops()
            if self._need_refill():
                await self._refill()
                continue
            self._trim()
            if self.ready and not self.consumers:
                self._release()
            timeout = self._next_timer()
            if self._deletes or self._updates or self.ops or self._dirty:
                self._dirty = False
                continue
            self._idle = True
            with anyio.move_on_after(timeout):
                await self._wake.wait()
            self._idle = False
            self._dirty = False
            self._wake = anyio.Event()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _next_timer(self) -> float:
        t = 3600.0
        if self._deadlines:
            t = min(t, self._deadlines[0][0] - time.monotonic())
        if self.beyond and self.consumers:
            if not self._due_known:
                t = 0.0
            elif self.next_due is not None:
                t = min(t, (self.next_due - self.durable.now_ms()) / 1000.0)
        return max(t, 0.0)

    def _expire_deadlines(self) -> None:
        heap = self._deadlines
        if not heap:
            return
        if len(heap) > 2 * len(self.inflight) + 1024:
            # Settled deliveries leave their entries behind; drop them before
            # they add up to rate x ack_deadline of dead weight.
            inflight = self.inflight
            self._deadlines = heap = [(inf.deadline, did) for did, inf in inflight.items()]
            heapq.heapify(heap)
        mono = time.monotonic()
        while heap and heap[0][0] <= mono:
            deadline, did = heapq.heappop(heap)
            inf = self.inflight.get(did)
            if inf is None or inf.deadline != deadline:
                continue  # settled, or extended by in_progress
            del self.inflight[did]
            inf.consumer.inflight.discard(did)
            self._retry(inf.msg, None, "ack deadline exceeded")

    def _deliver(self) -> None:
        ready = self.ready
        if not ready or not self.consumers:
            return
        # Credit: bytes each connection may still take before its mailbox reaches
        # max_pending_bytes. A connection without credit is skipped (the queue is woken
        # when it drains); the others keep being served.
        wake = self.wake
        left: dict[ConnectionActor, int] = {}
        cons = []
        for c in self.consumers:
            if len(c.inflight) < c.prefetch:
                conn = c.conn
                if conn not in left:
                    left[conn] = conn.credit(wake)
                if left[conn] > 0:
                    cons.append(c)
        if not cons:
            return
        now = self.durable.now_ms()
        mono = time.monotonic()
        deadline = mono + self.cfg.ack_deadline
        heap = self._deadlines
        inflight = self.inflight
        updates = self._updates
        out: dict[Consumer, list[Any]] = {}
        n = len(cons)
        i = self._rr % n
        while ready and cons:
            if i >= len(cons):
                i = 0
            c = cons[i]
            conn = c.conn
            if left[conn] <= 0:
                conn.credit(wake)  # out of credit: held back until this connection drains
                cons.pop(i)
                continue
            msg = ready.popleft()
            self._ready_bytes -= len(msg.payload) + MESSAGE_OVERHEAD
            if msg.expires_ms is not None and msg.expires_ms <= now:
                self._expire(msg)
                continue
            self._did += 1
            did = self._did
            msg.deliveries += 1
            # Counted on disk too (batched with the next commit), so a crash
            # cannot reset a poison message's count below max_deliveries.
            updates.append((msg.id, msg.available_ms, msg.deliveries, msg.last_error))
            inflight[did] = Inflight(msg, c, deadline)
            heapq.heappush(heap, (deadline, did))
            c.inflight.add(did)
            meta: dict[str, Any] = {"id": msg.id}
            if msg.msg_id is not None:
                meta["msg_id"] = msg.msg_id
            items = out.get(c)
            if items is None:
                items = out[c] = []
            items.append([did, msg.subject, msg.payload, msg.headers, msg.deliveries, msg.published_ms, meta])
            left[conn] -= len(msg.payload) + len(msg.subject) + DELIVERY_OVERHEAD
            if msg.deliveries > 1:
                self.redelivered += 1
            if len(c.inflight) >= c.prefetch:
                cons.pop(i)
            else:
                i += 1
        self._rr += 1
        self.delivered += sum(len(v) for v in out.values())
        for c, items in out.items():
            self._push_deliveries(c, items)

    @staticmethod
    def _push_deliveries(c: Consumer, items: list[Any]) -> None:
        batch: list[Any] = []
        size = 0
        for it in items:
            batch.append(it)
            size += len(it[2]) + len(it[1]) + DELIVERY_OVERHEAD
            if size >= DELIVER_FRAME_BUDGET:
                c.conn.push_wire([F.Op.DELIVER, c.cid, batch], size)
                batch, size = [], 0
        if batch:
            c.conn.push_wire([F.Op.DELIVER, c.cid, batch], size)

    async def _flush_ops(self) -> None:
        if self.ops:
            ops, self.ops = self.ops, []
            for op in ops:
                await self.durable.store.submit(op)
        if self._deletes:
            ids, self._deletes = self._deletes, []
            await self.durable.delete_messages(self.name, ids)
        if self._updates:
            ups, self._updates = self._updates, []
            await self.durable.update_messages(self.name, ups)

    def _need_refill(self) -> bool:
        if not self.beyond or len(self.ready) >= WINDOW // 2:
            return False
        if not self.consumers and self._overflow() <= len(self.ready):
            return False  # nobody consumes: the backlog stays on disk (max_length trimming aside)
        if len(self.ready) >= WINDOW_MIN:
            budget = self.durable.window_budget
            if 2 * budget.room(self._ready_bytes) < budget.share():
                return False  # over half of this queue's share is still paged in (or the budget is spent)
        if not self._due_known:
            return True
        return self.next_due is not None and self.next_due <= self.durable.now_ms()

    async def _refill(self, want: int | None = None) -> int:
        """Page due messages in from disk (at most ``want``); returns how many were loaded."""
        async with self._refill_lock:
            if not self.beyond:
                return 0
            return await self._refill_locked(want)

    def _page_size(self, want: int | None) -> tuple[int, int, int]:
        """(messages, bytes, messages whatever the bytes) to page in now: up to
        WINDOW in memory, within the room the window budget gives this queue."""
        limit = WINDOW - len(self.ready)
        if want is not None:
            limit = min(limit, want)
        elif not self.consumers:
            limit = min(limit, self._overflow() - len(self.ready))  # only what max_length trimming takes
        limit = max(limit, 1)
        room = self.durable.window_budget.room(self._ready_bytes)
        return limit, room, min(limit, max(1, WINDOW_MIN - len(self.ready)))

    async def _refill_locked(self, want: int | None = None) -> int:
        store = self.durable.store
        now = self.durable.now_ms()
        limit, max_bytes, min_rows = self._page_size(want)
        # Reserved while the query runs, so windows paging in at the same time cannot all
        # count on the same room; _report() below replaces it with what was loaded.
        self._held = self.durable.window_budget.hold(self._held, self._ready_bytes + max_bytes)
        self._loading = True
        self._arrived = []
        self._load_due = None
        try:
            # Barrier: every operation this actor submitted so far (nack delays
            # above all) is committed, so the queries below see it.
            await store.write(UpdateMessages(self.name, []))
            rows = await store.load_messages(self.name, after=self.cursor, due_before_ms=now, limit=limit,
                                             max_bytes=max_bytes, min_rows=min_rows)
            loaded = {r.id for r in rows}
            if rows:
                self.ready.extend(rows)
                self._ready_bytes += sum(len(r.payload) for r in rows) + MESSAGE_OVERHEAD * len(rows)
                last = rows[-1]
                self.cursor = (last.available_ms, last.id)
                self.beyond -= len(rows)
            if self.beyond <= 0:
                self.beyond = 0
                self.next_due = None
                self._due_known = True
            elif len(rows) < limit:
                self.next_due = await store.next_available_ms(self.name, self.cursor)
                self._due_known = True
            else:
                self._due_known = False
        finally:
            self._loading = False
            arrived, self._arrived = self._arrived, []
        for r in arrived:
            if (r.available_ms, r.id) <= self.cursor and r.id not in loaded:
                self.ready.append(r)
                self._ready_bytes += len(r.payload) + MESSAGE_OVERHEAD
                self.beyond -= 1
        # Anything sent beyond the cursor while the queries ran (arrivals,
        # nacks with a delay) may be missing from what they saw.
        if self._load_due is not None and self._due_known:
            if self.next_due is None or self._load_due < self.next_due:
                self.next_due = self._load_due
        self._load_due = None
        if self.beyond <= 0:
            self.beyond = 0
            self.next_due = None
            self._due_known = True
        self._report()
        return len(rows)

    async def take(self, n: int) -> list[StoredMessage]:
        """Remove up to ``n`` ready messages (paging from disk as needed), for
        redrive. The caller moves them in the store or gives them back."""
        out: list[StoredMessage] = []
        while len(out) < n:
            if self.ready:
                msg = self.ready.popleft()
                self._ready_bytes -= len(msg.payload) + MESSAGE_OVERHEAD
                out.append(msg)
                continue
            if self.beyond and (not self._due_known or (self.next_due is not None
                                                        and self.next_due <= self.durable.now_ms())):
                if await self._refill(n - len(out)):
                    continue
            break
        self._report()
        return out

    def give_back(self, msgs: list[StoredMessage]) -> None:
        """Return messages from :meth:`take` that were not moved. Those above the
        cursor (the window was released to disk meanwhile) are on disk only again."""
        keep = []
        for m in msgs:
            if (m.available_ms, m.id) <= self.cursor:
                keep.append(m)
                self._ready_bytes += len(m.payload) + MESSAGE_OVERHEAD
            else:
                self._to_beyond(m.available_ms)
        self.ready.extendleft(reversed(keep))
        self.wake()

    def _release(self) -> None:
        """Nobody consumes: drop the paged-in messages, which are all stored,
        and count them on disk again. With nothing in flight, a cursor before
        every key keeps the window invariant; a consumer attaching pages them
        in again, in key order. Not while :meth:`take` is paging in."""
        if self.inflight or self._refill_lock.locked():
            return
        self.beyond += len(self.ready)
        self.ready.clear()
        self._ready_bytes = 0
        self._report()
        self.cursor = (-1, -1)
        self.next_due = None
        self._due_known = False

    def _overflow(self) -> int:
        """Messages over max_length that the dead_letter_oldest policy will move."""
        cfg = self.cfg
        if cfg.max_length is None or cfg.overflow != "dead_letter_oldest":
            return 0
        return self.count - cfg.max_length

    def _trim(self) -> None:
        """Enforce max_length with the dead_letter_oldest policy."""
        cfg = self.cfg
        if cfg.max_length is None or cfg.overflow != "dead_letter_oldest":
            return
        over = self.count - cfg.max_length
        victims = []
        while over > 0 and self.ready:
            msg = self.ready.popleft()
            self._ready_bytes -= len(msg.payload) + MESSAGE_OVERHEAD
            victims.append(msg)
            over -= 1
        if victims:
            self._dead_letter(victims, "max_length")

    # ------------------------------------------------------------- view

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "depth": self.count, "in_flight": len(self.inflight),
            "ready_in_memory": len(self.ready), "ready_bytes": self._ready_bytes, "on_disk_only": self.beyond,
            "consumers": len(self.consumers), "bind": list(self.cfg.bind),
            "dead_letter": self.cfg.dead_letter, "is_dlq": self.cfg.is_dlq,
            "published": self.published, "delivered": self.delivered, "redelivered": self.redelivered,
            "acked": self.acked, "nacked": self.nacked, "rejected": self.rejected,
            "dead_lettered": self.dead_lettered, "expired": self.expired,
            "config": self.cfg.to_dict(),
        }
