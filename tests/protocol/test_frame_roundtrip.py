"""Every frame type survives encode (by the role that may send it) and
decode (by the other role) unchanged."""

from __future__ import annotations

import pytest

from tidings.protocol import NEED_DATA, Connection, Op, Role, State
from tidings.protocol import frames as F
from tidings.protocol.frames import AckAction

CLIENT_FRAMES: list[F.Frame] = [
    F.Ping(0),
    F.Ping(7),
    F.Pong(2**63 - 1),
    F.Pub([]),
    F.Pub([["orders.eu.created", b"", None, None, 0, None]]),
    F.Pub([
        ["orders.eu.created", b"\x00\xff" * 100, {"type": "OrderCreated", "v": 2, "trace": b"\x01"},
         "_INBOX.abc.1", 42, {"id": "m-1", "key": "customer-9", "delay": 0, "at": 1_700_000_000_000, "ttl": 5000}],
        ["a", b"x", {}, None, 0, {}],
        ["a.b.c", b"y", None, "a.b", 2**40, None],
    ]),
    F.Sub(1, 1, "orders.*.created"),
    F.Sub(2, 2**63 - 1, "orders.>", "workers"),
    F.Sub(0, 3, ">", None),
    F.Unsub(3, 1),
    F.Unsub(0, 5),
    F.Call(4, "queue.declare", {"name": "jobs", "bind": ["jobs.>"], "max_deliveries": 5,
                                "nested": {"a": [1, 2.5, None, True, b"b", {"c": "d"}]}}),
    F.Call(5, "stats", {}),
    F.Consume(6, 1, {"queue": "jobs", "prefetch": 100}),
    F.Stop(7, 1),
    F.Stop(0, 2),
    F.Ack(0, 1, [[1, AckAction.ACK, None]]),
    F.Ack(8, 1, [[1, int(AckAction.ACK), None], [2, int(AckAction.NACK), 1500], [3, int(AckAction.NACK), None],
                 [4, int(AckAction.REJECT), "bad payload"], [5, int(AckAction.REJECT), None],
                 [6, int(AckAction.IN_PROGRESS), None]]),
    F.Ack(9, 2, []),
]

SERVER_FRAMES: list[F.Frame] = [
    F.Ping(1),
    F.Pong(0),
    F.Ok(1),
    F.Ok(2, {"queues": [{"name": "jobs", "depth": 3}], "ratio": 0.5, "raw": b"\x00", "flag": False}),
    F.Ok(3, [0, 0, 32]),
    F.Err(0, 1, "undecodable frame"),
    F.Err(9, 30, "queue 'x' not found"),
    F.Msg(1, []),
    F.Msg(1, [["orders.eu.created", b"payload", None, None],
              ["orders.us.created", b"", {"status": "503"}, "_INBOX.x.1"],
              ["a", b"\x00" * 1000, {"n": -5, "b": b"\xff"}, None]]),
    F.Confirm([[1, 0, None], [2, 33, "queue full"], [3, 0, {"id": "01HZX", "offset": 17}]]),
    F.Deliver(1, [[10, "jobs.email", b"{}", None, 1, 1_700_000_000_123, None],
                  [11, "jobs.sms", b"", {"retry": 2}, 3, 0, {"partition": 2, "offset": 99}]]),
    F.Deliver(2, []),
    F.Notice("slow_consumer", {"sid": 4, "dropped": 1000}),
    F.Notice("bindings", {"epoch": 3, "patterns": ["jobs.>", "orders.*.created"]}),
    F.Notice("shutdown", {}),
]


def test_samples_cover_every_operation() -> None:
    sent = {f.OP for f in CLIENT_FRAMES} | {f.OP for f in SERVER_FRAMES} | {Op.HELLO, Op.WELCOME}
    assert sent == set(Op)
    assert {f.OP for f in CLIENT_FRAMES} | {Op.HELLO} == F.CLIENT_OPS
    assert {f.OP for f in SERVER_FRAMES} | {Op.WELCOME} == F.SERVER_OPS


