"""Splitting a byte stream into frames: chunking never changes the result,
the end of stream is reported cleanly, and oversized length prefixes are
refused after only the 4 header bytes (before any body is buffered)."""

from __future__ import annotations

import pytest

from tidings.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
)
from tidings.protocol import frames as F
from tidings.protocol.codec import DEFAULT_MAX_FRAME, HEADER, PRE_HELLO_MAX_FRAME


def _client_frames() -> list[F.Frame]:
    frames: list[F.Frame] = []
    for i in range(1, 13):
        frames.append(F.Pub([[f"orders.{i}.created", bytes([i]) * i, {"n": i} if i % 2 else None,
                              None, i % 3, None] for _ in range(i % 4)]))
        frames.append(F.Sub(i, i, f"orders.{i}.>", "g" if i % 5 == 0 else None))
        frames.append(F.Ping(i))
        frames.append(F.Call(i, "stats", {"i": i, "s": "x" * i}))
        frames.append(F.Ack(0, 1, [[i, i % 4, None]]))
    # one big frame so some splits land deep inside a body
    frames.append(F.Pub([["big", b"\xab" * 1500, None, None, 0, None]]))
    return frames


def _drain(conn: Connection) -> list[F.Frame]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        assert ev is not CLOSED
        out.append(ev)
    return out


@pytest.fixture
def server_stream(make_pair) -> tuple[bytes, list[F.Frame]]:
    c, _ = make_pair()
    frames = _client_frames()
    return b"".join(c.send(f) for f in frames), frames


def _opened_server(make_pair) -> Connection:
    return make_pair()[1]


def test_stream_fed_whole(make_pair, server_stream) -> None:
    data, frames = server_stream
    s = _opened_server(make_pair)
    s.receive_data(data)
    assert _drain(s) == frames
    assert s.buffered == 0 and not s.has_partial_frame


def test_stream_fed_one_byte_at_a_time(make_pair, server_stream) -> None:
    data, frames = server_stream
    s = _opened_server(make_pair)
    got: list[F.Frame] = []
    for i in range(len(data)):
        s.receive_data(data[i:i + 1])
        got.extend(_drain(s))
    assert got == frames
    assert s.buffered == 0


def test_stream_split_at_every_offset(make_pair, server_stream) -> None:
    data, frames = server_stream
    for cut in range(len(data) + 1):
        s = _opened_server(make_pair)
        if cut:
            s.receive_data(data[:cut])
        got = _drain(s)
        if cut < len(data):
            s.receive_data(data[cut:])
        got += _drain(s)
        assert got == frames, cut


def test_small_stream_split_at_every_offset_into_three(make_pair) -> None:
    c, _ = make_pair()
    frames = [F.Ping(1), F.Pub([["a.b", b"xyz", {"k": "v"}, "r.s", 3, {"key": "k"}]]), F.Unsub(2, 3), F.Stop(0, 1)]
    data = b"".join(c.send(f) for f in frames)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            s = make_pair()[1]
            got: list[F.Frame] = []
            for part in (data[:i], data[i:j], data[j:]):
                if part:
                    s.receive_data(part)
                got += _drain(s)
            assert got == frames, (i, j)


def test_client_side_stream_including_welcome_every_offset() -> None:
    # the handshake answer and the first pushes may arrive in one read, or byte by byte
    s = Connection(Role.SERVER)
    c0 = Connection(Role.CLIENT)
    s.receive_data(c0.send(F.Hello(1, "x", None, {})))
    s.next_event()
    frames: list[F.Frame] = [F.Welcome(1, "srv", {}),
                             F.Notice("bindings", {"epoch": 1, "patterns": ["jobs.>"]}),
                             F.Msg(1, [["a", b"1", None, None], ["b", b"22", {"h": 1}, "r"]]),
                             F.Confirm([[1, 0, None]]),
                             F.Deliver(2, [[1, "jobs.a", b"p", None, 1, 5, None]]),
                             F.Ok(3, {"x": [1, 2]}), F.Err(0, 1, "bad"), F.Ping(9)]
    data = b"".join(s.send(f) for f in frames)
    for cut in range(len(data) + 1):
        c = Connection(Role.CLIENT)
        c.send(F.Hello(1, "x", None, {}))
        got: list[F.Frame] = []
        for part in (data[:cut], data[cut:]):
            if part:
                c.receive_data(part)
            got += _drain(c)
        assert got == frames, cut
        assert c.state is State.OPEN


