"""Property tests of the codec and the Connection's decoding.

- any valid PUB batch round-trips, however the bytes are chunked;
- any bytes after a valid HELLO only ever raise RemoteProtocolError;
- any msgpack value in a correct length prefix (arbitrary, or a valid frame
  with one part replaced) either decodes to a frame that re-encodes to the
  same bytes or raises a non-fatal RemoteProtocolError, and the stream
  stays in sync either way.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgpack import ExtType, Timestamp

from tidings.protocol import CLOSED, NEED_DATA, Connection, RemoteProtocolError, Role, State
from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.codec import HEADER, MAX_NAME_LENGTH
from tidings.protocol.numbers import MAX_DURATION_MS, MAX_TIMESTAMP_MS
from tidings.protocol.subjects import MAX_SUBJECT_LENGTH

# modest counts: the whole protocol suite stays well under 20 s
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def open_pair() -> tuple[Connection, Connection]:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(F.Hello(1, "prop", None, {})))
    assert isinstance(s.next_event(), F.Hello)
    c.receive_data(s.send(F.Welcome(1, "srv", {})))
    assert isinstance(c.next_event(), F.Welcome)
    return c, s


# ------------------------------------------------------------ strategies

# token characters: no whitespace (Z*, and the C0/C1 controls that str.isspace
# accepts), no surrogates, none of . * >
token = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
                              exclude_characters=".*>"), min_size=1, max_size=8)
subject = st.lists(token, min_size=1, max_size=6).map(".".join).filter(lambda s: len(s) <= MAX_SUBJECT_LENGTH)
name = st.text(min_size=1, max_size=MAX_NAME_LENGTH).filter(lambda s: len(s) <= MAX_NAME_LENGTH)
uint = st.integers(0, 2**64 - 1)
header_value = st.one_of(st.text(max_size=20), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=20))
# A publisher's header names: any text but the broker's reserved prefix (in any letter case),
# which a PUB may not carry (test_malformed.py checks that refusal).
header_name = st.text(min_size=1, max_size=20).filter(lambda k: k[:8].lower() != V.RESERVED_HEADER_PREFIX)
headers = st.none() | st.dictionaries(header_name, header_value, max_size=6)
options = st.none() | st.fixed_dictionaries({}, optional={
    "id": st.text(min_size=1, max_size=40), "key": st.text(min_size=1, max_size=40),
    "delay": st.integers(0, MAX_DURATION_MS), "at": st.integers(0, MAX_TIMESTAMP_MS),
    "ttl": st.integers(0, MAX_DURATION_MS)})
pub_message = st.tuples(subject, st.binary(max_size=300), headers, st.none() | subject, uint, options).map(list)
pub_batch = st.lists(pub_message, max_size=12)

leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=12),
    st.binary(max_size=12), st.sampled_from([int(op) for op in F.Op]),
    # (negative ext codes, reserved by msgpack, are covered by the raw-bytes properties
    # and by test_malformed; msgpack.ExtType only builds 0..127)
    st.builds(ExtType, st.integers(0, 127), st.binary(max_size=12)),
    st.builds(Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
map_key = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.binary(max_size=3), st.none())
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(map_key, inner, max_size=4),
                     max_leaves=25)

CLIENT_TEMPLATES: list[list[Any]] = [
    [2, 1], [3, 1],
    [10, [["a.b", b"p", {"h": "v"}, "r.s", 1, {"key": "k"}], ["c", b"", None, None, 0, None]]],
    [11, 1, 1, "a.*", None], [11, 2, 2, "a.>", "g"], [12, 3, 1], [13, 4, "stats", {"a": [1, {"b": 2}]}],
    [14, 5, 1, {"queue": "q"}], [15, 6, 1], [16, 7, 1, [[1, 0, None], [2, 1, 500], [3, 2, "why"]]],
    [1, 1, "again", None, {}],
]
SERVER_TEMPLATES: list[list[Any]] = [
    [2, 1], [3, 1], [65, 1, {"a": [1, 2.5]}], [66, 2, 30, "not found"],
    [67, 1, [["a.b", b"p", {"h": 1}, None], ["c", b"", None, "r"]]], [68, [[1, 0, None], [2, 33, "full"]]],
    [69, 1, [[1, "q.a", b"p", None, 1, 1700000000000, None], [2, "q.b", b"", {"x": b"y"}, 2, 0, {"m": 1}]]],
    [70, "bindings", {"epoch": 1, "patterns": ["a.>"]}], [64, 1, "srv", {"max_frame": 65536}],
]


def _paths(v: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position inside a wire value: list indexes and map keys, nested."""
    out = []
    if type(v) is list:
        for i, x in enumerate(v):
            out.append(prefix + (i,))
            out += _paths(x, prefix + (i,))
    elif type(v) is dict:
        for k, x in v.items():
            out.append(prefix + (k,))
            out += _paths(x, prefix + (k,))
    return out


def _copy(v: Any) -> Any:
    if type(v) is list:
        return [_copy(x) for x in v]
    if type(v) is dict:
        return {k: _copy(x) for k, x in v.items()}
    return v


# replacements lean towards containers: a list or map where a scalar belongs is the classic shape bug
replacement = st.one_of(value, st.lists(leaf, max_size=3), st.dictionaries(st.text(max_size=3), leaf, max_size=3))


@st.composite
def mutated(draw: st.DrawFn, template: list[Any]) -> Any:
    """``template`` (a valid frame) with one position replaced, removed, or
    preceded by an extra value: near misses find the shape checks' gaps."""
    v = _copy(template)
    path = draw(st.sampled_from(_paths(v)))
    parent = v
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    how = draw(st.integers(0, 3)) if type(parent) is list else 0
    if how == 1:
        del parent[last]
    elif how == 2:
        parent.insert(last, draw(replacement))
    else:
        parent[last] = draw(replacement)
    return v


