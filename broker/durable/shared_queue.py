"""A durable queue shared by several brokers on one PostgreSQL database (cluster mode).

Durable builds a ``SharedQueueActor`` instead of a ``QueueActor`` for every
queue when the broker runs with ``cluster = true``. It offers the same
interface (consumers attach and settle, publishes arrive through
``on_committed``, redrive takes and gives back, purge, info), so the
connection layer and admission do not know the difference; the single-broker
``QueueActor`` is untouched by it.

The queue's rows are the truth, shared by every broker: no broker keeps a
window of them. A broker takes messages only for its own consumers, only as
many as they have credit for (free prefetch slots on connections that can
take more), by *claiming* them in the database (store/pg_claims.py: ``FOR
UPDATE SKIP LOCKED``, a visibility deadline of the ack deadline, its
delivery counted); acks delete, nacks and expired deadlines release with a
new available time, in_progress extends the claim, all fenced by the
(claimed_by, deliveries) the claim set, in one transaction per wake-up. A
message is therefore delivered to one consumer at a time across all brokers
until its deadline lapses; a broker that dies leaves its claims to lapse, and
the messages go to consumers elsewhere.

When to claim: when something local happened (a publish here, a consumer
attached, an ack freed a slot, a connection drained) at once; otherwise by
polling, from POLL_MIN doubling to POLL_MAX while claims come back empty, so
a message published on another broker reaches an idle consumer here within
POLL_MAX (the database is asked nothing while no local consumer has room).
Correctness never depends on a hint; a hint only shortens the wait.

What becomes approximate with several brokers (docs/SCALING.md): ``depth``
(count) is this broker's view, re-read from the database every COUNT_REFRESH
seconds and adjusted by what happens here in between, so max_length with the
reject policy may be overshot by what other brokers publish meanwhile; the
dead_letter_oldest policy trims from that count too (brokers trimming at
the same moment may both trim). Priority queues are refused in cluster mode.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode

from tidings.broker.durable.delivery import DELIVERY_OVERHEAD, push_deliveries
from tidings.broker.durable.queue import Consumer, Inflight, QueueActor
from tidings.broker.durable.settings import QueueConfig
from tidings.broker.durable.store.base import StorageError, StoredMessage

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext
    from tidings.broker.durable.ports import Peer

log = logging.getLogger(__name__)

#: Seconds between claims while they come back empty and nothing local happened:
#: doubling from POLL_MIN to POLL_MAX. POLL_MAX bounds how late a message published
#: on another broker (or whose delay or claim lapsed) reaches an idle local consumer;
#: each poll is one indexed read, only while some local consumer has room.
POLL_MIN: Final = 0.02
POLL_MAX: Final = 0.5
#: Messages claimed in one statement at most (one round trip; the rows come back
#: in one answer): the local consumers' free prefetch beyond this waits for the next.
CLAIM_MAX: Final = 1_000
#: Seconds between re-reads of the queue's depth from the database (a count of its
#: rows: not free on a deep queue, so not on every claim).
COUNT_REFRESH: Final = 2.0
#: A claimed message not handed to a consumer within its deadline less this margin
#: (seconds; half the ack deadline if that is shorter) is let go rather than delivered:
#: its consumer would have next to no time before another broker may claim it.
CLAIM_MARGIN: Final = 1.0


class SharedQueueActor(QueueActor):
    """One durable queue's local side on one broker of several (see the module docstring)."""

    def __init__(self, ctx: DurableContext, config: QueueConfig, count: int, broker_id: str) -> None:
        super().__init__(ctx, config, count)
        self.broker_id = broker_id
        self.beyond = 0  # nothing is paged: every row stays in the database
        self._claimed: deque[tuple[StoredMessage, float]] = deque()  # claimed, not delivered: (msg, use-by)
        self._acks: list[tuple[int, int]] = []  # (id, deliveries claimed): fenced deletes
        self._releases: list[tuple[int, int, int, int, str | None]] = []  # (id, d, new d, available_ms, error)
        self._extends: list[tuple[int, int]] = []  # (id, d): in_progress
        self._hint = True  # something local happened: claim now rather than at the next poll
        self._poll = POLL_MIN
        self._next_poll = 0.0
        self._count_at = time.monotonic() + COUNT_REFRESH
        self.stopped = anyio.Event()  # set once the actor has given back what it held and ended

    # ------------------------------------------------------------ inputs

    def wake(self) -> None:
        self._hint = True
        super().wake()

    def on_committed(self, rows: list[StoredMessage]) -> None:
        """Messages committed here for this queue: counted; claimed by whichever broker comes first."""
        self.count += len(rows)
        self.published += len(rows)
        self.wake()

    def detach(self, consumer: Consumer) -> None:
        """Its unacked messages are released at once (their delivery counted), for any broker."""
        try:
            self.consumers.remove(consumer)
        except ValueError:
            pass
        now = self.ctx.now_ms()
        for did in sorted(consumer.inflight):
            inf = self.inflight.pop(did, None)
            if inf is not None:
                m = inf.msg
                self._releases.append((m.id, m.deliveries, m.deliveries, now, m.last_error))
        consumer.inflight.clear()
        if not self.consumers:
            self._let_go_claimed()
        self.wake()

    def settle(self, consumer: Consumer, items: list[list[Any]]) -> list[int]:
        """As QueueActor.settle; in_progress also extends the claim in the database."""
        codes: list[int] = []
        inflight = self.inflight
        mine = consumer.inflight
        mono = time.monotonic()
        for did, action, arg in items:
            inf = inflight.get(did)
            if inf is None or inf.consumer is not consumer:
                codes.append(int(ErrorCode.STALE_DELIVERY))
                continue
            msg = inf.msg
            if action == F.AckAction.IN_PROGRESS:
                # the local deadline starts before the database's: it lapses here first
                inf.deadline = mono + self.cfg.ack_deadline
                heapq.heappush(self._deadlines, (inf.deadline, did))
                self._extends.append((msg.id, msg.deliveries))
                codes.append(0)
                continue
            del inflight[did]
            mine.discard(did)
            if action == F.AckAction.ACK:
                self.acked += 1
                self.count -= 1
                self._acks.append((msg.id, msg.deliveries))
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
        self._releases.append((msg.id, msg.deliveries, msg.deliveries, self.ctx.now_ms() + int(d * 1000), error))

    def _dead_letter(self, msgs: list[StoredMessage], reason: str) -> None:
        try:
            super()._dead_letter(msgs, reason)
        except StorageError as exc:  # no ids for the new rows (ids.IdsUnavailable): the claims lapse
            self.count += len(msgs)
            self.dead_lettered -= len(msgs)
            log.warning("queue %s: dead-lettering %d messages deferred: %s", self.name, len(msgs), exc)

    def restore(self, msgs: list[StoredMessage], epoch: int) -> None:
        """A move out (dead-letter, redrive) failed: the rows are still here, claimed
        by this broker; they come back when the claim lapses."""
        self.store_failures += 1
        self.ctx.counters.state_failures += 1
        if epoch == self._epoch and not self._stopped:
            self.count += len(msgs)

    def _let_go_claimed(self) -> None:
        """Give back claimed messages no consumer took (their delivery uncounted)."""
        now = self.ctx.now_ms()
        while self._claimed:
            m, _ = self._claimed.popleft()
            self._releases.append((m.id, m.deliveries, m.deliveries - 1, now, m.last_error))

    def _want(self) -> int:
        """How many messages the local consumers can take now (free prefetch on
        connections with credit), less what is claimed already."""
        free = 0
        seen: dict[Peer, int] = {}
        for c in self.consumers:
            room = c.prefetch - len(c.inflight)
            if room <= 0:
                continue
            conn = c.conn
            if conn not in seen:
                seen[conn] = conn.credit(self.wake)
            if seen[conn] > 0:
                free += room
        return min(CLAIM_MAX, free - len(self._claimed))

    async def _claim(self, n: int) -> list[tuple[StoredMessage, float]]:
        use_by = time.monotonic() + self.cfg.ack_deadline  # before the database's deadline starts
        rows = await self.ctx.store.claim(self.name, n, int(self.cfg.ack_deadline * 1000),  # type: ignore[attr-defined]
                                          self.broker_id)
        return [(m, use_by) for m in rows]

    def _deliver(self) -> None:
        claimed = self._claimed
        if not claimed or not self.consumers:
            return
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
        heap = self._deadlines
        inflight = self.inflight
        out: dict[Consumer, list[Any]] = {}
        i = self._rr % len(cons)
        margin = min(CLAIM_MARGIN, self.cfg.ack_deadline / 2)  # a short deadline still leaves half to use
        while claimed and cons:
            if i >= len(cons):
                i = 0
            c = cons[i]
            conn = c.conn
            if left[conn] <= 0:
                conn.await_credit(wake)
                cons.pop(i)
                continue
            msg, use_by = claimed.popleft()
            if use_by - margin <= mono:
                # held too long: its claim may lapse while delivered; let it go (never delivered)
                self._releases.append((msg.id, msg.deliveries, msg.deliveries - 1, now, msg.last_error))
                continue
            if msg.expires_ms is not None and msg.expires_ms <= now:
                self._expire(msg)
                continue
            self._did += 1
            did = self._did
            inflight[did] = Inflight(msg, c, use_by)
            heapq.heappush(heap, (use_by, did))
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
            push_deliveries(c.conn, c.cid, items)

    async def _flush_ops(self) -> None:
        """Dead-letter moves go through the store's batches; acks (and expiries,
        deletes without a dead-letter queue), releases and extensions are one fenced
        transaction; then the settle waiters are answered."""
        ops, self.ops = self.ops, []
        for m in self._deletes:  # expired, or dead-lettered with no dead-letter queue
            self._acks.append((m.id, m.deliveries))
        self._deletes = []
        acks, self._acks = self._acks, []
        rel, self._releases = self._releases, []
        ext, self._extends = self._extends, []
        waiters, self._waiters = self._waiters, []
        error: Exception | None = None
        for op in ops:
            try:
                await self.ctx.store.write(op)
            except StorageError as exc:  # op.on_done restored what it took (restore)
                error = exc
        if acks or rel or ext:
            try:
                lost = await self.ctx.store.settle_claims(  # type: ignore[attr-defined]
                    self.name, self.broker_id, acks, rel, ext, int(self.cfg.ack_deadline * 1000))
            except StorageError as exc:
                # Nothing changed in the database: acked messages come back when their claim lapses.
                self.store_failures += 1
                self.ctx.counters.state_failures += 1
                log.error("queue %s: settling %d messages failed: %s", self.name, len(acks) + len(rel) + len(ext), exc)
                error = exc
            else:
                if lost:
                    self._revoke(lost)
        for fn in waiters:
            fn(error)

    def _revoke(self, ids: set[int]) -> None:
        """in_progress found the claim taken over: the delivery is no longer this consumer's."""
        for did, inf in list(self.inflight.items()):
            if inf.msg.id in ids:
                del self.inflight[did]
                inf.consumer.inflight.discard(did)

    def _drop_all(self) -> int:
        n = super()._drop_all()
        self._claimed.clear()
        self._acks.clear()
        self._releases.clear()
        self._extends.clear()
        self.beyond = 0
        return n

    async def take(self, n: int) -> list[StoredMessage]:
        """Claim up to ``n`` due messages (for redrive): moved by the caller, or given back."""
        out: list[StoredMessage] = []
        while len(out) < n:
            got = await self._claim(min(CLAIM_MAX, n - len(out)))
            if not got:
                break
            out.extend(m for m, _ in got)
        return out

    def give_back(self, msgs: list[StoredMessage]) -> None:
        now = self.ctx.now_ms()
        for m in msgs:
            self._releases.append((m.id, m.deliveries, m.deliveries - 1, now, m.last_error))
        self.wake()

    def _trim(self) -> None:
        """max_length with dead_letter_oldest: claim the oldest over the (refreshed) count."""

    async def _trim_shared(self) -> None:
        over = self._overflow()
        if over <= 0:
            return
        got = await self.take(min(over, CLAIM_MAX))
        if got:
            self._dead_letter(got, V.DLQ_MAX_LENGTH)

    # ------------------------------------------------------------- actor

    async def _run(self) -> None:
        try:
            while not self._stopped:
                self._expire_deadlines()
                self._deliver()
                await self._flush_ops()
                mono = time.monotonic()
                if mono >= self._count_at:
                    self._count_at = mono + COUNT_REFRESH
                    try:
                        self.count = await self.ctx.store.count(self.name)
                        await self._trim_shared()
                    except StorageError as exc:
                        self._read_failed(exc)
                    continue
                want = self._want() if self.consumers else 0
                if want > 0 and mono >= self._read_retry_at and (self._hint or mono >= self._next_poll):
                    self._hint = False
                    try:
                        got = await self._claim(want)
                    except StorageError as exc:
                        self._read_failed(exc)
                        continue
                    self._read_backoff = 0.0
                    if got:
                        self._claimed.extend(got)
                        if not self.consumers:  # the consumers left while the claim ran
                            self._let_go_claimed()
                        self._poll = POLL_MIN
                        continue
                    self._next_poll = time.monotonic() + self._poll
                    self._poll = min(POLL_MAX, self._poll * 2)
                if self._acks or self._releases or self._extends or self.ops or self._waiters or self._deletes:
                    continue
                if self._dirty:
                    self._dirty = False
                    if self._hint and want > 0:
                        continue
                timeout = self._timer(want)
                self._idle = True
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
                self._idle = False
                self._dirty = False
                self._wake.clear()
        finally:
            await self._final_flush()
            self.stopped.set()

    def _timer(self, want: int) -> float:
        mono = time.monotonic()
        t = self._count_at - mono
        if self._deadlines:
            t = min(t, self._deadlines[0][0] - mono)
        if want > 0:
            t = min(t, max(self._next_poll, self._read_retry_at) - mono)
        return max(t, 0.0)

    async def _final_flush(self) -> None:
        """Stopping (shutdown, delete): give back what is claimed here, so other
        brokers need not wait for the deadlines."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            if not self.consumers:
                self._let_go_claimed()
            try:
                await self._flush_ops()
            except Exception:  # actor boundary: the claims lapse by themselves
                log.exception("queue %s: the last settlements failed", self.name)

    def release_all(self) -> None:
        """Shutdown: every delivery and claim held here goes back (then the actor stops)."""
        for c in list(self.consumers):
            self.detach(c)
        self._let_go_claimed()
        self.stop()

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["ready_in_memory"] = len(self._claimed)
        out["shared"] = True
        return out
