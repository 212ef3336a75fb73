"""The stream partitioner is part of the wire contract: clients in other
languages must compute the same partition for a key. FNV-1a 32 is computed
here independently from its published constants."""

from __future__ import annotations

from collections import Counter

import pytest

from tidings.protocol.partition import fnv1a_32, partition_for

# published FNV-1a 32-bit parameters (http://www.isthe.com/chongo/tech/comp/fnv/)
OFFSET_BASIS = 0x811C9DC5
PRIME = 0x01000193


def reference_fnv1a_32(data: bytes) -> int:
    h = OFFSET_BASIS
    for byte in data:
        h ^= byte
        h = (h * PRIME) % 2**32
    return h


# published test vectors of FNV-1a 32
@pytest.mark.parametrize("data,expected", [
    (b"", 0x811C9DC5),
    (b"a", 0xE40C292C),
    (b"foobar", 0xBF9CF968),
])
def test_fnv1a_known_vectors(data: bytes, expected: int) -> None:
    assert reference_fnv1a_32(data) == expected
    assert fnv1a_32(data) == expected


# pinned: changing any of these moves existing keys to other partitions (and
# docs/PROTOCOL.md quotes the first rows as test vectors)
PINNED = [
    ("customer-42", 0xFE68ADBE, 8, 6),
    ("order-1001", 0x916F3D8C, 16, 12),
    ("user-1", 0xF5537974, 12, 4),
    ("größe", 0xCD38F49A, 5, 4),
    ("日本", 0x9F26EE51, 4, 1),
    ("", 0x811C9DC5, 7, 0x811C9DC5 % 7),
    ("a", 0xE40C292C, 3, 0xE40C292C % 3),
]


@pytest.mark.parametrize("key,hash32,partitions,expected", PINNED)
def test_partition_for_is_stable(key: str, hash32: int, partitions: int, expected: int) -> None:
    assert reference_fnv1a_32(key.encode("utf-8")) == hash32
    assert fnv1a_32(key.encode("utf-8")) == hash32
    assert partition_for(key, partitions) == expected == hash32 % partitions


def test_small_literal_values() -> None:
    assert partition_for("a", 8) == 4
    assert partition_for("foobar", 8) == 0
    assert partition_for("", 8) == 5


def test_key_is_hashed_as_utf8() -> None:
    assert fnv1a_32("größe".encode()) != fnv1a_32("größe".encode("latin-1"))
    assert partition_for("größe", 1000) == reference_fnv1a_32("größe".encode()) % 1000


def test_same_key_same_partition() -> None:
    for i in range(200):
        k = f"user-{i}"
        assert len({partition_for(k, 12) for _ in range(3)}) == 1


def test_one_partition_takes_everything() -> None:
    assert {partition_for(f"k{i}", 1) for i in range(100)} == {0}


@pytest.mark.parametrize("partitions", [0, -1])
def test_partitions_must_be_positive(partitions: int) -> None:
    with pytest.raises(ValueError):
        partition_for("k", partitions)


@pytest.mark.parametrize("partitions", [4, 8, 12, 16, 32])
def test_distribution_is_roughly_even(partitions: int) -> None:
    n = 10_000
    counts = Counter(partition_for(f"key-{i}", partitions) for i in range(n))
    assert set(counts) == set(range(partitions))
    mean = n / partitions
    for p, c in counts.items():
        assert 0.8 * mean <= c <= 1.2 * mean, (p, c, mean)
