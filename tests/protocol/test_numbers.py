"""Every numeric field a client sends is range- and type-checked when the frame
is decoded (protocol/numbers.py): a bad one is INVALID_ARGUMENT for that frame
only, carrying its request id, and the next frame still decodes. The values at
the edges of each range are accepted."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tidings.protocol import ErrorCode, RemoteProtocolError, State
from tidings.protocol import frames as F
from tidings.protocol import numbers as N
from tidings.protocol.codec import HEADER

BIG = 2**64 - 1  # the largest integer msgpack carries


def framed(v: Any) -> bytes:
    body = msgpack.packb(v, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def pub_opts(opts: dict[str, Any]) -> list[Any]:
    return [F.Op.PUB, [["a.b", b"p", None, None, 1, opts]]]


def ack(action: int, arg: Any, did: Any = 1) -> list[Any]:
    return [F.Op.ACK, 9, 1, [[did, action, arg]]]


def consume(args: dict[str, Any]) -> list[Any]:
    return [F.Op.CONSUME, 9, 1, {"queue": "q", **args}]


def call(method: str, args: dict[str, Any]) -> list[Any]:
    return [F.Op.CALL, 9, method, args]


# (id, frame, rid of the error)
BAD: list[tuple[str, list[Any], int]] = [
    ("pub-delay-2**64-1", pub_opts({"delay": BIG}), 0),
    ("pub-delay-over", pub_opts({"delay": N.MAX_DURATION_MS + 1}), 0),
    ("pub-delay-negative", pub_opts({"delay": -1}), 0),
    ("pub-delay-float", pub_opts({"delay": 1.5}), 0),
    ("pub-ttl-2**63", pub_opts({"ttl": 2**63}), 0),
    ("pub-ttl-str", pub_opts({"ttl": "10"}), 0),
    ("pub-at-2**64-1", pub_opts({"at": BIG}), 0),
    ("pub-at-year-10000", pub_opts({"at": N.MAX_TIMESTAMP_MS + 1}), 0),
    ("pub-new-2", pub_opts({"new": 2}), 0),
    ("nack-str", ack(F.AckAction.NACK, "soon"), 9),
    ("nack-2**64-1", ack(F.AckAction.NACK, BIG), 9),
    ("nack-negative", ack(F.AckAction.NACK, -5), 9),
    ("nack-float", ack(F.AckAction.NACK, 0.5), 9),
    ("nack-bool", ack(F.AckAction.NACK, True), 9),
    ("nack-map-delay-over", ack(F.AckAction.NACK, {"delay": N.MAX_DURATION_MS + 1}), 9),
    ("nack-map-error-int", ack(F.AckAction.NACK, {"error": 5}), 9),
    ("nack-map-extra-key", ack(F.AckAction.NACK, {"error": "x", "why": "y"}), 9),
    ("reject-int", ack(F.AckAction.REJECT, 5), 9),
    ("ack-with-arg", ack(F.AckAction.ACK, 5), 9),
    ("in-progress-with-arg", ack(F.AckAction.IN_PROGRESS, "x"), 9),
    ("ack-did-2**64-1", ack(F.AckAction.ACK, None, BIG), 9),
    ("consume-prefetch-0", consume({"prefetch": 0}), 9),
    ("consume-prefetch-huge", consume({"prefetch": BIG}), 9),
    ("consume-prefetch-str", consume({"prefetch": "10"}), 9),
    ("consume-window-over", consume({"window": N.MAX_WINDOW + 1}), 9),
    ("consume-partition-negative", consume({"partition": -1}), 9),
    ("consume-partition-over", consume({"partition": N.MAX_PARTITIONS}), 9),
    ("consume-start-negative", consume({"start": -1}), 9),
    ("consume-start-2**64-1", consume({"start": BIG}), 9),
    ("consume-start-float", consume({"start": 1.0}), 9),
    ("consume-time-2**64-1", consume({"start": {"time_ms": BIG}}), 9),
    ("consume-time-negative", consume({"start": {"time_ms": -1}}), 9),
    ("consume-time-str", consume({"start": {"time_ms": "now"}}), 9),
    ("consume-time-extra-key", consume({"start": {"time_ms": 1, "x": 1}}), 9),
    ("dlq-list-limit-0", call("dlq.list", {"name": "q", "limit": 0}), 9),
    ("dlq-list-offset-2**64-1", call("dlq.list", {"name": "q", "offset": BIG}), 9),
    ("dlq-redrive-count-float", call("dlq.redrive", {"name": "q", "count": 2.0}), 9),
]

GOOD: list[tuple[str, list[Any]]] = [
    ("pub-delay-max", pub_opts({"delay": N.MAX_DURATION_MS})),
    ("pub-ttl-0", pub_opts({"ttl": 0})),
    ("pub-at-max", pub_opts({"at": N.MAX_TIMESTAMP_MS})),
    ("pub-new-1", pub_opts({"id": "x", "new": 1})),
    ("nack-max", ack(F.AckAction.NACK, N.MAX_DURATION_MS)),
    ("nack-nil", ack(F.AckAction.NACK, None)),
    ("nack-map-error", ack(F.AckAction.NACK, {"delay": None, "error": "ValueError: bad"})),
    ("nack-map-delay", ack(F.AckAction.NACK, {"delay": N.MAX_DURATION_MS})),
    ("reject-reason", ack(F.AckAction.REJECT, "bad")),
    ("ack-nil", ack(F.AckAction.ACK, None)),
    ("consume-limits", consume({"prefetch": N.MAX_PREFETCH, "window": 1, "partition": N.MAX_PARTITIONS - 1})),
    ("consume-start-offset", consume({"start": N.MAX_INT})),
    ("consume-start-latest", consume({"start": "latest"})),
    ("consume-time-max", consume({"start": {"time_ms": N.MAX_TIMESTAMP_MS}})),
    ("dlq-list-limits", call("dlq.list", {"name": "q", "limit": N.MAX_LIST_LIMIT, "offset": N.MAX_INT})),
    ("unchecked-call", call("stats", {"anything": BIG})),
]


@pytest.mark.parametrize("frame,rid", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_number_is_invalid_argument_for_that_frame_only(make_pair, frame: list[Any], rid: int) -> None:
    _c, s = make_pair()
    s.receive_data(framed(frame) + framed([F.Op.PING, 77]))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT, ei.value.message
    assert ei.value.rid == rid
    assert ei.value.fatal is False
    assert s.state is State.OPEN
    assert s.next_event() == F.Ping(77)


@pytest.mark.parametrize("frame", [c[1] for c in GOOD], ids=[c[0] for c in GOOD])
def test_numbers_at_the_edges_are_accepted(make_pair, frame: list[Any]) -> None:
    _c, s = make_pair()
    s.receive_data(framed(frame))
    ev = s.next_event()
    assert ev.OP == frame[0]


def test_bounds_leave_room_in_a_signed_64_bit_integer() -> None:
    # now + any accepted delay must still fit SQLite's INTEGER (the store computes it)
    assert N.MAX_TIMESTAMP_MS + N.MAX_DURATION_MS < 2**63 - 1
    assert N.check_int(5, "x", 0, 5) == 5
    for v in (True, 5.0, "5", None, 6, -1):
        with pytest.raises(RemoteProtocolError):
            N.check_int(v, "x", 0, 5)
    assert N.check_number(0.5, "x", 0, 1) == 0.5
    with pytest.raises(RemoteProtocolError):
        N.check_number(float("nan"), "x", 0, 1)
