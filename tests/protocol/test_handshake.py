"""The handshake order (client HELLO, server WELCOME or ERR, nothing else
before) and the frame-size limits each side announces and enforces."""

from __future__ import annotations

import msgpack
import pytest

from tidings.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
)
from tidings.protocol import frames as F
from tidings.protocol.codec import DEFAULT_MAX_FRAME, HEADER, MAX_FRAME_CEILING, PRE_HELLO_MAX_FRAME


def framed(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def hello_received() -> tuple[Connection, Connection]:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(F.Hello(PROTOCOL_VERSION, "n", None, {})))
    assert isinstance(s.next_event(), F.Hello)
    return c, s


def test_protocol_version_is_1() -> None:
    assert PROTOCOL_VERSION == 1


def test_states_through_a_normal_handshake() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert c.state is State.START and s.state is State.START
    data = c.send(F.Hello(1, "n", None, {}))
    assert c.state is State.HELLO_SENT
    s.receive_data(data)
    assert s.state is State.START
    assert isinstance(s.next_event(), F.Hello)
    assert s.state is State.HELLO_RECEIVED
    c.receive_data(s.send(F.Welcome(1, "srv", {})))
    assert s.state is State.OPEN
    assert isinstance(c.next_event(), F.Welcome)
    assert c.state is State.OPEN


# ------------------------------------------------------------- server receives

@pytest.mark.parametrize("first", [F.Ping(1), F.Pub([["a", b"", None, None, 0, None]]), F.Sub(1, 1, "a"),
                                   F.Call(1, "stats", {})], ids=lambda f: type(f).__name__)
def test_server_rejects_non_hello_first_frame(first: F.Frame) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(framed(first.to_wire()))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == ErrorCode.BAD_STATE and ei.value.fatal is True
    assert s.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        s.next_event()


@pytest.mark.parametrize("version", [0, 2, 99])
def test_server_rejects_wrong_protocol_version(version: int) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(framed([1, version, "n", None, {}]))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == ErrorCode.UNSUPPORTED_VERSION and ei.value.fatal is True
    assert s.state is State.CLOSED


def test_server_answers_a_fatal_hello_error_with_err() -> None:
    # fatal errors are answered "ERR, then close": ERR may be sent once CLOSED
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    c.send(F.Hello(1, "n", None, {}))
    s.receive_data(framed([1, 2, "n", None, {}]))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert s.state is State.CLOSED
    err = F.Err(ei.value.rid, ei.value.code, ei.value.message)
    c.receive_data(s.send(err))
    assert c.next_event() == err
    with pytest.raises(LocalProtocolError):
        s.send(F.Ping(1))  # but nothing else


def test_fatal_error_after_handshake_can_still_be_reported(pair) -> None:
    c, s = pair
    s.receive_data(HEADER.pack(0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal and s.state is State.CLOSED
    c.receive_data(s.send(F.Err(0, ei.value.code, ei.value.message)))
    ev = c.next_event()
    assert isinstance(ev, F.Err) and ev.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError):
        s.send(F.Msg(1, []))


@pytest.mark.parametrize("mf", [PRE_HELLO_MAX_FRAME - 1, MAX_FRAME_CEILING + 1, "big", -1, 1.5])
def test_server_rejects_out_of_range_hello_max_frame(mf: object) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(framed([1, 1, "n", None, {"max_frame": mf}]))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT and ei.value.fatal is True


def test_server_reads_nothing_until_it_answers_hello() -> None:
    _, s = hello_received()
    with pytest.raises(LocalProtocolError):
        s.next_event()


def test_server_may_refuse_hello_with_err() -> None:
    c, s = hello_received()
    c.receive_data(s.send(F.Err(0, ErrorCode.AUTH_FAILED, "authentication failed")))
    ev = c.next_event()
    assert ev == F.Err(0, ErrorCode.AUTH_FAILED, "authentication failed")
    assert c.state is State.HELLO_SENT  # the caller closes


def test_server_may_send_err_before_hello() -> None:
    # e.g. TOO_MANY_CONNECTIONS right on accept
    s = Connection(Role.SERVER)
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "n", None, {}))
    c.receive_data(s.send(F.Err(0, ErrorCode.TOO_MANY_CONNECTIONS, "full")))
    assert c.next_event() == F.Err(0, ErrorCode.TOO_MANY_CONNECTIONS, "full")


