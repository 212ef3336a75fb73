"""Length prefix + msgpack, and the shape checks that turn values into frames.

A frame on the wire is a 4-byte big-endian unsigned length N followed by N
bytes holding exactly one msgpack value. Decoding never trusts the peer:
lengths are checked against a limit before any buffering, msgpack
extension types are refused, and every field's type is checked. Anything
wrong raises :class:`RemoteProtocolError` and nothing else.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, Callable, Final

import msgpack

from tidings.protocol import frames as F
from tidings.protocol import numbers as N
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode, RemoteProtocolError
from tidings.protocol.subjects import validate_pattern, validate_subject

HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = 4
PRE_HELLO_MAX_FRAME: Final = 16 * 1024  # before HELLO only a small frame is accepted: no big allocation for strangers
DEFAULT_MAX_FRAME: Final = 1024 * 1024  # after HELLO, unless negotiated otherwise
MAX_FRAME_CEILING: Final = 64 * 1024 * 1024  # no side may announce more than this
MAX_HEADERS: Final = 64  # headers per message
# Nesting depth of CALL/CONSUME/HELLO argument maps and SUB filters (10 containers): a content
# filter (protocol/filters.py, 5 deep with "data" and "numeric") inside a bind entry takes 8 in a
# declare's args and 9 in queue.info's answer; the rest is margin. It bounds recursion, not memory.
MAX_NESTING: Final = 11
MAX_NAME_LENGTH: Final = 255  # client names, queue/stream/group names, header keys
# Decoded size. msgpack turns one byte into a Python object of 56-80 bytes (an empty array or
# map), so a frame of empty containers decoded to ~70 times its size. The densest legitimate
# frame, an ACK batch, holds one array per 4 or more bytes ([id, action, arg]); a frame may hold
# at most that many arrays (a map counts as two: a dict costs two to three lists), plus a few
# for the envelope, and is refused as it decodes past it. So decoding a frame costs at most ~25
# times its size (a legitimate ACK batch about as much).
BYTES_PER_CONTAINER: Final = 4
CONTAINER_SLACK: Final = 16
# Frames up to this size decode without counting: whatever they hold, at most ~10 MB for an
# instant (one frame is decoded at a time). Counting costs a Python call per array and map
# (roughly doubling the decode time of a batch of small messages), which the common batch
# sizes must not pay; larger frames pay it, in proportion to the arrays and maps they hold.
COUNT_CONTAINERS_ABOVE: Final = 128 * 1024
# HELLO (the only frame a server accepts before the handshake) holds no array longer than 5 and
# no map longer than a few keys. msgpack allocates an array's claimed length before reading its
# items, so unbounded claims in nested headers of a 16 KiB frame could allocate ~128 MB.
PRE_HELLO_MAX_ARRAY: Final = 16
PRE_HELLO_MAX_MAP: Final = MAX_HEADERS


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack(body: Any) -> Any:
    """Decode one msgpack value from ``body`` (bytes or memoryview), with
    msgpack's own limits (no string, binary, array or map longer than the
    frame; maps: half of it) and no extension types.

    Raises RemoteProtocolError (non-fatal: framing is intact) when the
    bytes are not exactly one well-formed value of the allowed types.
    """
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_reject_ext,
                               use_list=True)
    # The C unpacker reports bad input through these; nothing else escapes.
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"undecodable frame: {exc.__class__.__name__}: {exc}") from exc


def unpack_bounded(body: Any, pre_hello: bool = False) -> Any:
    """Like :func:`unpack`, for frames a server must not trust with its memory.

    The frame may decode to at most ``len // BYTES_PER_CONTAINER +
    CONTAINER_SLACK`` arrays (a map counting as two): decoding stops past
    it. ``pre_hello``: arrays of at most PRE_HELLO_MAX_ARRAY items and maps
    of at most PRE_HELLO_MAX_MAP entries (a server's first frame, HELLO).
    Raises RemoteProtocolError (non-fatal) for undecodable or too dense frames.
    """
    n = len(body)
    limit = n // BYTES_PER_CONTAINER + CONTAINER_SLACK
    try:
        if pre_hello:
            return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                                   max_str_len=n, max_bin_len=n, max_array_len=PRE_HELLO_MAX_ARRAY,
                                   max_map_len=PRE_HELLO_MAX_MAP, max_ext_len=0)
        take = itertools.islice(itertools.repeat(None), limit).__next__  # StopIteration past the limit

        def count_array(container: Any) -> Any:
            take()
            return container

        def count_map(container: Any) -> Any:
            # a dict costs two to three lists (~200 bytes with one entry, from 2 bytes of input)
            take()
            take()
            return container

        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                               max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2,
                               max_ext_len=0, list_hook=count_array, object_hook=count_map)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"undecodable frame: {exc.__class__.__name__}: {exc}") from exc
    except StopIteration:
        raise RemoteProtocolError(
            f"frame of {n} bytes holds more than {limit} arrays and maps "
            f"(at most one per {BYTES_PER_CONTAINER} bytes, a map counting as two)") from None


class Encoder:
    """Packs frames into length-prefixed bytes, reusing one Packer."""

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack

    def encode_value(self, value: Any) -> bytes:
        body = self._pack(value)
        return HEADER.pack(len(body)) + body

    def encode_parts(self, value: Any, out: list[bytes]) -> int:
        """Append header and body to ``out`` (for one join later); return the frame size."""
        body = self._pack(value)
        n = len(body)
        out.append(HEADER.pack(n))
        out.append(body)
        return n + HEADER_SIZE


# ---------------------------------------------------------------- validation

def _fail(msg: str, rid: int = 0, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


def _int(v: Any, what: str, rid: int = 0, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _fail(f"{what} must be an integer in [{lo}, {hi}]", rid)
    return v


def _name(v: Any, what: str, rid: int = 0, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if type(v) is not str or not 0 < len(v) <= MAX_NAME_LENGTH:
        raise _fail(f"{what} must be a string of 1..{MAX_NAME_LENGTH} characters", rid)
    return v


def check_plain(v: Any, depth: int = 0) -> None:
    """Accept only nil/bool/int/float/str/bytes/lists/str-keyed maps, nested
    at most MAX_NESTING deep (msgpack Timestamp objects are refused here)."""
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str or t is bytes:
        return
    if depth >= MAX_NESTING:
        raise _fail("arguments nested too deeply")
    if t is list:
        for x in v:
            check_plain(x, depth + 1)
        return
    if t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise _fail("map keys must be strings")
            check_plain(x, depth + 1)
        return
    raise _fail(f"value of type {t.__name__} is not allowed")


def _args(v: Any, what: str, rid: int) -> dict[str, Any]:
    if type(v) is not dict:
        raise _fail(f"{what} must be a map", rid)
    try:
        check_plain(v, 1)
    except RemoteProtocolError as exc:
        exc.rid = rid
        raise
    return v


def check_headers(h: Any, published: bool = False) -> None:
    """Headers are a map of str -> str | int | bytes, at most MAX_HEADERS entries.

    ``published``: they come from a publisher (PUB), who may not use the
    broker's reserved names (V.RESERVED_HEADER_PREFIX, any letter case), but for
    the few in V.PUBLISHER_HEADERS spelled exactly so: INVALID_ARGUMENT. Checked in this one loop, so it costs a test per header."""
    if type(h) is not dict:
        raise _fail("headers must be a map or nil")
    if len(h) > MAX_HEADERS:
        raise _fail(f"at most {MAX_HEADERS} headers are allowed")
    for k, v in h.items():
        if type(k) is not str or not 0 < len(k) <= MAX_NAME_LENGTH:
            raise _fail("header names must be non-empty strings")
        # k[7] first: one index per header; the slice only for likely hits
        if (published and len(k) >= 8 and k[7] == "-" and k[:8].lower() == V.RESERVED_HEADER_PREFIX
                and k not in V.PUBLISHER_HEADERS):
            raise _fail(f"header {k!r} is reserved: names starting with {V.RESERVED_HEADER_PREFIX!r} "
                        "are set by the broker only", code=ErrorCode.INVALID_ARGUMENT)
        tv = type(v)
        if tv is not str and tv is not int and tv is not bytes:
            raise _fail(f"header {k!r} must be a string, integer or bytes")


class SubjectCache:
    """Remembers subjects already validated so a hot publisher pays the
    token rules once per distinct subject. Bounded: cleared when full."""

    __slots__ = ("_seen",)
    LIMIT: Final = 4096

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def subject(self, s: Any) -> str:
        # type first: an unhashable peer value (list, map) must not reach the set lookup
        if type(s) is str and s in self._seen:
            return s
        subject = validate_subject(s)
        if len(self._seen) >= self.LIMIT:
            self._seen.clear()
        self._seen.add(subject)
        return subject


def _check_pub_message(m: Any, subjects: SubjectCache, max_payload: int) -> None:
    if type(m) is not list or len(m) != F.PUB_FIELDS:
        raise _fail(f"a PUB message must be an array of {F.PUB_FIELDS}")
    s, p, h, r, seq, o = m
    subjects.subject(s)
    if type(p) is not bytes:
        raise _fail("payload must be binary")
    if len(p) > max_payload:
        raise _fail(f"payload of {len(p)} bytes exceeds max_payload {max_payload}")
    if h is not None:
        check_headers(h, True)
    if r is not None:
        subjects.subject(r)
    if type(seq) is not int or seq < 0:
        raise _fail("seq must be a non-negative integer")
    if o is not None:
        if type(o) is not dict:
            raise _fail("PUB options must be a map or nil")
        for k, v in o.items():
            if k not in F.PUB_OPTIONS:
                raise _fail(f"unknown PUB option {k!r}")
            if k == F.OPT_MSG_ID or k == F.OPT_KEY:
                if type(v) is not str or not 0 < len(v) <= MAX_NAME_LENGTH:
                    raise _fail(f"option {k!r} must be a string of 1..{MAX_NAME_LENGTH} characters")
            elif type(v) is not int or not 0 <= v <= _OPT_MAX[k]:
                raise _fail(f"option {k!r} must be an integer in [0, {_OPT_MAX[k]}]", 0, ErrorCode.INVALID_ARGUMENT)


def check_pub_message(m: Any, max_payload: int, subjects: SubjectCache | None = None) -> None:
    """Check one PUB message ``[subject, payload, headers, reply, seq, opts]`` by the
    rules a PUB frame's messages follow (subject, payload size, headers and their
    reserved names, options); raises RemoteProtocolError. For publishers that do not
    arrive in a frame (the broker's HTTP gateway)."""
    _check_pub_message(m, subjects if subjects is not None else SubjectCache(), max_payload)


# Upper bounds of the integer PUB options (see protocol/numbers.py).
_OPT_MAX: Final = {F.OPT_DELAY: N.MAX_DURATION_MS, F.OPT_TTL: N.MAX_DURATION_MS, F.OPT_AT: N.MAX_TIMESTAMP_MS,
                   F.OPT_PRIORITY: N.MAX_PRIORITY,
                   F.OPT_NEW: 1}


def _check_ack_item(it: Any) -> None:
    """[delivery_id, action, arg]: a NACK's arg is nil, a delay in ms or a map of
    ``delay`` and ``error`` (the handler's failure, kept as the message's last error), a REJECT's nil
    or a reason string, ACK and IN_PROGRESS take nil. Checked here, before anything is
    settled: a bad item must not leave a delivery half-settled."""
    if type(it) is not list or len(it) != F.ACK_FIELDS or type(it[0]) is not int \
            or type(it[1]) is not int or not 0 <= it[1] <= 3:
        raise _fail("an ACK item must be [delivery_id, action 0..3, arg]")
    N.check_int(it[0], "delivery_id")
    a = it[2]
    if a is None:
        return
    action = it[1]
    if action == F.AckAction.NACK:
        if type(a) is dict:  # {"delay"?: ms, "error"?: why the handler failed}
            if not a.keys() <= F.NACK_KEYS:
                raise N.bad(f"a NACK map takes only the keys {sorted(F.NACK_KEYS)}")
            if a.get("delay") is not None:
                N.check_int(a["delay"], "a NACK delay (ms)", 0, N.MAX_DURATION_MS)
            if a.get("error") is not None and type(a["error"]) is not str:
                raise N.bad("a NACK error must be a string or nil")
            return
        N.check_int(a, "a NACK delay (ms)", 0, N.MAX_DURATION_MS)
    elif action == F.AckAction.REJECT:
        if type(a) is not str:
            raise N.bad("a REJECT reason must be a string or nil")
    else:
        raise N.bad("ACK and IN_PROGRESS take no argument (nil)")


def _rid_of(v: list[Any]) -> int:
    """Best-effort request id of a frame that failed validation."""
    if len(v) > 1 and type(v[1]) is int and v[0] in _HAS_RID and 0 <= v[1] < 2**63:
        return v[1]
    return 0


_HAS_RID: Final = frozenset({F.Op.PING, F.Op.PONG, F.Op.SUB, F.Op.UNSUB, F.Op.CALL,
                             F.Op.CONSUME, F.Op.STOP, F.Op.ACK, F.Op.OK, F.Op.ERR})


class Decoder:
    """Turns decoded msgpack values into frames, for one role."""

    __slots__ = ("accept", "subjects", "max_payload")

    def __init__(self, accept: frozenset[F.Op], max_payload: int) -> None:
        self.accept = accept
        self.subjects = SubjectCache()
        self.max_payload = max_payload

    def frame(self, v: Any) -> F.Frame:
        if type(v) is not list or not v or type(v[0]) is not int:
            raise _fail("a frame must be a non-empty array starting with an operation code")
        op = v[0]
        if op not in self.accept:
            raise _fail(f"unknown or unexpected operation {op}", _rid_of(v), ErrorCode.UNKNOWN_OPERATION)
        rid = _rid_of(v)
        try:
            return self._build(op, v, rid)
        except RemoteProtocolError as exc:
            if not exc.rid:
                exc.rid = rid
            raise

    def _build(self, op: int, v: list[Any], rid: int) -> F.Frame:
        n = len(v)
        if op == F.Op.PUB:
            if n != 2 or type(v[1]) is not list:
                raise _fail("PUB is [10, messages]")
            subjects, maxp = self.subjects, self.max_payload
            for m in v[1]:
                _check_pub_message(m, subjects, maxp)
            return F.Pub(v[1])
        if op == F.Op.MSG:
            if n != 3 or type(v[2]) is not list:
                raise _fail("MSG is [67, sid, messages]")
            _int(v[1], "sid")
            for m in v[2]:
                if type(m) is not list or len(m) != F.MSG_FIELDS or type(m[0]) is not str \
                        or type(m[1]) is not bytes:
                    raise _fail("a MSG message must be [subject, payload, headers, reply]")
                if m[2] is not None:
                    check_headers(m[2])
                if m[3] is not None and type(m[3]) is not str:
                    raise _fail("reply must be a string or nil")
            return F.Msg(v[1], v[2])
        if op == F.Op.ACK:
            if n != 4 or type(v[3]) is not list:
                raise _fail("ACK is [16, rid, cid, items]")
            _int(v[1], "rid")
            _int(v[2], "cid")
            for it in v[3]:
                _check_ack_item(it)
            return F.Ack(v[1], v[2], v[3])
        if op == F.Op.DELIVER:
            if n != 3 or type(v[2]) is not list:
                raise _fail("DELIVER is [69, cid, items]")
            _int(v[1], "cid")
            for it in v[2]:
                if type(it) is not list or len(it) != F.DELIVER_FIELDS or type(it[0]) is not int \
                        or type(it[1]) is not str or type(it[2]) is not bytes or type(it[4]) is not int \
                        or type(it[5]) is not int:
                    raise _fail("a DELIVER item has the wrong shape")
                if it[3] is not None:
                    check_headers(it[3])
                if it[6] is not None:
                    check_plain(it[6], 1)
            return F.Deliver(v[1], v[2])
        if op == F.Op.CONFIRM:
            if n != 2 or type(v[1]) is not list:
                raise _fail("CONFIRM is [68, items]")
            for it in v[1]:
                if type(it) is not list or len(it) != F.CONFIRM_FIELDS or type(it[0]) is not int \
                        or type(it[1]) is not int:
                    raise _fail("a CONFIRM item must be [seq, code, result]")
                check_plain(it[2], 1)
            return F.Confirm(v[1])
        if op == F.Op.PING or op == F.Op.PONG:
            if n != 2:
                raise _fail("PING/PONG is [op, rid]")
            _int(v[1], "rid")
            return F.Ping(v[1]) if op == F.Op.PING else F.Pong(v[1])
        if op == F.Op.SUB:
            if n != 5 and n != 6:
                raise _fail("SUB is [11, rid, sid, pattern, group, filter?]", rid)
            _int(v[1], "rid")
            _int(v[2], "sid", rid, 1)
            validate_pattern(v[3])
            if v[4] is not None:
                _name(v[4], "group", rid)
                if "." in v[4] or " " in v[4]:
                    raise _fail("group names may not contain dots or spaces", rid)
            flt = v[5] if n == 6 else None
            if flt is not None:
                if type(flt) is not dict:
                    raise _fail("a SUB filter is a map (or nil)", rid, ErrorCode.INVALID_ARGUMENT)
                try:
                    check_plain(flt, 1)
                except RemoteProtocolError as exc:
                    exc.rid = rid
                    raise
            return F.Sub(v[1], v[2], v[3], v[4], flt)
        if op == F.Op.UNSUB or op == F.Op.STOP:
            if n != 3:
                raise _fail("UNSUB/STOP is [op, rid, id]", rid)
            _int(v[1], "rid")
            _int(v[2], "id", rid, 1)
            return F.Unsub(v[1], v[2]) if op == F.Op.UNSUB else F.Stop(v[1], v[2])
        if op == F.Op.CALL:
            if n != 4:
                raise _fail("CALL is [13, rid, method, args]", rid)
            _int(v[1], "rid", 0, 1)
            _name(v[2], "method", rid)
            args = _args(v[3], "args", rid)
            N.check_call_args(v[2], args, rid)
            return F.Call(v[1], v[2], args)
        if op == F.Op.CONSUME:
            if n != 4:
                raise _fail("CONSUME is [14, rid, cid, args]", rid)
            _int(v[1], "rid", 0, 1)
            _int(v[2], "cid", rid, 1)
            args = _args(v[3], "args", rid)
            N.check_consume_args(args, rid)
            return F.Consume(v[1], v[2], args)
        if op == F.Op.OK:
            if n != 3:
                raise _fail("OK is [65, rid, result]")
            _int(v[1], "rid")
            check_plain(v[2], 1)
            return F.Ok(v[1], v[2])
        if op == F.Op.ERR:
            if n != 4 or type(v[3]) is not str:
                raise _fail("ERR is [66, rid, code, message]")
            _int(v[1], "rid")
            _int(v[2], "code")
            return F.Err(v[1], v[2], v[3])
        if op == F.Op.NOTICE:
            if n != 3 or type(v[1]) is not str:
                raise _fail("NOTICE is [70, kind, info]")
            return F.Notice(v[1], _args(v[2], "info", 0))
        if op == F.Op.HELLO:
            if n != 5:
                raise _fail("HELLO is [1, version, client_name, auth, options]")
            _int(v[1], "version")
            if type(v[2]) is not str or len(v[2]) > MAX_NAME_LENGTH:
                raise _fail("client_name must be a string")
            if v[3] is not None:
                _args(v[3], "auth", 0)
            return F.Hello(v[1], v[2], v[3], _args(v[4], "options", 0))
        if op == F.Op.WELCOME:
            if n != 4 or type(v[2]) is not str:
                raise _fail("WELCOME is [64, version, server_name, info]")
            _int(v[1], "version")
            return F.Welcome(v[1], v[2], _args(v[3], "info", 0))
        raise _fail(f"unknown operation {op}", rid, ErrorCode.UNKNOWN_OPERATION)  # pragma: no cover
