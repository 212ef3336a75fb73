"""The ranges of every numeric field a peer sends, checked where frames are decoded.

One place holds them so that both sides agree and no handler meets a
number it did not expect: a value out of range is refused when the frame
is decoded, before the broker changes any state, with INVALID_ARGUMENT for
that operation only (the connection goes on). Before this, ``delay =
2**64-1`` overflowed inside a store transaction, a stream read from
``time_ms = 2**64-1`` killed its connection, and a NACK with a string
delay raised in the middle of settling and stranded the message.

Durations are milliseconds, timestamps are milliseconds since the Unix
epoch. The bounds are chosen so that ``now + duration`` and every stored
value fit SQLite's signed 64-bit INTEGER with room to spare.
"""

from __future__ import annotations

from typing import Any, Final

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

MAX_INT: Final = 2**63 - 1  # ids, offsets, counts: SQLite INTEGER is signed 64-bit
# 9999-12-31T23:59:59.999Z: the last instant a calendar date can name; far below 2**63.
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
# A delay, TTL or nack delay of up to 100 years: longer is a bug, not a plan. now + this fits int64.
MAX_DURATION_MS: Final = 100 * 366 * 86_400_000
MAX_PREFETCH: Final = 10_000  # deliveries one queue consumer may hold unacked
MAX_WINDOW: Final = 10_000  # in-flight deliveries per partition of a stream group member
MAX_PRIORITY: Final = 255  # a message's priority on the wire (as AMQP's octet); a queue clamps it to its max_priority
MAX_PARTITIONS: Final = 256  # partitions of one stream (one actor state and one offset each)
MAX_LIST_LIMIT: Final = 10_000  # rows one listing call (dlq.list) returns


def bad(message: str, rid: int = 0) -> RemoteProtocolError:
    """The error for a field of the wrong type or range (non-fatal, for this operation)."""
    return RemoteProtocolError(message, ErrorCode.INVALID_ARGUMENT, rid=rid)


def check_int(v: Any, what: str, lo: int = 0, hi: int = MAX_INT, rid: int = 0) -> int:
    """``v`` if it is an int (not a bool) in ``[lo, hi]``; else raise INVALID_ARGUMENT."""
    if type(v) is not int or not lo <= v <= hi:
        raise bad(f"{what} must be an integer in [{lo}, {hi}]", rid)
    return v


def check_number(v: Any, what: str, lo: float, hi: float, rid: int = 0) -> float:
    """``v`` if it is an int or a finite float in ``[lo, hi]``; else raise INVALID_ARGUMENT."""
    if (type(v) is not int and type(v) is not float) or not lo <= v <= hi:  # NaN fails the comparison
        raise bad(f"{what} must be a number in [{lo}, {hi}]", rid)
    return v


def check_start(v: Any, rid: int = 0) -> None:
    """A stream reader's ``start``: "earliest", "latest", an offset or {"time_ms": ms}."""
    if v == "earliest" or v == "latest":
        return
    if type(v) is dict:
        if set(v) != {"time_ms"}:
            raise bad("start {'time_ms': int} expected", rid)
        check_int(v["time_ms"], "start.time_ms", 0, MAX_TIMESTAMP_MS, rid)
        return
    if type(v) is not int:
        raise bad("start must be 'earliest', 'latest', an offset or {'time_ms': ...}", rid)
    check_int(v, "start", 0, MAX_INT, rid)


# Numeric arguments of CONSUME and of CALL methods: name -> (lo, hi). Optional
# unless a handler says otherwise (an absent key takes its default there).
CONSUME_ARGS: Final[dict[str, tuple[int, int]]] = {
    "prefetch": (1, MAX_PREFETCH),
    "window": (1, MAX_WINDOW),
    "partition": (0, MAX_PARTITIONS - 1),
}
CALL_ARGS: Final[dict[str, dict[str, tuple[int, int]]]] = {
    "dlq.list": {"limit": (1, MAX_LIST_LIMIT), "offset": (0, MAX_INT)},
    "dlq.redrive": {"count": (1, MAX_INT)},
}


def check_consume_args(args: dict[str, Any], rid: int = 0) -> None:
    """Range-check CONSUME's numeric arguments (raises INVALID_ARGUMENT)."""
    for key, (lo, hi) in CONSUME_ARGS.items():
        v = args.get(key)
        if v is not None:
            check_int(v, key, lo, hi, rid)
    if "start" in args:
        check_start(args["start"], rid)


def check_call_args(method: str, args: dict[str, Any], rid: int = 0) -> None:
    """Range-check the numeric arguments of ``method`` (raises INVALID_ARGUMENT).
    Declare settings are checked by the queue/stream config with these helpers."""
    spec = CALL_ARGS.get(method)
    if spec is None:
        return
    for key, (lo, hi) in spec.items():
        v = args.get(key)
        if v is not None:
            check_int(v, key, lo, hi, rid)