# ------------------------------------------------------------ helpers

def drain(conn: Connection) -> bool:
    """Read every available event; only RemoteProtocolError may escape
    next_event. Return False once the connection is closed."""
    while True:
        try:
            ev = conn.next_event()
        except RemoteProtocolError as exc:
            assert exc.code in (1, 2, 4, 6, 7, 8), exc.code  # codes decoding can produce
            if exc.fatal:
                assert conn.state is State.CLOSED
                return False
            assert conn.state is State.OPEN
            continue
        if ev is NEED_DATA:
            return True
        if ev is CLOSED:
            return False
        assert type(ev).OP in (F.CLIENT_OPS if conn.role is Role.SERVER else F.SERVER_OPS)


def feed_in_chunks(conn: Connection, data: bytes, chunk: int) -> bool:
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i:i + chunk])
        if not drain(conn):
            return False
    conn.receive_data(b"")
    return drain(conn)


def assert_plain(v: Any) -> None:
    """No msgpack extension object (ExtType, Timestamp) survives decoding."""
    t = type(v)
    if t is list:
        for x in v:
            assert_plain(x)
    elif t is dict:
        for k, x in v.items():
            assert type(k) is str
            assert_plain(x)
    else:
        assert v is None or t in (bool, int, float, str, bytes, F.Op), repr(v)


def check_one_value(receiver: Connection, sender: Connection, v: Any) -> None:
    body = pack(v)
    receiver.receive_data(framed(body) + sender.send(F.Ping(77)))
    try:
        frame = receiver.next_event()
    except RemoteProtocolError as exc:
        assert exc.fatal is False
        assert 0 <= exc.rid < 2**63
    else:
        # anything accepted is a faithful reading of the bytes, made of plain values only;
        # an optional last field sent as nil (SUB's filter) reads as absent
        wire = frame.to_wire()
        assert pack(wire) == body or (isinstance(v, list) and v[-1] is None and pack(wire) == pack(v[:-1]))
        assert_plain(frame.to_wire())
    assert receiver.state is State.OPEN
    assert receiver.next_event() == F.Ping(77)


# ------------------------------------------------------------ properties

@PROPS
@given(batch=pub_batch, cut=st.integers(0, 10_000))
def test_valid_pub_batches_round_trip(batch: list[list[Any]], cut: int) -> None:
    c, s = open_pair()
    data = c.send(F.Pub(batch))
    cut %= len(data) + 1
    got = []
    for part in (data[:cut], data[cut:]):
        if part:
            s.receive_data(part)
        while (ev := s.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == [F.Pub(batch)]


@PROPS
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 512))
def test_arbitrary_bytes_after_hello_only_raise_remote_protocol_error(data: bytes, chunk: int) -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    # the peer's bytes may arrive in the same read as its HELLO
    s.receive_data(c.send(F.Hello(1, "fuzz", None, {})) + data[:chunk])
    assert isinstance(s.next_event(), F.Hello)
    s.send(F.Welcome(1, "srv", {}))
    if drain(s):
        feed_in_chunks(s, data[chunk:], chunk)


plausible_stream = st.lists(
    st.one_of(st.binary(max_size=64).map(framed), value.map(pack).map(framed), st.binary(max_size=8)),
    max_size=12).map(b"".join)


@PROPS
@given(data=plausible_stream, chunk=st.integers(1, 64))
def test_plausible_frames_only_raise_remote_protocol_error(data: bytes, chunk: int) -> None:
    # mostly well-framed bodies, with stray bytes that desynchronise the framing
    c, s = open_pair()
    feed_in_chunks(s, data, chunk)
    feed_in_chunks(c, data, chunk)


@PROPS
@given(v=value)
def test_arbitrary_values_server_side(v: Any) -> None:
    c, s = open_pair()
    check_one_value(s, c, v)


@PROPS
@given(v=value)
def test_arbitrary_values_client_side(v: Any) -> None:
    c, s = open_pair()
    check_one_value(c, s, v)


NEAR_MISS = settings(PROPS, max_examples=60)


@pytest.mark.parametrize("template", CLIENT_TEMPLATES, ids=lambda t: F.Op(t[0]).name)
@NEAR_MISS
@given(data=st.data())
def test_near_miss_client_frames(template: list[Any], data: st.DataObject) -> None:
    c, s = open_pair()
    check_one_value(s, c, data.draw(mutated(template)))


@pytest.mark.parametrize("template", SERVER_TEMPLATES, ids=lambda t: F.Op(t[0]).name)
@NEAR_MISS
@given(data=st.data())
def test_near_miss_server_frames(template: list[Any], data: st.DataObject) -> None:
    c, s = open_pair()
    check_one_value(c, s, data.draw(mutated(template)))


@PROPS
@given(v=value, name_=name)
def test_arbitrary_values_before_hello_are_fatal_or_a_hello(v: Any, name_: str) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(framed(pack(v)))
    try:
        ev = s.next_event()
    except RemoteProtocolError as exc:
        assert exc.fatal is True and s.state is State.CLOSED
    else:
        assert type(ev) is F.Hello and s.state is State.HELLO_RECEIVED
    # and a real HELLO is always accepted by a fresh server
    s2 = Connection(Role.SERVER)
    s2.receive_data(Connection(Role.CLIENT).send(F.Hello(1, name_, None, {})))
    assert s2.next_event().client_name == name_
