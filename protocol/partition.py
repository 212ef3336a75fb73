"""The stream partitioner: which partition a key's messages go to.

partition = fnv1a_32(utf8(key)) mod partitions, where fnv1a_32 is 32-bit
FNV-1a (offset basis 2166136261, prime 16777619). It is documented in
docs/PROTOCOL.md so clients in other languages compute the same.
"""

from __future__ import annotations

from typing import Final

FNV_OFFSET: Final = 2166136261
FNV_PRIME: Final = 16777619


def fnv1a_32(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_for(key: str, partitions: int) -> int:
    """Return the partition in ``range(partitions)`` for ``key``."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return fnv1a_32(key.encode("utf-8")) % partitions
