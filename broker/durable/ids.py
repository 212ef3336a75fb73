"""Message ids unique across several brokers on one database (cluster mode).

A single broker hands out ids from a high-water mark it loaded at start
(``DurableContext.next_id``). Brokers sharing a database would collide that
way, so in cluster mode each takes *blocks* of ids from the database
(``PostgresStore.allocate_ids``: one ``UPDATE ... RETURNING`` moves the shared
mark on by ID_BLOCK) and hands them out in memory. A block is fetched ahead of
need, when less than ID_LOW_WATER ids are left, by a task of its own: the
publish path never waits for the database unless a burst outruns the refill
(``reserve`` then waits for the next block). Ids stay unique across brokers
and restarts (a block is never handed out twice; the unused rest of a block
is skipped after a restart); they increase per broker, not across brokers.

``ClusterContext`` is the ``DurableContext`` Durable builds in cluster mode:
``next_id()`` has the same signature, so queues, dead-lettering, redrive and
streams use it unchanged.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Final

import anyio

from tidings.broker.durable.context import READ_RETRY, DurableContext
from tidings.broker.durable.store.base import StorageError

if TYPE_CHECKING:
    from tidings.broker.durable.store.base import Store
    from tidings.broker.durable.window import WindowBudget

log = logging.getLogger(__name__)

#: Ids per allocation: one database round trip per 10,000 messages costs nothing at
#: any rate we reach (15,000+ msg/s is 1.5 allocations a second), and a restart
#: skips at most this many ids (a 63-bit id space does not mind).
ID_BLOCK: Final = 10_000
#: Fetch the next block while this many ids are still left, so that the refill (one
#: round trip, milliseconds) lands before a broker publishing at full speed runs dry.
ID_LOW_WATER: Final = ID_BLOCK


class IdsUnavailable(StorageError):
    """No id block could be fetched from the database yet: refused as retriable."""

    retriable = True


class ClusterContext(DurableContext):
    """A DurableContext whose ids come from database blocks (see the module docstring)."""

    __slots__ = ("_limit", "_blocks", "_need", "_got", "_failed", "_stopped")

    def __init__(self, store: Store, window_budget: WindowBudget) -> None:
        super().__init__(store, window_budget)
        self.clustered = True
        self._limit = 0  # the last id of the current block (last_id < _limit: ids left)
        self._blocks: deque[tuple[int, int]] = deque()  # fetched, unused blocks (first - 1, last)
        self._need = anyio.Event()  # set: the refill task should fetch a block
        self._got = anyio.Event()  # set whenever a block arrives (or a fetch failed)
        self._failed = ""  # why the last fetch failed ("" once one succeeds)
        self._stopped = False

    def left(self) -> int:
        """Ids that can be handed out without the database."""
        return self._limit - self.last_id + sum(hi - lo for lo, hi in self._blocks)

    def next_id(self) -> int:
        """A new id, unique across the brokers. Raises IdsUnavailable if every
        fetched block is used up (``reserve`` before a burst prevents it)."""
        if self.last_id >= self._limit:
            if not self._blocks:
                self._need.set()
                raise IdsUnavailable("no message ids left: the database has not answered the id allocation yet")
            self.last_id, self._limit = self._blocks.popleft()
        self.last_id += 1
        if self._limit - self.last_id < ID_LOW_WATER and not self._blocks:
            self._need.set()
        return self.last_id

    async def reserve_ids(self, n: int) -> None:
        """Return once ``n`` ids can be handed out without waiting. Raises
        IdsUnavailable if the database cannot give a block now."""
        while self.left() < n:
            if self._stopped:
                raise IdsUnavailable("the broker is stopping")
            self._need.set()
            got = self._got
            await got.wait()
            if self.left() < n and self._failed:
                raise IdsUnavailable(f"no message ids: {self._failed}")

    async def first_block(self) -> None:
        """Fetch the first block (at start). Raises StorageError."""
        await self._fetch()

    async def _fetch(self) -> None:
        last = await self.store.allocate_ids(ID_BLOCK)  # type: ignore[attr-defined]
        block = (last - ID_BLOCK, last)
        if self.last_id >= self._limit:
            self.last_id, self._limit = block
        else:
            self._blocks.append(block)

    async def refill(self) -> None:
        """The refill task: fetch a block whenever asked; retry a failure with back-off."""
        backoff = 0.0
        try:
            while True:
                await self._need.wait()
                self._need = anyio.Event()
                while self.left() < ID_LOW_WATER + ID_BLOCK // 2:
                    got, self._got = self._got, anyio.Event()
                    try:
                        await self._fetch()
                    except StorageError as exc:
                        self._failed = str(exc)
                        got.set()
                        backoff = min(READ_RETRY[1], backoff * 2) if backoff else READ_RETRY[0]
                        log.warning("allocating message ids failed, retrying in %.1f s: %s", backoff, exc)
                        await anyio.sleep(backoff)
                        continue
                    backoff = 0.0
                    self._failed = ""
                    got.set()
        finally:
            self._stopped = True
            self._got.set()
