"""What decoding a frame may cost in memory (issue 10.18).

A 1 MiB frame of empty arrays used to decode to ~70 MB of Python objects;
nested array headers in a 16 KiB pre-handshake frame made msgpack
allocate ~128 MB for items that never came. Now such frames are protocol
errors and decoding stays within a small multiple of the frame size.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any, Callable

import msgpack
import pytest

from tidings.protocol import Connection, ErrorCode, RemoteProtocolError, Role
from tidings.protocol import frames as F
from tidings.protocol.codec import (BYTES_PER_CONTAINER, COUNT_CONTAINERS_ABOVE, DEFAULT_MAX_FRAME, HEADER,
                            PRE_HELLO_MAX_FRAME, unpack_bounded)

MIB = 1024 * 1024
# Decoding may cost at most this many times the frame's size (a legitimate ACK batch, the densest
# frame there is, costs ~25; the refused frames below cost ~70 before the fix).
MAX_AMPLIFICATION = 32


def peak_of(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
    except RemoteProtocolError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def array_of(n: int, item: bytes) -> bytes:
    return b"\xdd" + struct.pack(">I", n) + item * n


def chains(total: int, depth: int) -> bytes:
    """An array of arrays nested ``depth`` deep (each holding one), ~``total`` bytes."""
    one = b"\x91" * depth + b"\xc0"
    return array_of(total // len(one), one)


DENSE = {
    "empty_arrays": lambda n: array_of(n - 5, b"\x90"),
    "empty_maps": lambda n: array_of(n - 5, b"\x80"),
    "one_item_chains": lambda n: chains(n, 1000),
    "one_entry_map_chains": lambda n: array_of((n - 5) // 2000, b"\x81\xa0" * 1000 + b"\xc0"),
    "pub_of_empty_arrays": lambda n: b"\x92\x0a" + array_of(n - 7, b"\x90"),
}


@pytest.mark.parametrize("kind", list(DENSE))
def test_a_dense_frame_is_an_error_and_costs_memory_in_proportion(kind: str) -> None:
    body = DENSE[kind](MIB)
    assert len(body) > COUNT_CONTAINERS_ABOVE
    with pytest.raises(RemoteProtocolError) as info:
        unpack_bounded(body)
    assert "arrays and maps" in info.value.message
    assert not info.value.fatal
    peak = peak_of(lambda: unpack_bounded(body))
    assert peak < MAX_AMPLIFICATION * len(body), (kind, peak // MIB)


def test_the_densest_legitimate_frame_still_decodes() -> None:
    """An ACK batch of [id, action, nil] items: one array per 4 bytes."""
    items = [[i % 100, 0, None] for i in range(MIB // 4 - 64)]
    body = msgpack.packb([F.Op.ACK, 1, 1, items])
    assert len(body) <= DEFAULT_MAX_FRAME and len(body) // BYTES_PER_CONTAINER >= len(items)
    assert unpack_bounded(body)[3] == items


def test_nested_headers_before_hello_do_not_allocate_their_claims() -> None:
    """Each array32 header claims 16K items: msgpack allocated them before reading any."""
    hdr = b"\xdd" + struct.pack(">I", PRE_HELLO_MAX_FRAME)
    body = (hdr * (PRE_HELLO_MAX_FRAME // len(hdr)))[:PRE_HELLO_MAX_FRAME - 8]
    conn = Connection(Role.SERVER)
    conn.receive_data(HEADER.pack(len(body)) + body)

    def decode() -> None:
        conn.next_event()

    peak = peak_of(decode)
    assert peak < 4 * MIB, peak // MIB
    assert conn.state.name == "CLOSED"  # an undecodable first frame is fatal before HELLO


def test_hello_still_decodes_before_the_handshake() -> None:
    conn = Connection(Role.SERVER)
    hello = F.Hello(F.PROTOCOL_VERSION, "c" * 200, {"user": "u" * 200, "password": "p" * 200},
                    {"max_frame": DEFAULT_MAX_FRAME, **{f"opt{i}": i for i in range(40)}})
    body = msgpack.packb(hello.to_wire())
    conn.receive_data(HEADER.pack(len(body)) + body)
    assert conn.next_event() == hello


def test_a_server_bounds_large_frames_after_hello_and_a_client_does_not() -> None:
    body = DENSE["pub_of_empty_arrays"](MIB)
    client = Connection(Role.CLIENT, max_frame=2 * MIB)
    client.send(F.Hello(F.PROTOCOL_VERSION, "c", None, {}))
    welcome = msgpack.packb(F.Welcome(F.PROTOCOL_VERSION, "s", {"max_frame": 2 * MIB}).to_wire())
    client.receive_data(HEADER.pack(len(welcome)) + welcome + HEADER.pack(len(body)) + body)
    assert isinstance(client.next_event(), F.Welcome)
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()  # decoded (the broker is trusted), then refused by the frame checks
    assert "arrays and maps" not in info.value.message


def test_a_dense_frame_after_hello_leaves_the_connection_in_sync() -> None:
    server = Connection(Role.SERVER, max_frame=2 * MIB)
    client = Connection(Role.CLIENT, max_frame=2 * MIB)
    server.receive_data(client.send(F.Hello(F.PROTOCOL_VERSION, "c", None, {})))
    assert isinstance(server.next_event(), F.Hello)
    client.receive_data(server.send(F.Welcome(F.PROTOCOL_VERSION, "s", {})))
    client.next_event()
    body = DENSE["pub_of_empty_arrays"](MIB)
    server.receive_data(HEADER.pack(len(body)) + body + client.send(F.Ping(7)))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == ErrorCode.PROTOCOL_ERROR and not info.value.fatal
    assert server.next_event() == F.Ping(7)
