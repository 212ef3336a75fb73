"""Whatever the peer sends, decoding raises RemoteProtocolError and nothing
else. Errors after the handshake (except size and truncation) are
non-fatal: the bad frame is consumed and the next frame still decodes. The
error carries the request id of the offending frame when it was readable."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from msgpack import ExtType, Timestamp

from tidings.protocol import Connection, ErrorCode, RemoteProtocolError, Role, State
from tidings.protocol import frames as F
from tidings.protocol.codec import HEADER, MAX_HEADERS, MAX_NAME_LENGTH

PE = ErrorCode.PROTOCOL_ERROR
IS = ErrorCode.INVALID_SUBJECT
UO = ErrorCode.UNKNOWN_OPERATION
BS = ErrorCode.BAD_STATE
IA = ErrorCode.INVALID_ARGUMENT  # a numeric field of the wrong type or range (protocol/numbers.py)
TS = Timestamp(1_700_000_000, 0)  # msgpack ext -1: decodes to an object, never a plain value


def pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def pub(subject: Any = "a.b", payload: Any = b"p", headers: Any = None, reply: Any = None,
        seq: Any = 0, opts: Any = None) -> list[Any]:
    return [10, [[subject, payload, headers, reply, seq, opts]]]


def _deep(n: int) -> bytes:
    return b"\x91" * n + b"\xc0"  # n nested one-element arrays around nil


# (id, body bytes, expected code, expected rid) for frames sent to a server
SERVER_BAD: list[tuple[str, bytes, ErrorCode, int]] = [
    # not msgpack, or not exactly one value
    ("never-used-byte", b"\xc1", PE, 0),
    ("truncated-array", b"\x93\x01", PE, 0),
    ("truncated-str", b"\xa5ab", PE, 0),
    ("extra-data", pack([2, 1]) + b"\xc0", PE, 0),
    ("huge-array-header", b"\xdd\xff\xff\xff\xff", PE, 0),
    ("huge-array-in-pub", b"\x92\x0a\xdd\xff\xff\xff\xff", PE, 0),
    ("huge-map-header", b"\xdf\xff\xff\xff\xff", PE, 0),
    ("huge-str-header", b"\xdb\xff\xff\xff\xff", PE, 0),
    ("huge-bin-header", b"\xc6\xff\xff\xff\xff", PE, 0),
    ("huge-ext-header", b"\xc9\xff\xff\xff\xff\x05", PE, 0),
    ("deep-nesting-stackerror", _deep(100_000), PE, 0),
    ("deep-nesting-in-call", b"\x94\x0d\x05\xa1m" + _deep(5000), PE, 0),
    ("invalid-utf8-str", b"\xa2\xff\xfe", PE, 0),
    ("invalid-utf8-subject", pack(pub("ab")).replace(b"\xa2ab", b"\xa2\xc3\x28"), PE, 0),
    ("surrogate-utf8", pack(pub("abc")).replace(b"\xa3abc", b"\xa3\xed\xa0\x80"), PE, 0),
    ("int-map-key", pack([13, 5, "m", {1: "x"}]), PE, 0),
    ("nil-map-key", b"\x94\x0d\x05\xa1m\x81\xc0\x01", PE, 0),
    ("array-map-key", b"\x94\x0d\x05\xa1m\x81\x90\x01", PE, 0),
    ("bytes-map-key", pack([13, 5, "m", {b"k": 1}]), PE, 5),
    ("bytes-header-key", pack(pub(headers={b"k": "v"})), PE, 0),
    # header names the broker alone writes (dead-letter origin, ...), in any case
    ("reserved-header", pack(pub(headers={"tidings-dlq-source": "pay.jobs"})), ErrorCode.INVALID_ARGUMENT, 0),
    ("reserved-header-case", pack(pub(headers={"ok": 1, "TiDiNgS-x": "y"})), ErrorCode.INVALID_ARGUMENT, 0),
    ("bytes-option-key", pack(pub(opts={b"id": "x"})), PE, 0),
    # extension types
    ("ext-top-level", pack(ExtType(5, b"x")), PE, 0),
    ("ext-in-args", pack([13, 5, "m", {"a": ExtType(1, b"")}]), PE, 0),
    ("ext-as-op", pack([ExtType(1, b"\x0a")]), PE, 0),
    ("ext-negative-code", b"\x92\x02\xd4\xfb\x00", PE, 0),
    ("timestamp-bad-length", b"\x92\x02\xd5\xff\x00\x00", PE, 0),
    ("timestamp-96bit-as-rid", b"\x92\x02\xc7\x0c\xff" + b"\x00" * 12, PE, 0),
    ("timestamp-top-level", pack(TS), PE, 0),
    ("timestamp-as-op", pack([TS, 1]), PE, 0),
    ("timestamp-subject", pack(pub(subject=TS)), IS, 0),
    ("timestamp-payload", pack(pub(payload=TS)), PE, 0),
    ("timestamp-headers", pack(pub(headers=TS)), PE, 0),
    ("timestamp-header-value", pack(pub(headers={"k": TS})), PE, 0),
    ("timestamp-reply", pack(pub(reply=TS)), IS, 0),
    ("timestamp-seq", pack(pub(seq=TS)), PE, 0),
    ("timestamp-opts", pack(pub(opts=TS)), PE, 0),
    ("timestamp-option-value", pack(pub(opts={"delay": TS})), IA, 0),
    ("timestamp-option-id", pack(pub(opts={"id": TS})), PE, 0),
    ("timestamp-sub-rid", pack([11, TS, 1, "a", None]), PE, 0),
    ("timestamp-sub-pattern", pack([11, 4, 1, TS, None]), IS, 4),
    ("timestamp-sub-group", pack([11, 4, 1, "a", TS]), PE, 4),
    ("timestamp-call-args", pack([13, 5, "m", {"a": TS}]), PE, 5),
    ("timestamp-call-nested", pack([13, 5, "m", {"a": [1, {"b": TS}]}]), PE, 5),
    ("timestamp-call-method", pack([13, 5, TS, {}]), PE, 5),
    ("timestamp-consume-args", pack([14, 6, 1, {"since": TS}]), PE, 6),
    ("timestamp-ack-id", pack([16, 3, 1, [[TS, 0, None]]]), PE, 3),
    ("timestamp-ack-arg", pack([16, 3, 1, [[1, 1, TS]]]), IA, 3),
    ("timestamp-ping", pack([2, TS]), PE, 0),
    ("timestamp-unsub-sid", pack([12, 2, TS]), PE, 2),
    # not a frame
    ("empty-array", pack([]), PE, 0),
    ("int", pack(5), PE, 0),
    ("nil", pack(None), PE, 0),
    ("str", pack("PUB"), PE, 0),
    ("bin", pack(b"\x0a"), PE, 0),
    ("map", pack({"op": 10}), PE, 0),
    ("str-op", pack(["10", []]), PE, 0),
    ("bool-op", pack([True, 1]), PE, 0),
    ("float-op", pack([10.0, []]), PE, 0),
    ("nil-op", pack([None]), PE, 0),
    # unknown operation, or one this side never receives
    ("unknown-op", pack([99, 5]), UO, 0),
    ("op-zero", pack([0]), UO, 0),
    ("negative-op", pack([-1, 1]), UO, 0),
    ("uint64-op", pack([2**64 - 1, 1]), UO, 0),
    ("server-op-ok", pack([65, 7, None]), UO, 7),
    ("server-op-err", pack([66, 3, 1, "m"]), UO, 3),
    ("server-op-msg", pack([67, 1, []]), UO, 0),
    ("server-op-welcome", pack([64, 1, "s", {"max_frame": 65536}]), UO, 0),
    ("server-op-notice", pack([70, "shutdown", {}]), UO, 0),
    # a second HELLO once open
    ("second-hello", pack([1, 1, "again", None, {}]), BS, 0),
    # PUB shapes
    ("pub-no-batch", pack([10]), PE, 0),
    ("pub-batch-not-array", pack([10, "x"]), PE, 0),
    ("pub-extra-field", pack([10, [], 1]), PE, 0),
    ("pub-message-not-array", pack([10, ["a.b"]]), PE, 0),
    ("pub-message-5-fields", pack([10, [["a", b"", None, None, 0]]]), PE, 0),
    ("pub-message-7-fields", pack([10, [["a", b"", None, None, 0, None, None]]]), PE, 0),
    ("pub-subject-empty", pack(pub(subject="")), IS, 0),
    ("pub-subject-int", pack(pub(subject=5)), IS, 0),
    ("pub-subject-list", pack(pub(subject=["a"])), IS, 0),
    ("pub-subject-map", pack(pub(subject={"a": 1})), IS, 0),
    ("pub-subject-bytes", pack(pub(subject=b"a.b")), IS, 0),
    ("pub-subject-empty-token", pack(pub(subject="a..b")), IS, 0),
    ("pub-subject-wildcard", pack(pub(subject="a.*")), IS, 0),
    ("pub-subject-space", pack(pub(subject="a b")), IS, 0),
    ("pub-payload-str", pack(pub(payload="text")), PE, 0),
    ("pub-payload-nil", pack(pub(payload=None)), PE, 0),
    ("pub-headers-list", pack(pub(headers=[["k", "v"]])), PE, 0),
    ("pub-header-empty-name", pack(pub(headers={"": "v"})), PE, 0),
    ("pub-header-long-name", pack(pub(headers={"k" * (MAX_NAME_LENGTH + 1): "v"})), PE, 0),
    ("pub-header-float", pack(pub(headers={"k": 1.5})), PE, 0),
    ("pub-header-nil", pack(pub(headers={"k": None})), PE, 0),
    ("pub-header-bool", pack(pub(headers={"k": True})), PE, 0),
    ("pub-header-list", pack(pub(headers={"k": ["v"]})), PE, 0),
    ("pub-too-many-headers", pack(pub(headers={f"h{i}": i for i in range(MAX_HEADERS + 1)})), PE, 0),
    ("pub-reply-wildcard", pack(pub(reply="_INBOX.>")), IS, 0),
    ("pub-reply-int", pack(pub(reply=1)), IS, 0),
    ("pub-reply-list", pack(pub(reply=["x"])), IS, 0),
    ("pub-seq-negative", pack(pub(seq=-1)), PE, 0),
    ("pub-seq-str", pack(pub(seq="1")), PE, 0),
    ("pub-seq-bool", pack(pub(seq=True)), PE, 0),
    ("pub-seq-nil", pack(pub(seq=None)), PE, 0),
    ("pub-seq-float", pack(pub(seq=1.0)), PE, 0),
    ("pub-opts-list", pack(pub(opts=[])), PE, 0),
    ("pub-opts-unknown", pack(pub(opts={"priority": 1})), PE, 0),
    ("pub-opt-id-empty", pack(pub(opts={"id": ""})), PE, 0),
    ("pub-opt-id-long", pack(pub(opts={"id": "x" * (MAX_NAME_LENGTH + 1)})), PE, 0),
    ("pub-opt-key-int", pack(pub(opts={"key": 5})), PE, 0),
    ("pub-opt-delay-negative", pack(pub(opts={"delay": -1})), IA, 0),
    ("pub-opt-ttl-str", pack(pub(opts={"ttl": "5"})), IA, 0),
    ("pub-opt-at-float", pack(pub(opts={"at": 1.5})), IA, 0),
    ("pub-opt-delay-bool", pack(pub(opts={"delay": True})), IA, 0),
    ("pub-second-message-bad", pack([10, [["a", b"", None, None, 0, None], ["a", "x", None, None, 0, None]]]), PE, 0),
    # SUB
    ("sub-4-fields", pack([11, 1, 1, "a"]), PE, 1),
    ("sub-rid-str", pack([11, "1", 1, "a", None]), PE, 0),
    ("sub-rid-negative", pack([11, -1, 1, "a", None]), PE, 0),
    ("sub-rid-too-big", pack([11, 2**63, 1, "a", None]), PE, 0),
    ("sub-sid-zero", pack([11, 1, 0, "a", None]), PE, 1),
    ("sub-sid-str", pack([11, 1, "s", "a", None]), PE, 1),
    ("sub-pattern-empty-token", pack([11, 1, 1, "a..b", None]), IS, 1),
    ("sub-pattern-gt-not-last", pack([11, 1, 1, "a.>.b", None]), IS, 1),
    ("sub-pattern-partial-wildcard", pack([11, 1, 1, "a.b*", None]), IS, 1),
    ("sub-pattern-nil", pack([11, 1, 1, None, None]), IS, 1),
    ("sub-group-empty", pack([11, 1, 1, "a", ""]), PE, 1),
    ("sub-group-dot", pack([11, 1, 1, "a", "g.h"]), PE, 1),
    ("sub-group-space", pack([11, 1, 1, "a", "g h"]), PE, 1),
    ("sub-group-int", pack([11, 1, 1, "a", 5]), PE, 1),
    ("sub-group-long", pack([11, 1, 1, "a", "g" * (MAX_NAME_LENGTH + 1)]), PE, 1),
    # UNSUB / STOP
    ("unsub-2-fields", pack([12, 1]), PE, 1),
    ("unsub-sid-zero", pack([12, 1, 0]), PE, 1),
    ("unsub-sid-str", pack([12, 1, "1"]), PE, 1),
    ("stop-4-fields", pack([15, 2, 1, 1]), PE, 2),
    ("stop-cid-negative", pack([15, 2, -1]), PE, 2),
    # CALL
    ("call-rid-zero", pack([13, 0, "m", {}]), PE, 0),
    ("call-3-fields", pack([13, 5, "m"]), PE, 5),
    ("call-method-empty", pack([13, 5, "", {}]), PE, 5),
    ("call-method-int", pack([13, 5, 7, {}]), PE, 5),
    ("call-method-long", pack([13, 5, "m" * (MAX_NAME_LENGTH + 1), {}]), PE, 5),
    ("call-args-list", pack([13, 5, "m", []]), PE, 5),
    ("call-args-nil", pack([13, 5, "m", None]), PE, 5),
    ("call-args-too-deep", pack([13, 5, "m", {"a": [[[[[[[[[[[1]]]]]]]]]]]}]), PE, 5),
    # CONSUME
    ("consume-rid-zero", pack([14, 0, 1, {}]), PE, 0),
    ("consume-cid-zero", pack([14, 5, 0, {}]), PE, 5),
    ("consume-args-nil", pack([14, 5, 1, None]), PE, 5),
    ("consume-5-fields", pack([14, 5, 1, {}, 1]), PE, 5),
    # ACK
    ("ack-3-fields", pack([16, 1, 1]), PE, 1),
    ("ack-items-map", pack([16, 1, 1, {}]), PE, 1),
    ("ack-cid-negative", pack([16, 1, -1, []]), PE, 1),
    ("ack-action-4", pack([16, 1, 1, [[1, 4, None]]]), PE, 1),
    ("ack-action-negative", pack([16, 1, 1, [[1, -1, None]]]), PE, 1),
    ("ack-action-bool", pack([16, 1, 1, [[1, True, None]]]), PE, 1),
    ("ack-item-2-fields", pack([16, 1, 1, [[1, 0]]]), PE, 1),
    ("ack-item-not-array", pack([16, 1, 1, [1]]), PE, 1),
    ("ack-arg-float", pack([16, 1, 1, [[1, 1, 1.5]]]), IA, 1),
    ("ack-arg-bytes", pack([16, 1, 1, [[1, 2, b"r"]]]), IA, 1),
    ("ack-id-str", pack([16, 1, 1, [["1", 0, None]]]), PE, 1),
    # PING / PONG
    ("ping-no-rid", pack([2]), PE, 0),
    ("ping-3-fields", pack([2, 1, 2]), PE, 1),
    ("ping-rid-negative", pack([2, -1]), PE, 0),
    ("ping-rid-str", pack([2, "1"]), PE, 0),
    ("pong-rid-too-big", pack([3, 2**63]), PE, 0),
    ("pong-rid-nil", pack([3, None]), PE, 0),
]

# frames sent to a client (after WELCOME)
CLIENT_BAD: list[tuple[str, bytes, ErrorCode, int]] = [
    ("garbage", b"\xc1\xc1", PE, 0),
    ("huge-array-header", b"\xdd\xff\xff\xff\xff", PE, 0),
    ("deep-nesting", _deep(100_000), PE, 0),
    ("client-op-pub", pack([10, []]), UO, 0),
    ("client-op-sub", pack([11, 4, 1, "a", None]), UO, 4),
    ("client-op-hello", pack([1, 1, "n", None, {}]), UO, 0),
    ("second-welcome", pack([64, 1, "s", {"max_frame": 65536}]), BS, 0),
    ("ok-2-fields", pack([65, 1]), PE, 1),
    ("ok-timestamp", pack([65, 1, TS]), PE, 1),
    ("ok-nested-timestamp", pack([65, 1, {"a": [TS]}]), PE, 1),
    ("ok-bytes-key", pack([65, 1, {b"k": 1}]), PE, 1),
    ("ok-int-key", pack([65, 1, {1: 1}]), PE, 0),
    ("ok-ext", pack([65, 1, ExtType(3, b"")]), PE, 0),
    ("ok-rid-negative", pack([65, -1, None]), PE, 0),
    ("err-3-fields", pack([66, 1, 2]), PE, 1),
    ("err-code-str", pack([66, 1, "x", "m"]), PE, 1),
    ("err-code-timestamp", pack([66, 1, TS, "m"]), PE, 1),
    ("err-message-nil", pack([66, 1, 2, None]), PE, 1),
    ("err-code-negative", pack([66, 1, -2, "m"]), PE, 1),
    ("msg-2-fields", pack([67, 1]), PE, 0),
    ("msg-sid-str", pack([67, "x", []]), PE, 0),
    ("msg-payload-str", pack([67, 1, [["a", "p", None, None]]]), PE, 0),
    ("msg-payload-timestamp", pack([67, 1, [["a", TS, None, None]]]), PE, 0),
    ("msg-3-fields", pack([67, 1, [["a", b"", None]]]), PE, 0),
    ("msg-subject-int", pack([67, 1, [[5, b"", None, None]]]), PE, 0),
    ("msg-headers-list", pack([67, 1, [["a", b"", [], None]]]), PE, 0),
    ("msg-header-timestamp", pack([67, 1, [["a", b"", {"k": TS}, None]]]), PE, 0),
    ("msg-reply-int", pack([67, 1, [["a", b"", None, 5]]]), PE, 0),
    ("msg-message-timestamp", pack([67, 1, [TS]]), PE, 0),
    ("confirm-no-items", pack([68]), PE, 0),
    ("confirm-items-map", pack([68, {}]), PE, 0),
    ("confirm-item-2-fields", pack([68, [[1, 0]]]), PE, 0),
    ("confirm-seq-str", pack([68, [["1", 0, None]]]), PE, 0),
    ("confirm-result-timestamp", pack([68, [[1, 0, TS]]]), PE, 0),
    ("deliver-timestamp-ext", pack([69, 1, [[1, "s", b"", None, 1, TS, None]]]), PE, 0),
    ("deliver-timestamp-str", pack([69, 1, [[1, "s", b"", None, 1, "now", None]]]), PE, 0),
    ("deliver-count-str", pack([69, 1, [[1, "s", b"", None, "1", 0, None]]]), PE, 0),
    ("deliver-payload-str", pack([69, 1, [[1, "s", "p", None, 1, 0, None]]]), PE, 0),
    ("deliver-headers-bad", pack([69, 1, [[1, "s", b"", {"k": 1.5}, 1, 0, None]]]), PE, 0),
    ("deliver-meta-timestamp", pack([69, 1, [[1, "s", b"", None, 1, 0, {"t": TS}]]]), PE, 0),
    ("deliver-6-fields", pack([69, 1, [[1, "s", b"", None, 1, 0]]]), PE, 0),
    ("deliver-cid-str", pack([69, "1", []]), PE, 0),
    ("notice-kind-int", pack([70, 5, {}]), PE, 0),
    ("notice-info-list", pack([70, "k", []]), PE, 0),
    ("notice-info-timestamp", pack([70, "k", {"a": TS}]), PE, 0),
    ("notice-2-fields", pack([70, "k"]), PE, 0),
    ("ping-rid-str", pack([2, "x"]), PE, 0),
]


def _check_rejected_then_usable(receiver: Connection, sender: Connection, body: bytes,
                                code: ErrorCode, rid: int) -> None:
    nxt = F.Ping(424242)
    receiver.receive_data(framed(body) + sender.send(nxt))
    with pytest.raises(Exception) as ei:
        receiver.next_event()
    exc = ei.value
    assert type(exc) is RemoteProtocolError, repr(exc)
    assert exc.code == code, exc.message
    assert exc.rid == rid, exc.message
    assert exc.fatal is False
    assert isinstance(exc.message, str) and exc.message
    # the bad frame was consumed whole; the stream is still in sync
    assert receiver.state is State.OPEN
    assert receiver.next_event() == nxt


@pytest.mark.parametrize("body,code,rid", [c[1:] for c in SERVER_BAD], ids=[c[0] for c in SERVER_BAD])
def test_server_rejects_bad_frame_and_carries_on(make_pair, body: bytes, code: ErrorCode, rid: int) -> None:
    c, s = make_pair()
    _check_rejected_then_usable(s, c, body, code, rid)


@pytest.mark.parametrize("body,code,rid", [c[1:] for c in CLIENT_BAD], ids=[c[0] for c in CLIENT_BAD])
def test_client_rejects_bad_frame_and_carries_on(make_pair, body: bytes, code: ErrorCode, rid: int) -> None:
    c, s = make_pair()
    _check_rejected_then_usable(c, s, body, code, rid)


def test_empty_frame_is_rejected_and_stream_stays_usable(pair) -> None:
    c, s = pair
    s.receive_data(HEADER.pack(0) + c.send(F.Ping(1)))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal is False and ei.value.code == ErrorCode.PROTOCOL_ERROR
    assert s.next_event() == F.Ping(1)


def test_payload_above_max_payload_is_rejected(make_pair) -> None:
    c, s = make_pair(server_max_payload=100)
    s.receive_data(c.send(F.Pub([["a", b"x" * 100, None, None, 0, None]])))
    assert isinstance(s.next_event(), F.Pub)
    s.receive_data(c.send(F.Pub([["a", b"x" * 101, None, None, 0, None]])) + c.send(F.Ping(1)))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert not ei.value.fatal
    assert s.next_event() == F.Ping(1)


def test_default_max_payload_leaves_room_for_the_envelope() -> None:
    from tidings.protocol.connection import FRAME_OVERHEAD

    s = Connection(Role.SERVER, max_frame=4 * 1024 * 1024)
    assert s.max_payload == 4 * 1024 * 1024 - FRAME_OVERHEAD
    assert Connection(Role.SERVER, max_frame=16 * 1024).max_payload == 1024


def test_many_bad_frames_in_one_read(pair) -> None:
    # one read may hold good and bad frames interleaved; each bad one is one error
    c, s = pair
    bads = [body for _, body, _, _ in SERVER_BAD]
    data = b"".join(framed(b) + c.send(F.Ping(i)) for i, b in enumerate(bads))
    s.receive_data(data)
    for i in range(len(bads)):
        with pytest.raises(RemoteProtocolError):
            s.next_event()
        assert s.next_event() == F.Ping(i)


# ------------------------------------------------------------ before the handshake

@pytest.mark.parametrize("body", [b"\xc1", b"\xdd\xff\xff\xff\xff", _deep(2000), pack(TS), b"",
                                  pack([1, 1, 5, None, {}]), pack([1, 1, "n", {"t": TS}, {}]),
                                  pack([1, 1, "n", None, None]), pack([1, 1, "n", None]),
                                  pack([99, 1]), pack([2, 1])],
                         ids=["garbage", "huge-array", "deep", "timestamp", "empty", "hello-name-int",
                              "hello-auth-timestamp", "hello-options-nil", "hello-4-fields", "unknown-op",
                              "ping"])
def test_anything_but_a_valid_hello_first_is_fatal(body: bytes) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(framed(body) + framed(pack([1, 1, "late", None, {}])))
    with pytest.raises(Exception) as ei:
        s.next_event()
    assert type(ei.value) is RemoteProtocolError
    assert ei.value.fatal is True and ei.value.code == ErrorCode.BAD_STATE
    assert s.state is State.CLOSED


@pytest.mark.parametrize("body", [b"\xc1", pack(TS), b"", pack([67, 1, []]), pack([65, 1, None]),
                                  pack([2, 1]), pack([64, 1, 5, {}])],
                         ids=["garbage", "timestamp", "empty", "msg", "ok", "ping", "welcome-bad-name"])
def test_anything_but_welcome_or_err_first_is_fatal_for_client(body: bytes) -> None:
    c = Connection(Role.CLIENT)
    c.send(F.Hello(1, "n", None, {}))
    c.receive_data(framed(body))
    with pytest.raises(Exception) as ei:
        c.next_event()
    assert type(ei.value) is RemoteProtocolError
    assert ei.value.fatal is True and ei.value.code == ErrorCode.BAD_STATE
    assert c.state is State.CLOSED


def test_sender_side_bad_frames_are_caught_at_the_receiver(pair) -> None:
    # Connection.send does not validate contents (hot path); the receiver does.
    c, s = pair
    s.receive_data(c.send(F.Sub(3, 1, "a..b")))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == ErrorCode.INVALID_SUBJECT and ei.value.rid == 3
    assert not ei.value.fatal


def _nested(levels: int) -> dict[str, object]:
    """A map holding lists so that there are ``levels`` containers in all."""
    v: object = 1
    for _ in range(levels - 1):
        v = [v]
    return {"a": v}


def test_nesting_limit_is_ten_containers(make_pair) -> None:
    c, s = make_pair()
    s.receive_data(c.send(F.Call(1, "m", _nested(10))))
    assert s.next_event() == F.Call(1, "m", _nested(10))
    s.receive_data(c.send(F.Call(2, "m", _nested(11))) + c.send(F.Ping(3)))
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.rid == 2 and not ei.value.fatal
    assert s.next_event() == F.Ping(3)
    # the same limit applies to results the client reads
    c.receive_data(s.send(F.Ok(4, [[[[[[[[[[1]]]]]]]]]])))
    assert c.next_event() == F.Ok(4, [[[[[[[[[[1]]]]]]]]]])
    c.receive_data(s.send(F.Ok(5, [[[[[[[[[[[1]]]]]]]]]]])))
    with pytest.raises(RemoteProtocolError):
        c.next_event()