def test_clean_end_of_stream_between_frames(pair) -> None:
    c, s = pair
    s.receive_data(c.send(F.Ping(1)) + c.send(F.Ping(2)))
    s.receive_data(b"")
    assert s.next_event() == F.Ping(1)
    assert s.next_event() == F.Ping(2)
    assert s.next_event() is CLOSED
    assert s.state is State.CLOSED


def test_end_of_stream_inside_a_frame_is_fatal(make_pair) -> None:
    c, _ = make_pair()
    data = c.send(F.Ping(1))
    for cut in range(1, len(data)):
        _, s2 = make_pair()
        s2.receive_data(data[:cut])
        assert s2.next_event() is NEED_DATA
        assert s2.has_partial_frame and s2.buffered == cut
        s2.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as ei:
            s2.next_event()
        assert ei.value.fatal and s2.state is State.CLOSED


def test_receive_after_end_of_stream_is_a_local_error(pair) -> None:
    _, s = pair
    s.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        s.receive_data(b"\x00")


def test_next_event_after_close_is_a_local_error(pair) -> None:
    _, s = pair
    s.close()
    with pytest.raises(LocalProtocolError):
        s.next_event()


# ------------------------------------------------------------- size limits

def _assert_too_large(conn: Connection, length: int) -> None:
    conn.receive_data(HEADER.pack(length))  # the header alone: no body is ever sent
    with pytest.raises(RemoteProtocolError) as ei:
        conn.next_event()
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
    assert ei.value.fatal is True
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("length", [0xFFFFFFFF, PRE_HELLO_MAX_FRAME + 1, 2**31])
def test_oversized_frame_before_hello_server(length: int) -> None:
    s = Connection(Role.SERVER)
    assert s.inbound_limit == PRE_HELLO_MAX_FRAME
    _assert_too_large(s, length)


@pytest.mark.parametrize("length", [0xFFFFFFFF, PRE_HELLO_MAX_FRAME + 1])
def test_oversized_frame_before_welcome_client(length: int) -> None:
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "x", None, {}))
    assert c.inbound_limit == PRE_HELLO_MAX_FRAME
    _assert_too_large(c, length)


@pytest.mark.parametrize("max_frame", [PRE_HELLO_MAX_FRAME, 100_000, DEFAULT_MAX_FRAME])
@pytest.mark.parametrize("side", ["client", "server"])
def test_oversized_frame_after_handshake(make_pair, max_frame: int, side: str) -> None:
    c, s = make_pair(client_max_frame=max_frame, server_max_frame=max_frame)
    conn = c if side == "client" else s
    assert conn.inbound_limit == max_frame
    _assert_too_large(conn, max_frame + 1)
    c, s = make_pair(client_max_frame=max_frame, server_max_frame=max_frame)
    _assert_too_large(c if side == "client" else s, 0xFFFFFFFF)


def test_frame_at_exactly_the_limit_is_accepted(make_pair) -> None:
    # the length check is `> limit`, not `>=`: a frame of exactly max_frame is waited for
    s = Connection(Role.SERVER)
    s.receive_data(HEADER.pack(PRE_HELLO_MAX_FRAME))
    assert s.next_event() is NEED_DATA
    _, s = make_pair(server_max_frame=100_000)
    s.receive_data(HEADER.pack(100_000))
    assert s.next_event() is NEED_DATA


def test_limit_rises_from_pre_hello_to_negotiated(make_pair) -> None:
    c, s = Connection(Role.CLIENT, max_frame=2 * DEFAULT_MAX_FRAME), Connection(Role.SERVER)
    assert s.inbound_limit == PRE_HELLO_MAX_FRAME
    s.receive_data(c.send(F.Hello(1, "n", None, {})))
    s.next_event()
    assert s.inbound_limit == PRE_HELLO_MAX_FRAME  # only once WELCOME is out
    c.receive_data(s.send(F.Welcome(1, "srv", {})))
    assert s.inbound_limit == DEFAULT_MAX_FRAME
    assert c.inbound_limit == PRE_HELLO_MAX_FRAME
    c.next_event()
    assert c.inbound_limit == 2 * DEFAULT_MAX_FRAME
    # a payload above the pre-HELLO limit now flows both ways
    big = b"\x01" * (PRE_HELLO_MAX_FRAME * 2)
    s.receive_data(c.send(F.Pub([["a", big, None, None, 0, None]])))
    assert s.next_event() == F.Pub([["a", big, None, None, 0, None]])
    c.receive_data(s.send(F.Msg(1, [["a", big, None, None]])))
    assert c.next_event() == F.Msg(1, [["a", big, None, None]])
