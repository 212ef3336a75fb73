"""A partition's head in cluster mode (durable/shared_stream.py): rows committed here
and rows other brokers wrote meet in the tail in offset order, never with a hole."""

from __future__ import annotations

from tidings.broker.durable.partition import Partition
from tidings.broker.durable.shared_stream import advance, feed, jump
from tidings.broker.durable.store.streams import StreamRow


def rows(lo: int, hi: int) -> list[StreamRow]:
    return [StreamRow("s", 0, o, "x", None, b"p", None, None, 1) for o in range(lo, hi)]


def tail(part: Partition) -> list[int]:
    return [r.offset for r in part.tail]


def test_own_rows_continue_the_head_and_rows_past_a_gap_wait() -> None:
    part = Partition("s", 0, 0, 0, 0)
    assert advance(part, rows(0, 3)) and part.hwm == 3
    assert not advance(part, rows(5, 7))  # 3 and 4 were written on another broker
    assert part.hwm == 3 and tail(part) == [0, 1, 2]
    feed(part, rows(3, 7))  # read from the database: in order, overlapping what is known
    assert part.hwm == 7 and tail(part) == list(range(7))
    assert advance(part, rows(5, 7)) and tail(part) == list(range(7))  # already known: no repeat


def test_retention_or_a_large_gap_moves_the_head_and_empties_the_tail() -> None:
    part = Partition("s", 0, 0, 0, 0)
    advance(part, rows(0, 2))
    changed = part.changed
    jump(part, 50)
    assert part.hwm == 50 and not part.tail and part.next >= 50 and changed.is_set()
    assert part.get(10, 5) is None  # below the tail: readers page from the store
    feed(part, rows(60, 62))  # the rows between were removed by retention
    assert part.hwm == 62 and tail(part) == [60, 61]
