"""DELIVER framing shared by queues, consumer groups and stream readers.

A consumer's deliveries go out as DELIVER frames of at most
DELIVER_FRAME_BUDGET payload bytes each; DELIVERY_OVERHEAD is what one item
is counted beyond its payload and subject against a connection's credit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tidings.protocol import frames as F

if TYPE_CHECKING:
    from tidings.broker.durable.ports import Peer

DELIVER_FRAME_BUDGET: Final = 512 * 1024  # bytes of payload per DELIVER frame before starting another
DELIVERY_OVERHEAD: Final = 48  # estimated envelope bytes of one DELIVER item, counted against credit


def push_deliveries(conn: Peer, cid: int, items: list[Any]) -> int:
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
