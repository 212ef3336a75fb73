"""A priority queue: a QueueActor whose window is one lane per priority.

A queue declared with ``max_priority`` N > 0 stores each message with a
priority 0..N (settings.QueueConfig.priority_of: the publish's, default 0,
clamped to N). Every priority is a *lane* that keeps the plain queue's
paging invariant on its own: its messages are ordered by ``(available_ms,
id)``; every stored message of the lane whose key is <= the lane's cursor
is in memory, every one above is only on disk and counted in the lane's
``beyond``. The store pages one lane at a time (``load_messages(...,
priority=p)``, on a partial index), so a backlog of millions on disk costs
no RAM, whatever its priorities.

The ordering rule: the next delivery is the first ready message (in
``(available_ms, id)`` order) of the highest priority that has a message
due now. A lane with due messages on disk but none in memory holds back
every lower lane until it has paged them in (:meth:`Lanes.head`), so a
backlog on disk does not let lower priorities pass. Messages not yet due
(delayed, or waiting for a retry's backoff) are not eligible until due.
What is already delivered (prefetched, in flight) is not reordered: a
consumer's prefetch bounds how far a late high-priority message trails.
A message returned by a nack, a deadline or a consumer leaving goes back
to the front of its own lane.

The plain QueueActor is untouched by this (its fast path, delivery and
refill run as before); this class overrides the methods that read or move
the cursor. ``max_length`` keeps the reject policy here (settings refuse
dead_letter_oldest for a priority queue).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tidings.protocol import vocabulary as V

from tidings.broker.durable.queue import NOTHING_DUE, WINDOW, QueueActor
from tidings.broker.durable.settings import QueueConfig
from tidings.broker.durable.store.base import StoredMessage, UpdateMessages
from tidings.broker.durable.window import MESSAGE_OVERHEAD, WINDOW_MIN

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext


class Lane:
    """One priority's part of the window: the plain queue's paging state."""

    __slots__ = ("priority", "ready", "cursor", "beyond", "next_due", "due_known", "load_due")

    def __init__(self, priority: int, beyond: int) -> None:
        self.priority = priority
        self.ready: deque[StoredMessage] = deque()
        self.cursor: tuple[int, int] = (-1, -1)
        self.beyond = beyond
        self.next_due: int | None = None
        self.due_known = beyond == 0
        self.load_due: int | None = None

    def due_on_disk(self, now: int) -> bool:
        """Messages of this lane may be due on disk (beyond the cursor)."""
        return bool(self.beyond) and (not self.due_known or (self.next_due is not None and self.next_due <= now))

    def to_beyond(self, available_ms: int, loading: bool) -> None:
        if loading and (self.load_due is None or available_ms < self.load_due):
            self.load_due = available_ms
        if self.beyond == 0:
            self.next_due = available_ms
            self.due_known = True
        elif self.due_known and self.next_due is not None and available_ms < self.next_due:
            self.next_due = available_ms
        self.beyond += 1

    def emptied(self) -> None:
        if self.beyond <= 0:
            self.beyond = 0
            self.next_due = None
            self.due_known = True


class Lanes:
    """The ``ready`` of a priority queue: what QueueActor does with a deque
    (popleft, appendleft, extendleft, append, len, truth), over the lanes.
    ``popleft`` and truth follow the ordering rule (:meth:`head`)."""

    __slots__ = ("lanes", "n", "now_ms")

    def __init__(self, counts: list[int], now_ms: Callable[[], int]) -> None:
        self.lanes = [Lane(p, c) for p, c in enumerate(counts)]
        self.n = 0  # messages ready in every lane together
        self.now_ms = now_ms

    def lane(self, m: StoredMessage) -> Lane:
        return self.lanes[m.priority or 0]

    def head(self) -> Lane | None:
        """The lane the next delivery comes from: the highest with a ready
        message, unless a higher one has due messages on disk and none in
        memory (then None: nothing goes out before that lane has paged in)."""
        now = -1
        for lane in reversed(self.lanes):
            if lane.ready:
                return lane
            if lane.beyond:
                if now < 0:
                    now = self.now_ms()
                if lane.due_on_disk(now):
                    return None
        return None

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0 and self.head() is not None

    def popleft(self) -> StoredMessage:
        lane = self.head()
        if lane is None:
            raise IndexError("no message may be delivered now")
        self.n -= 1
        return lane.ready.popleft()

    def appendleft(self, m: StoredMessage) -> None:
        self.lane(m).ready.appendleft(m)
        self.n += 1

    def append(self, m: StoredMessage) -> None:
        self.lane(m).ready.append(m)
        self.n += 1

    def extendleft(self, msgs: Iterable[StoredMessage]) -> None:
        for m in msgs:
            self.appendleft(m)

    def clear(self) -> None:
        for lane in self.lanes:
            lane.ready.clear()
        self.n = 0


class PriorityQueueActor(QueueActor):
    """A QueueActor whose window is one Lane per priority (see the module docstring)."""

    def __init__(self, ctx: DurableContext, config: QueueConfig, count: int,
                 lane_counts: list[int] | None = None) -> None:
        super().__init__(ctx, config, count)
        counts = lane_counts if lane_counts is not None else [0] * (config.max_priority + 1)
        self.lanes = Lanes(counts, ctx.now_ms)
        self.ready = self.lanes  # type: ignore[assignment]  # the deque operations QueueActor uses

    # The plain queue's single cursor is not used: every lane has its own.
    @property  # type: ignore[override]
    def beyond(self) -> int:
        return sum(lane.beyond for lane in self.lanes.lanes) if hasattr(self, "lanes") else 0

    @beyond.setter
    def beyond(self, value: int) -> None:
        pass  # QueueActor's own bookkeeping of one cursor: the lanes keep theirs

    # ------------------------------------------------------------ inputs

    def on_committed(self, rows: list[StoredMessage]) -> None:
        now = self.ctx.now_ms()
        lanes = self.lanes
        room = self.ctx.window_budget.room(self._ready_bytes) if self.consumers else -1
        added = 0
        for row in rows:
            self.count += 1
            self.published += 1
            lane = lanes.lane(row)
            if self._loading:
                self._arrived.append(row)
                lane.to_beyond(row.available_ms, True)
                continue
            key = (row.available_ms, row.id)
            if key <= lane.cursor:
                lanes.append(row)
                added += len(row.payload) + MESSAGE_OVERHEAD
            elif (row.available_ms <= now and len(lanes) < WINDOW and room >= 0
                  and (lane.beyond == 0 or (lane.due_known and lane.next_due is not None
                                            and lane.next_due > row.available_ms))
                  and ((size := len(row.payload) + MESSAGE_OVERHEAD) <= room or len(lanes) < WINDOW_MIN)):
                lanes.append(row)
                lane.cursor = key
                room -= size
                added += size
            else:
                lane.to_beyond(row.available_ms, False)
        if added:
            self._ready_bytes += added
            self._report()
        self.wake()

    def _retry(self, msg: StoredMessage, delay: float | None, error: str | None) -> None:
        msg.last_error = error
        cfg = self.cfg
        if cfg.max_deliveries and msg.deliveries >= cfg.max_deliveries:
            self._dead_letter([msg], V.DLQ_MAX_DELIVERIES)
            return
        d = cfg.backoff(msg.deliveries) if delay is None else delay
        if d <= 0:
            self.lanes.appendleft(msg)
            self._ready_bytes += len(msg.payload) + MESSAGE_OVERHEAD
            self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
            return
        msg.available_ms = self.ctx.now_ms() + int(d * 1000)
        self._updates.append((msg.id, msg.available_ms, msg.deliveries, error))
        self._delayed.append(msg)
        self.lanes.lane(msg).to_beyond(msg.available_ms, self._loading)

    def _updates_failed(self, delayed: list[StoredMessage], epoch: int) -> None:
        self.store_failures += 1
        self.ctx.counters.state_failures += 1
        if epoch != self._epoch or self._stopped or not delayed:
            return
        for m in delayed:
            lane = self.lanes.lane(m)
            lane.beyond = max(0, lane.beyond - 1)
        self._hold(delayed)

    def _drop_all(self) -> int:
        n = super()._drop_all()
        for lane in self.lanes.lanes:
            lane.beyond = 0
            lane.emptied()
            lane.cursor = self.cursor
        return n

    # ------------------------------------------------------------ paging

    def _due_lanes(self, now: int) -> list[Lane]:
        """Lanes with messages that may be due on disk, highest priority first."""
        return [lane for lane in reversed(self.lanes.lanes) if lane.due_on_disk(now)]

    def _need_refill(self) -> bool:
        if not self.consumers:
            return False  # nobody consumes: the backlog stays on disk (no trimming in a priority queue)
        now = self.ctx.now_ms()
        above_empty = True  # no lane above this one has a ready message
        bound: bool | None = None
        for lane in reversed(self.lanes.lanes):
            if lane.due_on_disk(now):
                if above_empty and not lane.ready:
                    return True  # delivery waits for this lane: page it in whatever the budget says
                if len(self.lanes) < WINDOW // 2:
                    if bound is None:
                        bound = self._budget_bound()
                    if not bound:
                        return True
            if lane.ready:
                above_empty = False
        return False

    async def _refill_locked(self, want: int | None = None) -> int:
        store = self.ctx.store
        now = self.ctx.now_ms()
        limit, max_bytes, min_rows = self._page_size(want)
        self._budget_held = self.ctx.window_budget.hold(self._budget_held, self._ready_bytes + max_bytes)
        self._loading = True
        self._arrived = []
        for lane in self.lanes.lanes:
            lane.load_due = None
        loaded: set[int] = set()
        total = 0
        try:
            # Barrier: every operation this actor submitted so far is committed.
            await store.write(UpdateMessages(self.name, []))
            for lane in self._due_lanes(now):
                left = limit - total
                if left <= 0:
                    break
                rows = await store.load_messages(self.name, after=lane.cursor, due_before_ms=now, limit=left,
                                                 max_bytes=max(0, max_bytes), min_rows=min(left, min_rows),
                                                 priority=lane.priority)
                if rows:
                    for r in rows:
                        loaded.add(r.id)
                    lane.ready.extend(rows)
                    self.lanes.n += len(rows)
                    nbytes = sum(len(r.payload) for r in rows) + MESSAGE_OVERHEAD * len(rows)
                    self._ready_bytes += nbytes
                    max_bytes -= nbytes
                    min_rows = 1
                    last = rows[-1]
                    lane.cursor = (last.available_ms, last.id)
                    lane.beyond -= len(rows)
                    total += len(rows)
                if lane.beyond <= 0:
                    lane.emptied()
                elif len(rows) < left:
                    lane.due_known = False  # until the query below answers
                    lane.next_due = await store.next_available_ms(self.name, lane.cursor, priority=lane.priority)
                    lane.due_known = True
                else:
                    lane.due_known = False
        finally:
            self._loading = False
            arrived, self._arrived = self._arrived, []
        lanes = self.lanes
        for r in arrived:
            lane = lanes.lane(r)
            if (r.available_ms, r.id) <= lane.cursor and r.id not in loaded:
                lanes.append(r)
                self._ready_bytes += len(r.payload) + MESSAGE_OVERHEAD
                lane.beyond -= 1
        for lane in lanes.lanes:
            # Anything sent beyond the cursor while the queries ran may be missing from what they saw.
            if lane.load_due is not None and lane.due_known:
                if lane.next_due is None or lane.load_due < lane.next_due:
                    lane.next_due = lane.load_due
            lane.load_due = None
            lane.emptied()
        self._report()
        return total

    async def take(self, n: int) -> list[StoredMessage]:
        """Remove up to ``n`` ready messages in delivery order (paging from disk), for redrive."""
        out: list[StoredMessage] = []
        while len(out) < n:
            if self.lanes:
                msg = self.lanes.popleft()
                self._ready_bytes -= len(msg.payload) + MESSAGE_OVERHEAD
                out.append(msg)
                continue
            if self._due_lanes(self.ctx.now_ms()):
                if await self._refill(n - len(out)):
                    continue
            break
        self._report()
        return out

    def give_back(self, msgs: list[StoredMessage]) -> None:
        keep = []
        for m in msgs:
            lane = self.lanes.lane(m)
            if (m.available_ms, m.id) <= lane.cursor:
                keep.append(m)
                self._ready_bytes += len(m.payload) + MESSAGE_OVERHEAD
            else:
                lane.to_beyond(m.available_ms, self._loading)
        self.lanes.extendleft(reversed(keep))
        self.wake()

    def _release(self) -> None:
        if self.inflight or self._refill_lock.locked():
            return
        for m in self._held:
            self.lanes.lane(m).beyond += 1
        self._held.clear()
        for lane in self.lanes.lanes:
            lane.beyond += len(lane.ready)
            lane.cursor = (-1, -1)
            lane.next_due = None
            lane.due_known = lane.beyond == 0
        self.lanes.clear()
        self._ready_bytes = 0
        self._report()

    def _trim(self) -> None:
        """No max_length trimming in a priority queue (its max_length rejects), but
        QueueActor's loop runs this just before it gives a consumerless window
        back; it asks ``bool(ready)``, which a held-back lane can make False."""
        if self.lanes.n and not self.consumers:
            self._release()

    def _next_timer(self) -> float:
        t = NOTHING_DUE
        mono = time.monotonic()
        if self._deadlines:
            t = min(t, self._deadlines[0][0] - mono)
        if self._held:
            t = min(t, self._held_until - mono)
        if self._read_retry_at > mono:
            t = min(t, self._read_retry_at - mono)
        elif self.consumers:
            if self._need_refill():
                t = 0.0
            else:
                now = self.ctx.now_ms()
                for lane in self.lanes.lanes:
                    if lane.beyond and lane.due_known and lane.next_due is not None:
                        t = min(t, (lane.next_due - now) / 1000.0)
        return max(t, 0.0)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["ready_by_priority"] = {lane.priority: len(lane.ready) for lane in self.lanes.lanes if lane.ready}
        return out