# ------------------------------------------------------------- client receives

@pytest.mark.parametrize("first", [[67, 1, []], [65, 1, None], [2, 1], [70, "shutdown", {}], [68, []]],
                         ids=["MSG", "OK", "PING", "NOTICE", "CONFIRM"])
def test_client_rejects_anything_but_welcome_or_err_first(first: list[object]) -> None:
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "n", None, {}))
    c.receive_data(framed(first))
    with pytest.raises(RemoteProtocolError) as ei:
        c.next_event()
    assert ei.value.code == ErrorCode.BAD_STATE and ei.value.fatal is True
    assert c.state is State.CLOSED


def test_client_rejects_frames_before_it_sent_hello() -> None:
    c = Connection(Role.CLIENT)
    c.receive_data(framed([64, 1, "srv", {"max_frame": DEFAULT_MAX_FRAME}]))
    with pytest.raises(RemoteProtocolError) as ei:
        c.next_event()
    assert ei.value.fatal is True


def test_client_rejects_welcome_with_wrong_version() -> None:
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "n", None, {}))
    c.receive_data(framed([64, 2, "srv", {"max_frame": DEFAULT_MAX_FRAME}]))
    with pytest.raises(RemoteProtocolError) as ei:
        c.next_event()
    assert ei.value.code == ErrorCode.UNSUPPORTED_VERSION and ei.value.fatal is True


@pytest.mark.parametrize("info", [{}, {"max_frame": "1"}, {"max_frame": 100},
                                  {"max_frame": MAX_FRAME_CEILING + 1}])
def test_client_requires_max_frame_in_welcome(info: dict[str, object]) -> None:
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "n", None, {}))
    c.receive_data(framed([64, 1, "srv", info]))
    with pytest.raises(RemoteProtocolError) as ei:
        c.next_event()
    assert ei.value.fatal is True and c.state is State.CLOSED


# ------------------------------------------------------------------ sending

@pytest.mark.parametrize("frame", [F.Pub([["a", b"", None, None, 0, None]]), F.Ping(1), F.Sub(1, 1, "a"),
                                   F.Call(1, "stats", {})], ids=lambda f: type(f).__name__)
def test_client_may_not_send_before_welcome(frame: F.Frame) -> None:
    c = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        c.send(frame)  # before HELLO
    c.send(F.Hello(1, "n", None, {}))
    with pytest.raises(LocalProtocolError):
        c.send(frame)  # HELLO sent, WELCOME not yet received
    with pytest.raises(LocalProtocolError):
        c.send(F.Hello(1, "n", None, {}))  # and HELLO only once


@pytest.mark.parametrize("frame", [F.Msg(1, []), F.Ping(1), F.Ok(1), F.Notice("shutdown", {}),
                                   F.Deliver(1, [])], ids=lambda f: type(f).__name__)
def test_server_may_not_send_before_welcome(frame: F.Frame) -> None:
    s = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        s.send(frame)  # nothing received yet
    with pytest.raises(LocalProtocolError):
        s.send(F.Welcome(1, "srv", {}))  # WELCOME only answers a HELLO
    _, s = hello_received()
    with pytest.raises(LocalProtocolError):
        s.send(frame)  # HELLO received, WELCOME not yet sent


def test_handshake_frames_only_once(pair) -> None:
    c, s = pair
    with pytest.raises(LocalProtocolError):
        c.send(F.Hello(1, "again", None, {}))
    with pytest.raises(LocalProtocolError):
        s.send(F.Welcome(1, "again", {}))


@pytest.mark.parametrize("frame", [F.Msg(1, []), F.Welcome(1, "s", {}), F.Ok(1), F.Confirm([])],
                         ids=lambda f: type(f).__name__)
def test_client_may_never_send_server_ops(pair, frame: F.Frame) -> None:
    c, _ = pair
    with pytest.raises(LocalProtocolError):
        c.send(frame)


@pytest.mark.parametrize("frame", [F.Pub([]), F.Hello(1, "n"), F.Sub(1, 1, "a"), F.Ack(0, 1, [])],
                         ids=lambda f: type(f).__name__)
def test_server_may_never_send_client_ops(pair, frame: F.Frame) -> None:
    _, s = pair
    with pytest.raises(LocalProtocolError):
        s.send(frame)