def test_hello_and_welcome_round_trip() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    hello = F.Hello(1, "billing-worker", {"user": "u", "password": "p"}, {"lang": "python", "max_frame": 65536})
    s.receive_data(c.send(hello))
    assert s.next_event() == hello
    assert s.state is State.HELLO_RECEIVED
    welcome = F.Welcome(1, "tidings-1", {"features": ["confirms", "streams"], "max_frame": 2**20,
                                         "max_payload": 2**19})
    c.receive_data(s.send(welcome))
    assert c.next_event() == welcome
    assert c.state is State.OPEN and s.state is State.OPEN
    assert c.next_event() is NEED_DATA and s.next_event() is NEED_DATA


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: type(f).__name__)
def test_client_frame_round_trips(pair, frame: F.Frame) -> None:
    c, s = pair
    s.receive_data(c.send(frame))
    got = s.next_event()
    assert type(got) is type(frame)
    assert got == frame
    assert s.next_event() is NEED_DATA


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_frame_round_trips(pair, frame: F.Frame) -> None:
    c, s = pair
    c.receive_data(s.send(frame))
    got = c.next_event()
    assert type(got) is type(frame)
    assert got == frame
    assert c.next_event() is NEED_DATA


WIRE_SHAPES: list[tuple[F.Frame, list[object]]] = [
    (F.Hello(1, "n", None, {}), [1, 1, "n", None, {}]),
    (F.Ping(5), [2, 5]),
    (F.Pong(5), [3, 5]),
    (F.Pub([["s", b"p", None, None, 0, None]]), [10, [["s", b"p", None, None, 0, None]]]),
    (F.Sub(1, 2, "a.*", "g"), [11, 1, 2, "a.*", "g"]),
    (F.Unsub(1, 2), [12, 1, 2]),
    (F.Call(1, "stats", {}), [13, 1, "stats", {}]),
    (F.Consume(1, 2, {"queue": "q"}), [14, 1, 2, {"queue": "q"}]),
    (F.Stop(1, 2), [15, 1, 2]),
    (F.Ack(1, 2, [[3, 0, None]]), [16, 1, 2, [[3, 0, None]]]),
    (F.Welcome(1, "srv", {"max_frame": 1}), [64, 1, "srv", {"max_frame": 1}]),
    (F.Ok(1, None), [65, 1, None]),
    (F.Err(1, 2, "m"), [66, 1, 2, "m"]),
    (F.Msg(1, [["s", b"p", None, None]]), [67, 1, [["s", b"p", None, None]]]),
    (F.Confirm([[1, 0, None]]), [68, [[1, 0, None]]]),
    (F.Deliver(1, [[1, "s", b"", None, 1, 0, None]]), [69, 1, [[1, "s", b"", None, 1, 0, None]]]),
    (F.Notice("shutdown", {}), [70, "shutdown", {}]),
]


@pytest.mark.parametrize("frame,shape", WIRE_SHAPES, ids=lambda x: type(x).__name__)
def test_wire_shape_is_op_first_array(frame: F.Frame, shape: list[object]) -> None:
    # docs/PROTOCOL.md documents these positional shapes; other clients rely on them
    assert frame.to_wire() == shape
    assert {type(f).OP for f, _ in WIRE_SHAPES} == set(Op)


def test_client_announces_its_max_frame_in_hello(wire) -> None:
    c = Connection(Role.CLIENT, max_frame=65536)
    assert c.send(F.Hello(1, "n", None, {})) == wire([1, 1, "n", None, {"max_frame": 65536}])
    # an explicit announcement is kept as given
    c2 = Connection(Role.CLIENT, max_frame=65536)
    assert c2.send(F.Hello(1, "n", None, {"max_frame": 32768})) == wire([1, 1, "n", None, {"max_frame": 32768}])


def test_send_parts_batches_frames_in_one_write(pair) -> None:
    c, s = pair
    out: list[bytes] = []
    total = sum(c.send_parts(f, out) for f in CLIENT_FRAMES)
    data = b"".join(out)
    assert total == len(data)
    s.receive_data(data)
    assert [s.next_event() for _ in CLIENT_FRAMES] == CLIENT_FRAMES
    assert s.next_event() is NEED_DATA


def test_encode_wire_matches_send(pair) -> None:
    # the hot path (pre-built wire arrays) produces the same bytes as send()
    _, s = pair
    frame = F.Msg(3, [["a.b", b"x", None, None]])
    out: list[bytes] = []
    s.encode_wire(frame.to_wire(), out)
    assert b"".join(out) == s.send(frame)


def test_ack_actions_are_stable() -> None:
    assert {a.name: int(a) for a in AckAction} == {"ACK": 0, "NACK": 1, "REJECT": 2, "IN_PROGRESS": 3}


def test_docs_hex_examples(pair) -> None:
    # the byte-level examples quoted in docs/PROTOCOL.md section 2
    c, _ = pair
    assert c.send(F.Ping(1)) == bytes.fromhex("00000003 920201")
    assert c.send(F.Pub([["a.b", b"hi", None, None, 0, None]])) == bytes.fromhex(
        "00000010 920a9196a3612e62c4026869c0c000c0")
