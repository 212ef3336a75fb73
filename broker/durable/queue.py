"""One actor per durable queue: the in-memory window, deliveries, acks, timers.

Invariant that makes paging safe: messages are ordered by the key
``(available_ms, id)``; every stored message whose key is <= ``cursor`` is
in memory (ready or in flight), every one above it is only on disk and
counted in ``beyond``. Newly committed messages that are due at once take
the fast path into memory while nothing due waits on disk; otherwise they
stay on disk and are paged in, in key order, in batches of at most WINDOW.
So a backlog of millions costs disk, not RAM.

The ready part of the window is bounded in bytes too: by this queue's fair
share of the broker-wide ``window_memory`` budget (window.WindowBudget),
with WINDOW_MIN messages always allowed so every queue makes progress. A
queue without consumers pages nothing in (except what max_length trimming
needs) and hands what it holds back to the disk, so an idle backlog or a
dead-letter queue costs no RAM; it pages in when a consumer attaches.

Other actors call the non-blocking methods (``on_committed``, ``settle``,
``attach``, ``detach``); they only change state and wake the actor task,
which delivers in batches (one DELIVER frame per consumer per wake-up),
runs the ack-deadline and delay timers, pages from disk, and hands its
store operations to the storage actor in batches.

The actor gets a :class:`DurableContext` (clock, ids, store, dead-letter
sink, window budget, counters), never its parent. Purge, delete and redrive
ask it to change its state (:meth:`QueueActor.purge`, :meth:`close`,
:meth:`move_out`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode

from tidings.broker.durable.delivery import DELIVERY_OVERHEAD, push_deliveries
from tidings.broker.durable.settings import QueueConfig
from tidings.broker.durable.store.base import (
    PLAIN_LANE,
    DeleteMessages,
    MarkDelivered,
    MoveMessages,
    PurgeQueue,
    StorageError,
    StoredMessage,
    UpdateMessages,
    waited,
)
from tidings.broker.durable.window import MESSAGE_OVERHEAD, WINDOW_MIN

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Peer
    from tidings.broker.durable.context import DurableContext

log = logging.getLogger(__name__)

WINDOW: Final = 10_000  # messages of a queue's backlog held in memory; the rest stays on disk
#: Seconds a message waits before it is delivered again after a store write
#: changing its state (ack, nack, dead-letter move) failed: without a pause a
#: full disk would turn deliver-expire-move-fail into a busy loop.
STORE_RETRY_DELAY: Final = 1.0
#: What the actor's timer says when nothing is due: it then parks with no timer at all.
NOTHING_DUE: Final = 3600.0


class Consumer:
    """A connection's consumer on one queue, with a prefetch (credit) window."""

    __slots__ = ("conn", "cid", "queue", "prefetch", "inflight")

    def __init__(self, conn: Peer, cid: int, queue: QueueActor, prefetch: int) -> None:
        self.conn = conn
        self.cid = cid
        self.queue = queue
        self.prefetch = prefetch
        self.inflight: set[int] = set()

    @property
    def source(self) -> str:
        return self.queue.name

    group_name = None  # a queue has no consumer groups

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
    def __init__(self, ctx: DurableContext, config: QueueConfig, count: int) -> None:
        self.ctx = ctx
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
        self._deletes: list[StoredMessage] = []  # acked/expired: deleted with the next flush
        self._updates: list[tuple[int, int, int, str | None]] = []  # redeliveries, retries, detaches
        # lane -> the highest (available_ms, id) delivered for the first time since the
        # last flush: persisted as the queue's delivery mark (store.base.MarkDelivered)
        self._marks: dict[int, tuple[int, int]] = {}
        self._delayed: list[StoredMessage] = []  # sent beyond the cursor by the updates of the next flush
        self._waiters: list[Callable[[Exception | None], None]] = []  # answered once the next flush commits
        self._held: list[StoredMessage] = []  # restored after a failed write, until _held_until
        self._held_until = 0.0
        self._epoch = 0  # bumped by purge: a failed write from before it restores nothing
        self._read_retry_at = 0.0
        self._read_backoff = 0.0
        self.ops: list[Any] = []  # other store operations (moves to the DLQ) awaiting submission
        self._refill_lock = anyio.Lock()
        self._ready_bytes = 0  # payload + MESSAGE_OVERHEAD of every message in ``ready``
        self._budget_held = 0  # ... as last reported to the broker's window budget
        self._open = False  # counted as an open window in the budget (has consumers)
        self._did = 0
        # Reused (cleared after each wake-up): a fresh anyio.Event per park cost an
        # object and a loop look-up per wake-up. The broker runs on asyncio.
        self._wake = asyncio.Event()
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
        self.store_failures = 0  # state-changing writes that failed (their messages were restored)

    # ------------------------------------------------------------ inputs

    def wake(self) -> None:
        self._dirty = True  # seen by the loop even if it is busy awaiting the store right now
        if self._idle:
            self._idle = False
            self._wake.set()

    def on_committed(self, rows: list[StoredMessage]) -> None:
        """Messages committed for this queue (publish, dead-letter, redrive)."""
        now = self.ctx.now_ms()
        ready = self.ready
        # Only a queue with consumers takes new messages into memory, within its share.
        room = self.ctx.window_budget.room(self._ready_bytes) if self.consumers else -1
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
        self._budget_held = self.ctx.window_budget.hold(self._budget_held, self._ready_bytes)

    def attach(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        if not self._open:
            self._open = True
            self.ctx.window_budget.open()
        self.wake()

    def reconfigure(self, cfg: QueueConfig) -> None:
        """Take new settings (an update, already stored): ack_deadline applies to
        the next deliveries, max_deliveries and backoff to the next failure,
        message_ttl to the next publishes, max_length at once (the
        dead_letter_oldest policy trims on the next wake-up)."""
        self.cfg = cfg
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
            self.ctx.window_budget.close()
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
                self._deletes.append(msg)
            elif action == F.AckAction.NACK:
                self.nacked += 1
                ms, error = F.nack_parts(arg)
                delay = None if ms is None else max(0, int(ms)) / 1000.0
                self._retry(msg, delay, error if error else msg.last_error)
            else:
                self.rejected += 1
                msg.last_error = str(arg) if arg is not None else "rejected"
                self._dead_letter([msg], V.DLQ_REJECTED)
            codes.append(0)
        self.wake()
        return codes

    # ----------------------------------------------------------- helpers

    def _retry(self, msg: StoredMessage, delay: float | None, error: str | None) -> None:
        msg.last_error = error
        cfg = self.cfg
        if cfg.max_deliveries and msg.deliveries >= cfg.max_deliveries:
            self._dead_letter([msg], V.DLQ_MAX_DELIVERIES)
            return
        d = cfg.backoff(msg.deliveries) if delay is None else delay
        if d <= 0:
            self.ready.appendleft(msg)
            self._ready_bytes += len(msg.payload) + MESSAGE_OVERHEAD
            self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
            return
        msg.available_ms = self.ctx.now_ms() + int(d * 1000)
        self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
        self._delayed.append(msg)
        self._to_beyond(msg.available_ms)

    def _dead_letter(self, msgs: list[StoredMessage], reason: str) -> None:
        self.count -= len(msgs)
        self.dead_lettered += len(msgs)
        got = self.ctx.dead_letters.from_queue(self.name, self.cfg.dead_letter, msgs, reason)
        if got is None:
            log.error("queue %s has no dead-letter queue; deleting %d messages (%s)", self.name, len(msgs), reason)
            self._deletes.extend(msgs)
            return
        moves, arrive = got
        self.ops.append(self._move_op(self.cfg.dead_letter or "", moves, msgs, arrive, dead_letter=True))
        self.wake()

    def _move_op(self, target: str, moves: list[tuple[int, StoredMessage]], originals: list[StoredMessage],
                 arrive: Callable[[list[StoredMessage]], None], *, dead_letter: bool = False) -> MoveMessages:
        """The move of ``originals`` out of this queue into ``target`` (``arrive``
        gets the new rows once committed): on a failure they are still stored here, so this
        queue takes them back and delivers them again."""
        rows = [r for _, r in moves]
        epoch = self._epoch

        def done(error: Exception | None) -> None:
            if error is None:
                arrive(rows)
            else:
                log.error("moving %d messages from %s to %s failed, they stay in %s: %s",
                          len(rows), self.name, target, self.name, error)
                if dead_letter:
                    self.dead_lettered -= len(rows)
                self.restore(originals, epoch)

        return MoveMessages(self.name, moves, done)

    def move_out(self, target: str, moves: list[tuple[int, StoredMessage]], originals: list[StoredMessage],
                 arrive: Callable[[list[StoredMessage]], None]) -> MoveMessages:
        """Redrive: ``originals`` (from :meth:`take`) leave this queue as ``moves``;
        returns the store operation, whose failure gives them back."""
        self.count -= len(moves)
        return self._move_op(target, moves, originals, arrive)

    def _expire(self, msg: StoredMessage) -> None:
        self.expired += 1
        if self.cfg.dead_letter_expired and self.cfg.dead_letter:
            self._dead_letter([msg], V.DLQ_EXPIRED)
        else:
            self.count -= 1
            self._deletes.append(msg)

    def restore(self, msgs: list[StoredMessage], epoch: int) -> None:
        """A store write that took ``msgs`` out of the queue (ack, expiry,
        dead-letter move, redrive) failed: they are still stored, so they are
        counted again and delivered again after STORE_RETRY_DELAY."""
        self.store_failures += 1
        self.ctx.counters.state_failures += 1
        if epoch != self._epoch or self._stopped:
            return  # purged or deleted since: nothing to bring back
        self.count += len(msgs)
        # A first delivery wrote no row (the queue's mark counts it at recovery): write
        # the counts now, since a queue left without consumers pages these out to disk
        # and in again, and reads them back from their rows.
        self._updates.extend((m.id, m.available_ms, m.deliveries, m.last_error) for m in msgs if m.deliveries)
        self._hold(msgs)

    def _hold(self, msgs: list[StoredMessage]) -> None:
        if not self._held:
            self._held_until = time.monotonic() + STORE_RETRY_DELAY
        self._held.extend(msgs)
        self.wake()

    def _updates_failed(self, delayed: list[StoredMessage], epoch: int) -> None:
        """Updates failed: delayed retries are still stored under their old key,
        at or below the cursor, where no refill would find them: keep them in
        memory (they were counted beyond the cursor)."""
        self.store_failures += 1
        self.ctx.counters.state_failures += 1
        if epoch != self._epoch or self._stopped or not delayed:
            return
        self.beyond = max(0, self.beyond - len(delayed))
        self._hold(delayed)

    def on_persisted(self, fn: Callable[[Exception | None], None]) -> None:
        """Call ``fn(error)`` once the store writes of everything settled so far
        have committed (error None) or one of them failed."""
        self._waiters.append(fn)
        self.wake()

    async def purge(self) -> int:
        """Drop every message, in flight ones included (their acks become stale),
        in memory and then in the store; returns how many there were."""
        n = self._drop_all()
        await self.ctx.store.write(PurgeQueue(self.name))
        return n

    def _drop_all(self) -> int:
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
        self._marks.clear()
        self._delayed.clear()
        self._held.clear()
        self._epoch += 1
        self.count = 0
        self.beyond = 0
        self.next_due = None
        self._due_known = True
        self.cursor = (self.ctx.now_ms(), self.ctx.last_id)
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
                self.ctx.window_budget.close()

    async def _run(self) -> None:
        while not self._stopped:
            if self._held and time.monotonic() >= self._held_until:
                held, self._held = self._held, []
                self.ready.extendleft(reversed(held))
                self._ready_bytes += sum(len(m.payload) for m in held) + MESSAGE_OVERHEAD * len(held)
            self._expire_deadlines()
            self._deliver()
            self._report()
            await self._flush_ops()
            if self._need_refill() and time.monotonic() >= self._read_retry_at:
                try:
                    await self._refill()
                except StorageError as exc:
                    self._read_failed(exc)
                else:
                    self._read_backoff = 0.0
                continue
            self._trim()
            if self.ready and not self.consumers:
                self._release()
            timeout = self._next_timer()
            if self._deletes or self._updates or self.ops or self._waiters or self._dirty:
                self._dirty = False
                continue
            self._idle = True
            if timeout >= NOTHING_DUE:
                await self._wake.wait()  # no timer: only a wake-up can bring work
            else:
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
            self._idle = False
            self._dirty = False
            self._wake.clear()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def close(self, reason: str) -> None:
        """The queue is deleted: every consumer is closed (told why) and the actor stops."""
        for c in list(self.consumers):
            c.conn.end_consumer(c.cid, reason)
            self.detach(c)
        self.stop()

    def _read_failed(self, exc: StorageError) -> None:
        """A refill failed (the database locked past the busy timeout, say): its
        messages stay on disk and counted beyond the cursor; try again later."""
        self._read_backoff = self.ctx.read_failed(self._read_backoff, exc, f"queue {self.name}")
        self._read_retry_at = time.monotonic() + self._read_backoff
        self._due_known = False  # what the failed refill learnt is not to be trusted

    def _next_timer(self) -> float:
        t = NOTHING_DUE
        mono = time.monotonic()
        if self._deadlines:
            t = min(t, self._deadlines[0][0] - mono)
        if self._held:
            t = min(t, self._held_until - mono)
        if self._read_retry_at > mono:
            t = min(t, self._read_retry_at - mono)
        elif self.beyond and self.consumers and not self._budget_bound():
            if not self._due_known:
                t = 0.0
            elif self.next_due is not None:
                t = min(t, (self.next_due - self.ctx.now_ms()) / 1000.0)
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
        left: dict[Peer, int] = {}
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
        now = self.ctx.now_ms()
        mono = time.monotonic()
        deadline = mono + self.cfg.ack_deadline
        heap = self._deadlines
        inflight = self.inflight
        updates = self._updates
        marks = self._marks
        # this batch's highest first-delivered key of a plain queue (priority lanes go to marks directly)
        ma, mi = marks.get(PLAIN_LANE, (-1, -1))
        redelivered = 0
        out: dict[Consumer, list[Any]] = {}
        n = len(cons)
        i = self._rr % n
        while ready and cons:
            if i >= len(cons):
                i = 0
            c = cons[i]
            conn = c.conn
            if left[conn] <= 0:
                conn.await_credit(wake)  # out of credit: held back until this connection drains
                cons.pop(i)
                continue
            msg = ready.popleft()
            self._ready_bytes -= len(msg.payload) + MESSAGE_OVERHEAD
            if msg.expires_ms is not None and msg.expires_ms <= now:
                self._expire(msg)
                continue
            self._did += 1
            did = self._did
            msg.deliveries = count = msg.deliveries + 1
            # Counted on disk too (with the next commit), so a crash cannot reset a
            # poison message's count below max_deliveries: a first delivery by the
            # delivery mark of its lane (recovery counts one for every message at or
            # below it that says 0), a redelivery by its own row.
            if count == 1:
                p = msg.priority
                if p is None:
                    a = msg.available_ms
                    if a > ma or (a == ma and msg.id > mi):
                        ma = a
                        mi = msg.id
                else:
                    had = marks.get(p)
                    if had is None or (msg.available_ms, msg.id) > had:
                        marks[p] = (msg.available_ms, msg.id)
            else:
                updates.append((msg.id, msg.available_ms, count, msg.last_error))
                redelivered += 1
            inflight[did] = Inflight(msg, c, deadline)
            heapq.heappush(heap, (deadline, did))
            c.inflight.add(did)
            meta: dict[str, Any] = {"id": msg.id}
            if msg.msg_id is not None:
                meta["msg_id"] = msg.msg_id
            items = out.get(c)
            if items is None:
                items = out[c] = []
            items.append([did, msg.subject, msg.payload, msg.headers, count, msg.published_ms, meta])
            left[conn] -= len(msg.payload) + len(msg.subject) + DELIVERY_OVERHEAD
            if len(c.inflight) >= c.prefetch:
                cons.pop(i)
            else:
                i += 1
        self._rr += 1
        if mi >= 0:
            marks[PLAIN_LANE] = (ma, mi)
        self.redelivered += redelivered
        self.delivered += sum(len(v) for v in out.values())
        for c, items in out.items():
            push_deliveries(c.conn, c.cid, items)

    async def _flush_ops(self) -> None:
        # Everything is taken before the first await: a settle that arrives
        # meanwhile (ops and waiter together) goes wholly into the next flush.
        ops, self.ops = self.ops, []
        dels, self._deletes = self._deletes, []
        ups, self._updates = self._updates, []
        delayed, self._delayed = self._delayed, []
        waiters, self._waiters = self._waiters, []
        marks, self._marks = self._marks, {}
        if not (ops or dels or ups or marks):
            for fn in waiters:
                fn(None)
            return
        epoch = self._epoch
        track = _Outcome(waiters) if waiters else None
        for op in ops:
            if track is not None:
                op.on_done = track.wrap(op.on_done)
            await self.ctx.store.submit(op)
        if dels:
            def deleted(error: Exception | None) -> None:
                if error is not None:
                    log.error("queue %s: deleting %d messages failed, they are delivered again: %s",
                              self.name, len(dels), error)
                    self.restore(dels, epoch)
            cb = deleted if track is None else track.wrap(deleted)
            await self.ctx.store.submit(DeleteMessages(self.name, [m.id for m in dels], cb))
        if ups:
            def updated(error: Exception | None) -> None:
                if error is not None:
                    log.error("queue %s: updating %d messages failed: %s", self.name, len(ups), error)
                    self._updates_failed(delayed, epoch)
            cb = updated if track is None else track.wrap(updated)
            await self.ctx.store.submit(UpdateMessages(self.name, ups, cb))
        if marks:
            def marked(error: Exception | None) -> None:
                if error is None:
                    return
                log.error("queue %s: storing its delivery mark failed, it goes with the next flush: %s",
                          self.name, error)
                self.store_failures += 1
                self.ctx.counters.state_failures += 1
                if epoch == self._epoch and not self._stopped:
                    # No wake-up of its own: a failing store is not retried in a loop.
                    pending = self._marks
                    for lane, key in marks.items():
                        had = pending.get(lane)
                        if had is None or key > had:
                            pending[lane] = key
            cb = marked if track is None else track.wrap(marked)
            await self.ctx.store.submit(MarkDelivered(self.name, [(lane, a, i) for lane, (a, i) in marks.items()], cb))

    def _need_refill(self) -> bool:
        if not self.beyond or len(self.ready) >= WINDOW // 2:
            return False
        if not self.consumers and self._overflow() <= len(self.ready):
            return False  # nobody consumes: the backlog stays on disk (max_length trimming aside)
        if self._budget_bound():
            return False
        if not self._due_known:
            return True
        return self.next_due is not None and self.next_due <= self.ctx.now_ms()

    def _budget_bound(self) -> bool:
        """Paging in waits for the window budget: this queue holds enough to go on
        delivering and over half of its share is still paged in (or the budget is
        spent). Deliveries and settles wake the queue, so it looks again then."""
        if len(self.ready) < WINDOW_MIN:
            return False
        budget = self.ctx.window_budget
        return 2 * budget.room(self._ready_bytes) < budget.share()

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
        room = self.ctx.window_budget.room(self._ready_bytes)
        return limit, room, min(limit, max(1, WINDOW_MIN - len(self.ready)))

    async def _refill_locked(self, want: int | None = None) -> int:
        store = self.ctx.store
        now = self.ctx.now_ms()
        limit, max_bytes, min_rows = self._page_size(want)
        # Reserved while the query runs, so windows paging in at the same time cannot all
        # count on the same room; _report() below replaces it with what was loaded.
        self._budget_held = self.ctx.window_budget.hold(self._budget_held, self._ready_bytes + max_bytes)
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
                                                        and self.next_due <= self.ctx.now_ms())):
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
        # held (restored after a failed write) messages are stored too: on disk only, like the rest
        self.beyond += len(self.ready) + len(self._held)
        self._held.clear()
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
            self._dead_letter(victims, V.DLQ_MAX_LENGTH)

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
            "store_failures": self.store_failures,
            "config": self.cfg.to_dict(),
        }


class _Outcome:
    """Calls ``waiters(error)`` once every wrapped store callback has run: with
    the first error any of them got, or None when all committed."""

    __slots__ = ("waiters", "pending", "error")

    def __init__(self, waiters: list[Callable[[Exception | None], None]]) -> None:
        self.waiters = waiters
        self.pending = 0
        self.error: Exception | None = None

    def wrap(self, cb: Callable[[Exception | None], None] | None) -> Callable[[Exception | None], None]:
        self.pending += 1

        def done(error: Exception | None) -> None:
            try:
                if cb is not None:
                    cb(error)
            finally:
                if error is not None and self.error is None:
                    self.error = error
                self.pending -= 1
                if self.pending == 0:
                    for fn in self.waiters:
                        fn(self.error)

        return waited(done)  # someone awaits the outcome: the store must not hold it back
