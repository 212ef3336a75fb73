"""What an actor of the durable layer is given instead of its parent.

A :class:`QueueActor`, :class:`GroupActor`, :class:`StreamActor` or
:class:`Reader` gets one :class:`DurableContext`: the clock and the message
id allocator, the store, the dead-letter sink, the broker-wide window
budget and the counters every actor bumps. It never holds ``Durable`` nor
reaches into another actor's fields; what it asks of others goes through
the context (a store operation, a dead-letter move) or through a method of
the actor that owns the state.

A group or reader also reads its stream's name, settings and partition logs
(:class:`StreamView`): shared read-only data, not the stream's own state.

The other direction, what ``Durable`` and ``Streams`` ask of the broker
around them, is ``ports.Host``: the durable layer never imports the
composition root.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from tidings.broker.durable.window import WindowBudget

if TYPE_CHECKING:
    from tidings.broker.durable.partition import Partition
    from tidings.broker.durable.settings import StreamConfig
    from tidings.broker.durable.store.base import PutMessages, StorageError, Store, StoredMessage
    from tidings.broker.durable.store.streams import StreamRow

log = logging.getLogger(__name__)

#: Back-off (seconds, first and longest) between attempts of a failed read
#: (the database locked by a backup or an admin tool, say); the broker serves on.
READ_RETRY: Final = (0.5, 10.0)

#: A dead-letter move out of a queue: (source id, new row) pairs, and the call
#: that hands the committed rows to the dead-letter queue.
DeadLetterMoves = tuple[list[tuple[int, "StoredMessage"]], Callable[[list["StoredMessage"]], None]]


class DeadLetterSink(Protocol):
    """Where poison, rejected, expired and overflowing messages go (durable/deadletter.py)."""

    def from_queue(self, source: str, target: str | None, msgs: list[StoredMessage],
                   reason: str) -> DeadLetterMoves | None:
        """The moves of ``msgs`` into ``target`` (None: there is no such queue)."""
        ...

    def from_stream(self, stream: str, target: str | None, row: StreamRow, reason: str, attempts: int,
                    error: str) -> PutMessages:
        """The store operation that copies a stream's poison message to ``target``."""
        ...


class StreamView(Protocol):
    """What a consumer group or a reader reads of its stream."""

    @property
    def name(self) -> str: ...

    @property
    def cfg(self) -> StreamConfig: ...

    @property
    def partitions(self) -> list[Partition]: ...


class Counters:
    """Broker-wide counters of the durable layer (stats and metrics read them)."""

    __slots__ = ("state_failures", "read_errors")

    def __init__(self) -> None:
        # Store operations changing a message's state (ack, nack, dead-letter move,
        # offset mark) that failed: the state was restored in memory.
        self.state_failures = 0
        self.read_errors = 0  # reads (refills, replays) that failed and are retried


class DurableContext:
    """Clock, ids, store, dead-letter sink, window budget and counters, for actors."""

    __slots__ = ("store", "window_budget", "dead_letters", "counters", "last_id", "clustered", "_last_ms")

    def __init__(self, store: Store, window_budget: WindowBudget,
                 dead_letters: DeadLetterSink | None = None) -> None:
        self.store = store
        self.window_budget = window_budget
        # Set by the owner once built (the sink itself uses this context's clock and ids).
        self.dead_letters: DeadLetterSink = dead_letters if dead_letters is not None else _NoDeadLetters()
        self.counters = Counters()
        self.last_id = 0  # the highest message id assigned (recovered from the store at start)
        self.clustered = False  # ids from database blocks: ids.ClusterContext (several brokers)
        self._last_ms = 0

    def now_ms(self) -> int:
        """Wall-clock milliseconds, never going backwards within this process."""
        now = int(time.time() * 1000)
        if now < self._last_ms:
            return self._last_ms
        self._last_ms = now
        return now

    def next_id(self) -> int:
        """A new message id: ids increase in the order they are assigned."""
        self.last_id += 1
        return self.last_id

    async def reserve_ids(self, n: int) -> None:
        """Return once ``n`` ids can be handed out without waiting: at once here
        (ids.ClusterContext waits for a block from the database)."""

    def read_failed(self, backoff: float, exc: StorageError, who: str) -> float:
        """Count and log a failed read (the database locked past the busy timeout,
        say); returns the next back-off, doubling from READ_RETRY[0] to READ_RETRY[1]."""
        self.counters.read_errors += 1
        lo, hi = READ_RETRY
        backoff = min(hi, backoff * 2) if backoff else lo
        log.warning("%s: reading from the store failed, retrying in %.1f s: %s", who, backoff, exc)
        return backoff


class _NoDeadLetters:
    """Until the owner sets the real sink: no dead-letter queue exists."""

    def from_queue(self, source: str, target: str | None, msgs: list[StoredMessage],
                   reason: str) -> DeadLetterMoves | None:
        return None

    def from_stream(self, stream: str, target: str | None, row: StreamRow, reason: str, attempts: int,
                    error: str) -> PutMessages:
        raise RuntimeError("no dead-letter sink")
