"""Ordered partitioned streams: one StreamActor per stream.

A stream is P append-only partitions (durable/partition.py). A publish's key
picks its partition (protocol.partition.partition_for, :meth:`StreamActor.pick`);
keyless publishes go round-robin. Offsets are assigned when the store
operation is queued (in commit order), so they are dense and increasing; a
partition's ``hwm`` is one past the last committed offset and only committed
messages are ever delivered: to consumer groups (durable/group.py, where a
group assigns partitions) and to readers (durable/reader.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tidings.protocol.partition import partition_for

from tidings.broker.durable.partition import Partition
from tidings.broker.durable.settings import StreamConfig
from tidings.broker.durable.store.streams import StreamRow

if TYPE_CHECKING:
    from tidings.broker.durable.group import GroupActor
    from tidings.broker.durable.reader import Reader

KEY_CACHE: Final = 65_536  # keys whose partition is remembered per stream


class StreamActor:
    def __init__(self, cfg: StreamConfig, parts: list[Partition]) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.partitions = parts
        self.groups: dict[str, GroupActor] = {}
        self.readers: set[Reader] = set()
        self._rr = 0
        self._key_cache: dict[str, int] = {}
        self.published = 0
        self.trimmed = 0

    def pick(self, key: str | None) -> Partition:
        if key is None:
            self._rr += 1
            return self.partitions[self._rr % len(self.partitions)]
        idx = self._key_cache.get(key)
        if idx is None:  # the hash is pure Python: remember it per key (bounded)
            if len(self._key_cache) >= KEY_CACHE:
                self._key_cache.clear()
            idx = self._key_cache[key] = partition_for(key, len(self.partitions))
        return self.partitions[idx]

    @property
    def dead_lettered(self) -> int:
        """Messages the stream's groups sent to its dead-letter queue."""
        return sum(g.dead_lettered for g in self.groups.values())

    def forget_reader(self, reader: Reader) -> None:
        self.readers.discard(reader)

    def close(self, reason: str) -> None:
        """The stream is deleted: close every group's members and every reader."""
        for g in self.groups.values():
            g.close(reason)
        for r in list(self.readers):
            r.conn.consumers.pop(r.cid, None)
            r.close()

    def on_committed(self, rows_by_part: dict[int, list[StreamRow]]) -> None:
        for idx, rows in rows_by_part.items():
            self.partitions[idx].committed(rows)
            self.published += len(rows)
        for g in self.groups.values():
            g.wake()

    def info(self) -> dict[str, Any]:
        parts = [{"partition": p.index, "first": p.first, "next": p.hwm, "messages": p.hwm - p.first}
                 for p in self.partitions]
        groups = {}
        for name, g in self.groups.items():
            groups[name] = g.info()
        return {"name": self.name, "partitions": parts, "groups": groups, "bind": list(self.cfg.bind),
                "published": self.published, "dead_lettered": self.dead_lettered, "trimmed": self.trimmed,
                "readers": len(self.readers), "config": self.cfg.to_dict()}
