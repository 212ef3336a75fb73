"""One partition of a stream: its offsets and the in-memory tail of its log.

Offsets are assigned (``next``) when a publish's store operation is queued,
in commit order; ``hwm`` is one past the last committed offset and only
committed rows are ever read. The newest rows stay in memory (``tail``) for
live consumers; older ones are read from the store.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import anyio

from tidings.broker.durable.store.streams import StreamRow

TAIL_MESSAGES: Final = 20_000  # newest messages per partition kept in memory for live consumers
TAIL_BYTES: Final = 8 * 1024 * 1024
READ_PAGE: Final = 1_000  # rows per disk read of a partition (fewer when the window budget says so)
GAP: Final = ""  # subject of a placeholder for an offset whose write failed (never a valid subject)


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
