"""Consumer groups whose members are on several brokers (cluster mode).

A :class:`SharedGroup` is a GroupActor (delivery, windows, acks, dead letters
are the same) whose partition assignment comes from the database instead of
its local member list (store/pg_cluster.py):

* Each local member has a lease row (``broker id/member number``), renewed by a
  round every ROUND_INTERVAL and at once when a member joins or leaves. A round
  locks the group row; if the live members (lease not lapsed, by the database's
  clock) differ from those the last generation was computed for, that broker
  computes the next generation (partition i -> live member i mod n, members
  sorted) while it holds the lock: exactly one broker per generation. Every
  other broker learns its members' partitions from its own next round.
* A partition a local member gains starts from the offsets committed in the
  database (another broker's member may have moved them); one it loses stops at
  once: its in-flight deliveries are void and their acks are refused as
  STALE_GENERATION.
* Offset commits are fenced: the database moves a partition's committed offset
  only for its owner at the generation that gave it it. A commit that is
  refused means the partition moved: it is dropped here and a round runs.
* A broker that cannot renew its leases (the database away, the broker
  stalled) stops delivering when its lease may have lapsed (LEASE after the
  last successful round began): the others then take its partitions.

A broker that dies (kill -9) leaves its members' leases to lapse after LEASE
seconds; the next round on a live broker gives their partitions to the others,
which start from the committed offsets (unacknowledged messages are delivered
again: at least once, in order per partition).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

import anyio

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode

from tidings.broker.durable.delivery import DELIVERY_OVERHEAD
from tidings.broker.durable.group import STORE_RETRY_DELAY, GroupActor, Member, PState
from tidings.broker.durable.store.base import StorageClosed, StorageError
from tidings.broker.durable.store.pg_cluster import ClusterStore

if TYPE_CHECKING:
    from tidings.broker.durable.context import DurableContext, StreamView
    from tidings.broker.durable.ports import Peer

log = logging.getLogger(__name__)

#: Seconds a member's lease lasts in the database without renewal: how long the
#: partitions of a broker that died wait before they move to members elsewhere.
#: Long enough that a busy broker or database does not lose its partitions to one
#: slow round (rounds come five times per lease).
LEASE: Final = 10.0
ROUND_INTERVAL: Final = LEASE / 5


class SharedGroup(GroupActor):
    def __init__(self, ctx: DurableContext, stream: StreamView, name: str,
                 offsets: dict[int, tuple[int, int]], broker_id: str) -> None:
        super().__init__(ctx, stream, name, offsets)
        self.broker_id = broker_id
        self._ids: dict[Member, str] = {}  # local member -> its name in the database
        self._gone: list[str] = []  # members that left here, deleted by the next round
        self._round = anyio.Event()
        self._valid_until = 0.0  # monotonic: the assignment holds until our leases may lapse
        self._epoch = 0  # bumped whenever a partition changes hands here
        self.rounds = 0

    @property
    def _store(self) -> ClusterStore:
        return cast(ClusterStore, self.ctx.store)  # cluster mode: a PostgresStore

    # ------------------------------------------------------------ members

    def join(self, conn: Peer, cid: int, window: int) -> Member:
        m = super().join(conn, cid, window)
        self._ids[m] = f"{self.broker_id}/{m.seq}"
        return m

    def leave(self, m: Member) -> None:
        mid = self._ids.pop(m, None)
        if mid is not None:
            self._gone.append(mid)
        super().leave(m)

    def _rebalance(self) -> None:
        """A member joined or left here: the partitions of one that left stop now;
        who gets what is the database round's to say."""
        for ps in self.parts:
            if ps.owner is not None and ps.owner not in self.members:
                self._drop(ps)
        self._round.set()
        self.wake()

    def _drop(self, ps: PState) -> None:
        ps.owner = None
        ps.reset()
        self._epoch += 1
        if self._persist_waiters:  # acks not committed to the database yet are void (fenced)
            self._void_waiters(ps, ps.persisted, ErrorCode.STALE_GENERATION,
                               "the partition was reassigned before the ack was committed")

    # ------------------------------------------------------------ rounds

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._rounds)
            try:
                await super().run(task_status=task_status)
            finally:
                tg.cancel_scope.cancel()

    async def _rounds(self) -> None:
        store = self._store
        backoff = 0.0
        while not self._stopped:
            self._round = anyio.Event()
            mine = [self._ids[m] for m in self.members if m in self._ids]
            gone, self._gone = self._gone, []
            if mine or gone:
                started = time.monotonic()
                try:
                    gen, parts, offsets = await store.group_round(self.stream.name, self.name, mine, gone, LEASE,
                                                                  len(self.parts))
                except StorageClosed:  # the broker is stopping: the leases lapse by themselves
                    return
                except StorageError as exc:
                    self._gone = gone + self._gone
                    backoff = self.ctx.read_failed(backoff, exc, f"group {self.stream.name}/{self.name} round")
                    self._check_lease()
                    await anyio.sleep(min(backoff, ROUND_INTERVAL))
                    continue
                backoff = 0.0
                self.rounds += 1
                self._valid_until = started + LEASE
                self._apply(gen, parts, offsets)
            wait = ROUND_INTERVAL
            if self._valid_until:
                wait = min(wait, max(0.0, self._valid_until - time.monotonic()))
            with anyio.move_on_after(wait):
                await self._round.wait()
            self._check_lease()

    def _check_lease(self) -> None:
        """No successful round for a lease's length: the others may own our partitions."""
        if self._valid_until and time.monotonic() >= self._valid_until:
            dropped = [ps for ps in self.parts if ps.owner is not None]
            for ps in dropped:
                self._drop(ps)
            if dropped:
                log.warning("group %s/%s: leases not renewed for %.0f s; stopped delivering partitions %s",
                            self.stream.name, self.name, LEASE, [ps.index for ps in dropped])
                self._notify()

    def _owner_for(self, parts: dict[int, tuple[str | None, int]], ps: PState) -> tuple[Member | None, int]:
        owner, gen = parts.get(ps.index, (None, 0))
        if owner is None:
            return None, gen
        for m, mid in self._ids.items():
            if mid == owner and m in self.members:
                return m, gen
        return None, gen

    def _apply(self, gen: int, parts: dict[int, tuple[str | None, int]],
               offsets: dict[int, tuple[int, int]]) -> None:
        """Take a round's assignment: a partition a local member gains starts from
        the offsets the round read after giving it (nothing from a stale offset)."""
        changed = False
        for ps in self.parts:
            m, pgen = self._owner_for(parts, ps)
            if m is ps.owner and (m is None or pgen == ps.gen):
                continue
            changed = True
            self._drop(ps)
            if m is None:
                continue
            ps.owner = m
            ps.gen = pgen
            c, d = offsets.get(ps.index, (ps.committed, ps.delivered))
            first = self.stream.partitions[ps.index].first
            ps.committed = ps.persisted = max(c, first)
            ps.cursor = ps.committed
            ps.delivered = ps.delivered_saved = ps.seen_below = max(d, ps.committed)
            ps.acked.clear()
            ps.attempts.clear()
            ps.dirty = False
        if changed or gen != self.generation:
            self.generation = max(gen, self.generation)
            self._notify()
        self.wake()

    def _notify(self) -> None:
        for m in self.members:
            mine = [ps.index for ps in self.parts if ps.owner is m]
            m.conn.push_wire([F.Op.NOTICE, V.NOTICE_ASSIGNMENT, {"cid": m.cid, "group": self.name,
                                                              "generation": self.generation,
                                                              "partitions": mine}], 128)

    # ------------------------------------------------------------ commits

    def _fence_rows(self, pss: list[PState], committed: bool) -> list[tuple[int, int, int, str, int]]:
        rows = []
        for ps in pss:
            mid = self._ids.get(ps.owner) if ps.owner is not None else None
            if mid is not None:
                rows.append((ps.index, ps.committed if committed else ps.persisted, ps.delivered, mid, ps.gen))
        return rows

    async def _send(self) -> None:
        """As GroupActor's, but each partition's deliveries go out only after the
        database confirmed (a fenced commit of its delivered offset) that this
        member still owns it at this generation: a broker that has not heard of a
        reassignment yet sends nothing of a partition that moved."""
        out, self._out = self._out, {}
        if not out:
            return
        sending = {it[6][0] for items in out.values() for it in items}
        pss = [ps for ps in self.parts if ps.index in sending]
        rows = self._fence_rows(pss, committed=False)
        for ps in pss:
            ps.delivered_saved = max(ps.delivered_saved, ps.delivered)
        epoch = self._epoch
        try:
            ok = await self._store.commit_group_offsets(self.stream.name, self.name, rows) if rows else set()
        except StorageError:
            # Sent anyway: until our leases may have lapsed (_check_lease stops us then)
            # no other broker can be given these partitions.
            ok = sending
        sent = {r[0]: r[4] for r in rows}
        fenced = [ps for ps in pss if ps.index not in ok and ps.owner is not None and ps.gen == sent.get(ps.index)]
        for ps in fenced:
            self._drop(ps)  # the database gave it to another member: stop here
        if fenced:
            self._notify()
            self._round.set()
        if fenced or epoch != self._epoch:
            out = {m: kept for m, items in out.items() if (kept := [it for it in items if self._still_owned(m, it)])}
        self._push_out(out)

    def _still_owned(self, m: Member, item: list[Any]) -> bool:
        idx, _offset, _key, gen = item[6]
        ps = self.parts[idx]
        if ps.owner is m and ps.gen == gen:
            return True
        m.conn.release(len(item[2]) + len(item[1]) + DELIVERY_OVERHEAD)  # reserved by _pump, never sent
        return False

    async def _flush_commits(self) -> None:
        await self._flush_dead_letters()
        dirty = [ps for ps in self.parts if ps.dirty]
        if not dirty:
            if self._persist_waiters:
                self._answer_waiters(None, set())
            return
        for ps in dirty:
            ps.dirty = False
        rows = self._fence_rows(dirty, committed=True)
        if not rows:
            if self._persist_waiters:
                self._answer_waiters(None, set())
            return
        sent = {r[0]: (r[1], r[4]) for r in rows}
        self._commit_retry_at = 0.0
        try:
            ok = await self._store.commit_group_offsets(self.stream.name, self.name, rows)
        except StorageError as error:
            log.error("group %s/%s: committing offsets failed: %s", self.stream.name, self.name, error)
            self.ctx.counters.state_failures += 1
            failed = {ps for ps in dirty if ps.index in sent}
            for ps in failed:
                ps.dirty = True
            self._commit_retry_at = time.monotonic() + STORE_RETRY_DELAY
            if self._persist_waiters:
                self._answer_waiters(error, failed)
            return
        fenced = False
        for ps in dirty:
            got = sent.get(ps.index)
            if got is None:
                continue
            c, gen = got
            if ps.index in ok:
                if ps.gen == gen:
                    ps.persisted = max(ps.persisted, c)
            elif ps.gen == gen and ps.owner is not None:
                self._drop(ps)  # the database gave it to another member: stop here
                fenced = True
        if fenced:
            log.info("group %s/%s: a partition was reassigned elsewhere; asking for the new assignment",
                     self.stream.name, self.name)
            self._notify()
            self._round.set()
        if self._persist_waiters:
            self._answer_waiters(None, set())