def test_send_after_close_is_refused(pair) -> None:
    c, _ = pair
    c.close()
    with pytest.raises(LocalProtocolError):
        c.send(F.Ping(1))


# ------------------------------------------------------------------- limits

def test_welcome_announces_limits() -> None:
    s2 = Connection(Role.SERVER, max_frame=4 * 1024 * 1024, max_payload=1_000_000)
    c2 = Connection(Role.CLIENT)
    s2.receive_data(c2.send(F.Hello(1, "n", None, {})))
    s2.next_event()
    c2.receive_data(s2.send(F.Welcome(1, "srv", {"features": []})))
    ev = c2.next_event()
    assert isinstance(ev, F.Welcome)
    assert ev.info["max_frame"] == 4 * 1024 * 1024
    assert ev.info["max_payload"] == 1_000_000
    assert c2.peer_max_frame == 4 * 1024 * 1024
    assert c2.max_payload == 1_000_000


def test_server_sends_no_more_than_the_client_accepts() -> None:
    # the client announces its own max_frame in HELLO; the server honours it
    c = Connection(Role.CLIENT, max_frame=PRE_HELLO_MAX_FRAME)
    s = Connection(Role.SERVER, max_frame=4 * 1024 * 1024)
    s.receive_data(c.send(F.Hello(1, "n", None, {})))
    s.next_event()
    assert s.peer_max_frame == PRE_HELLO_MAX_FRAME
    c.receive_data(s.send(F.Welcome(1, "srv", {})))
    c.next_event()
    big = F.Msg(1, [["a", b"x" * (PRE_HELLO_MAX_FRAME * 2), None, None]])
    with pytest.raises(LocalProtocolError):
        s.send(big)
    # nothing was written; the connection is still usable
    small = F.Msg(1, [["a", b"x" * 100, None, None]])
    c.receive_data(s.send(small))
    assert c.next_event() == small


def test_client_with_default_limit_and_bigger_server() -> None:
    # regression: an unannounced client limit made the server assume its own (bigger) one
    c = Connection(Role.CLIENT)
    s = Connection(Role.SERVER, max_frame=4 * DEFAULT_MAX_FRAME)
    s.receive_data(c.send(F.Hello(1, "n", None, {})))
    s.next_event()
    assert s.peer_max_frame == DEFAULT_MAX_FRAME
    c.receive_data(s.send(F.Welcome(1, "srv", {})))
    c.next_event()
    assert c.inbound_limit == DEFAULT_MAX_FRAME
    # a frame the client would refuse (fatally) is refused by the sender instead
    with pytest.raises(LocalProtocolError):
        s.send(F.Msg(1, [["a", b"x" * (2 * DEFAULT_MAX_FRAME), None, None]]))


def test_sending_more_than_peer_max_frame_is_a_local_error(make_pair) -> None:
    c, s = make_pair(server_max_frame=32 * 1024, client_max_frame=32 * 1024)
    assert c.peer_max_frame == 32 * 1024 and s.peer_max_frame == 32 * 1024
    too_big = F.Pub([["a", b"x" * (40 * 1024), None, None, 0, None]])
    out: list[bytes] = [b"earlier"]
    with pytest.raises(LocalProtocolError):
        c.send_parts(too_big, out)
    assert out == [b"earlier"]  # the failed frame left nothing behind
    with pytest.raises(LocalProtocolError):
        s.send(F.Msg(1, [["a", b"x" * (40 * 1024), None, None]]))
    s.receive_data(c.send(F.Ping(1)))
    assert s.next_event() == F.Ping(1)


def test_hello_larger_than_pre_hello_limit_is_a_local_error() -> None:
    c = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        c.send(F.Hello(1, "n", {"token": "x" * PRE_HELLO_MAX_FRAME}, {}))


@pytest.mark.parametrize("mf", [PRE_HELLO_MAX_FRAME - 1, MAX_FRAME_CEILING + 1, 0])
def test_connection_refuses_out_of_range_max_frame(mf: int) -> None:
    with pytest.raises(ValueError):
        Connection(Role.SERVER, max_frame=mf)
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, max_frame=mf)


def test_need_data_after_handshake(pair) -> None:
    c, s = pair
    assert c.next_event() is NEED_DATA and s.next_event() is NEED_DATA
