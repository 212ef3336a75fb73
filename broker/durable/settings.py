"""The settings of queues and streams: validated, normalised, compared on re-declare.

Dead-letter queue naming (``<name>.dlq``) and a DLQ's own settings live here
too, for queues and streams alike.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from tidings.protocol import numbers as N
from tidings.protocol.errors import ErrorCode, RemoteProtocolError
from tidings.protocol.filters import FilterError, canonical, compile_filter
from tidings.protocol.numbers import check_int
from tidings.protocol.subjects import validate_pattern

DEFAULT_MAX_DELIVERIES: Final = 5  # then the message moves to the DLQ (never silently dropped)
DEFAULT_ACK_DEADLINE: Final = 30.0
OVERFLOW_POLICIES: Final = ("reject", "dead_letter_oldest")
DLQ_SUFFIX: Final = ".dlq"
MAX_QUEUE_NAME: Final = 200  # leaves room for the ".dlq" suffix within the 255 name limit
MAX_BACKOFF: Final = 86400 * 7  # seconds: a retry delay longer than a week is a mistake, not a policy
MAX_PARTITIONS: Final = N.MAX_PARTITIONS  # one actor state and one committed offset per partition and group
DEFAULT_WINDOW: Final = 100  # in-flight deliveries per partition in a consumer group
#: Highest max_priority a queue may have: each priority is a lane with its own
#: paging cursor and a query per refill, so a handful (as RabbitMQ advises) is the point.
MAX_QUEUE_PRIORITY: Final = 9


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, ErrorCode.INVALID_ARGUMENT)


def parse_bind(bind: Any, stored: bool = False) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """A declare's ``bind`` list -> (every distinct pattern, the (pattern, filter JSON) pairs).

    An entry is a subject pattern, or ``{"subject": pattern, "match": filter}``
    (protocol/filters.py; ``match`` may be left out or null). Several filters on one
    pattern are alternatives (any matches); a pattern also bound without a filter
    takes every message, so its filters are dropped. Raises INVALID_ARGUMENT naming
    the entry, and for a bad filter its key and operator."""
    if not isinstance(bind, (list, tuple)):
        raise _bad("bind must be a list of subject patterns or {subject, match} maps")
    pats: dict[str, None] = {}
    plain: set[str] = set()
    filters: dict[tuple[str, str], None] = {}
    for entry in bind:
        spec = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"subject", "match"}
            if unknown or "subject" not in entry:
                raise _bad(f"a bind entry is a pattern or a map {{subject, match}}, not {entry!r}")
            pattern, spec = entry["subject"], entry.get("match")
        else:
            pattern = entry
        try:
            pattern = validate_pattern(pattern, stored=stored)
        except RemoteProtocolError as exc:
            raise _bad(exc.message) from None
        pats[pattern] = None
        if spec is None:
            plain.add(pattern)
            continue
        try:
            compile_filter(spec)
        except FilterError as exc:
            raise _bad(f"bind {pattern!r}: {exc}") from None
        filters[(pattern, canonical(spec))] = None
    return tuple(pats), tuple(f for f in filters if f[0] not in plain)


def bind_entries(bind: tuple[str, ...], filters: tuple[tuple[str, str], ...]) -> list[Any]:
    """The ``bind`` list as a declare takes it back (what configs store and info shows)."""
    by: dict[str, list[str]] = {}
    for p, text in filters:
        by.setdefault(p, []).append(text)
    out: list[Any] = []
    for p in bind:
        texts = by.get(p)
        if texts is None:
            out.append(p)
        else:
            out.extend({"subject": p, "match": json.loads(t)} for t in texts)
    return out


def validate_name(name: Any, what: str = "queue") -> str:
    if type(name) is not str or not 0 < len(name) <= MAX_QUEUE_NAME:
        raise _bad(f"{what} name must be a string of 1..{MAX_QUEUE_NAME} characters")
    for tok in name.split("."):
        if not tok or any(c.isspace() or c in "*>" for c in tok):
            raise _bad(f"invalid {what} name {name!r}: dot-separated tokens, no spaces, '*' or '>'")
    return name


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Settings of one durable queue. Times are seconds (floats)."""

    name: str
    bind: tuple[str, ...] = ()
    ack_deadline: float = DEFAULT_ACK_DEADLINE
    max_deliveries: int = DEFAULT_MAX_DELIVERIES  # 0 = unlimited
    backoff_initial: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 60.0
    backoff_jitter: float = 0.1  # +/- this fraction of the delay, at random
    backoff_schedule: tuple[float, ...] = ()  # explicit delays per attempt; overrides the formula
    dead_letter: str | None = None  # default "<name>.dlq"; None only for a DLQ itself
    message_ttl: float | None = None
    dead_letter_expired: bool = False
    max_length: int | None = None
    overflow: str = "reject"
    is_dlq: bool = field(default=False)
    max_priority: int = 0  # > 0: a priority queue (priority.py), messages 0..max_priority, higher first
    # (pattern, canonical filter JSON) of the bindings that carry a filter (parse_bind); given
    # and stored inside ``bind`` as {subject, match} entries, never as a setting of its own.
    bind_filters: tuple[tuple[str, str], ...] = ()

    def priority_of(self, p: int | None) -> int | None:
        """The priority a message stored in this queue gets: None in a plain queue,
        else ``p`` (default 0) clamped to max_priority."""
        if not self.max_priority:
            return None
        return 0 if p is None else min(p, self.max_priority)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bind"] = bind_entries(self.bind, self.bind_filters)
        del d["bind_filters"]
        d["backoff_schedule"] = list(self.backoff_schedule)
        return d

    @classmethod
    def from_args(cls, args: dict[str, Any], *, stored: bool = False) -> QueueConfig:
        """Build from a declare call's arguments (``stored``: a recovered queue's, see
        validate_pattern); raises RemoteProtocolError(INVALID_ARGUMENT)."""
        known = set(cls.__dataclass_fields__) - {"bind_filters"}
        unknown = set(args) - known
        if unknown:
            raise _bad(f"unknown queue settings: {', '.join(sorted(unknown))}")
        a = dict(args)
        name = validate_name(a.get("name"))
        is_dlq = bool(a.get("is_dlq", False))
        pats, filters = parse_bind(a.get("bind", []), stored)
        sched = a.get("backoff_schedule") or ()
        if not isinstance(sched, (list, tuple)) or not all(_num(x) and 0 <= x <= MAX_BACKOFF for x in sched):
            raise _bad(f"backoff_schedule must be a list of numbers of seconds in [0, {MAX_BACKOFF}]")

        def num(key: str, default: float, lo: float, hi: float = float("inf"), optional: bool = False) -> Any:
            v = a.get(key, default)
            if v is None and optional:
                return None
            if not _num(v) or not lo <= v <= hi:
                raise _bad(f"{key} must be a number in [{lo}, {hi}]")
            return float(v)

        md = a.get("max_deliveries", DEFAULT_MAX_DELIVERIES if not is_dlq else 0)
        check_int(md, "max_deliveries (0 = unlimited)")
        ml = a.get("max_length")
        if ml is not None:
            check_int(ml, "max_length", 1)
        overflow = a.get("overflow", "reject")
        if overflow not in OVERFLOW_POLICIES:
            raise _bad(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        mp = a.get("max_priority", 0)
        check_int(mp, "max_priority (0 = a plain queue)", 0, MAX_QUEUE_PRIORITY)
        if mp and overflow == "dead_letter_oldest":
            raise _bad("a priority queue's max_length uses the reject policy (overflow dead_letter_oldest "
                       "would pick among priorities)")
        dl = a.get("dead_letter", None)
        if is_dlq:
            dl = None
        elif dl is None:
            dl = dlq_name(name)
        else:
            validate_name(dl, "dead-letter queue")
            if dl == name:
                raise _bad("a queue cannot be its own dead-letter queue")
        return cls(
            name=name, bind=pats,
            ack_deadline=num("ack_deadline", DEFAULT_ACK_DEADLINE, 0.01, 86400 * 7),
            max_deliveries=md,
            backoff_initial=num("backoff_initial", 1.0, 0.0, 86400),
            backoff_multiplier=num("backoff_multiplier", 2.0, 1.0, 100),
            backoff_max=num("backoff_max", 60.0, 0.0, MAX_BACKOFF),
            backoff_jitter=num("backoff_jitter", 0.1, 0.0, 1.0),
            backoff_schedule=tuple(float(x) for x in sched),
            dead_letter=dl,
            message_ttl=num("message_ttl", None, 0.001, 86400 * 365, optional=True),  # type: ignore[arg-type]
            dead_letter_expired=bool(a.get("dead_letter_expired", False)),
            max_length=ml, overflow=overflow, is_dlq=is_dlq, max_priority=mp, bind_filters=filters,
        )

    def backoff(self, deliveries: int, rng: random.Random | None = None) -> float:
        """Delay in seconds before the next attempt after ``deliveries`` failed ones."""
        n = max(deliveries, 1)
        if self.backoff_schedule:
            base = self.backoff_schedule[min(n, len(self.backoff_schedule)) - 1]
        else:
            base = min(self.backoff_max, self.backoff_initial * self.backoff_multiplier ** (n - 1))
        if self.backoff_jitter and base > 0:
            r = (rng or random).uniform(-self.backoff_jitter, self.backoff_jitter)
            base = max(0.0, base * (1 + r))
        return base


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Retention limits apply per partition; times are seconds."""

    name: str
    partitions: int = 1
    bind: tuple[str, ...] = ()
    max_age: float | None = None
    max_messages: int | None = None
    max_bytes: int | None = None
    max_deliveries: int = 5  # group deliveries of one offset before it goes to the DLQ (0 = unlimited)
    ack_deadline: float = 30.0
    backoff_initial: float = 0.5
    backoff_multiplier: float = 2.0
    backoff_max: float = 30.0
    dead_letter: str | None = None  # default dlq_name(name)
    bind_filters: tuple[tuple[str, str], ...] = ()  # as QueueConfig.bind_filters

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bind"] = bind_entries(self.bind, self.bind_filters)
        del d["bind_filters"]
        return d

    @classmethod
    def from_args(cls, args: dict[str, Any], *, stored: bool = False) -> StreamConfig:
        unknown = set(args) - (set(cls.__dataclass_fields__) - {"bind_filters"})
        if unknown:
            raise _bad(f"unknown stream settings: {', '.join(sorted(unknown))}")
        name = validate_name(args.get("name"), "stream")
        p = args.get("partitions", 1)
        if type(p) is not int or not 1 <= p <= MAX_PARTITIONS:
            raise _bad(f"partitions must be an integer in 1..{MAX_PARTITIONS}")
        pats, filters = parse_bind(args.get("bind", []), stored)

        def opt_num(key: str, lo: float, hi: float, integer: bool = False) -> Any:
            v = args.get(key)
            if v is None:
                return None
            if (integer and type(v) is not int) or not _num(v) or not lo <= v <= hi:
                raise _bad(f"{key} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], or nil")
            return v if integer else float(v)

        def num(key: str, default: float, lo: float, hi: float) -> float:
            v = args.get(key, default)
            if not _num(v) or not lo <= v <= hi:
                raise _bad(f"{key} must be a number in [{lo}, {hi}]")
            return float(v)

        md = args.get("max_deliveries", 5)
        N.check_int(md, "max_deliveries (0 = unlimited)")
        dl = args.get("dead_letter") or dlq_name(name)
        validate_name(dl, "dead-letter queue")
        return cls(
            name=name, partitions=p, bind=pats,
            max_age=opt_num("max_age", 0.001, N.MAX_DURATION_MS / 1000),
            max_messages=opt_num("max_messages", 1, N.MAX_INT, True),
            max_bytes=opt_num("max_bytes", 1, N.MAX_INT, True), max_deliveries=md,
            ack_deadline=num("ack_deadline", 30.0, 0.01, 86400.0),
            backoff_initial=num("backoff_initial", 0.5, 0.0, 3600.0),
            backoff_multiplier=num("backoff_multiplier", 2.0, 1.0, 100.0),
            backoff_max=num("backoff_max", 30.0, 0.0, 86400.0),
            dead_letter=dl, bind_filters=filters,
        )

    def backoff(self, attempts: int) -> float:
        return min(self.backoff_max, self.backoff_initial * self.backoff_multiplier ** max(attempts - 1, 0))


def dlq_name(name: str) -> str:
    """The default dead-letter queue of queue or stream ``name``."""
    return name + DLQ_SUFFIX


def dlq_config(name: str) -> QueueConfig:
    """The settings of a dead-letter queue created on demand."""
    return QueueConfig.from_args({"name": name, "is_dlq": True})


def _num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v


# --------------------------------------------------------- in-place updates

#: Queue settings an update (``queue.update``) refuses, with the reason it gives.
#: Every other setting changes in place (see :func:`updated`).
QUEUE_IMMUTABLE: Final[dict[str, str]] = {
    "bind": "bindings decide which publishes are stored and need subscribe rights on each pattern; "
            "declare another queue for other subjects",
    "dead_letter": "messages already dead-lettered stay in the old dead-letter queue; "
                   "declare another queue with the dead-letter queue it should have",
    "is_dlq": "a queue is created as a dead-letter queue or not",
    "max_priority": "stored messages are ordered by it (a plain queue keeps none); declare another queue",
}
#: Stream settings an update (``stream.update``) refuses, with the reason it gives.
STREAM_IMMUTABLE: Final[dict[str, str]] = {
    "partitions": "a key's partition is its hash modulo the partition count, so changing it would "
                  "break per-key order and the groups' committed offsets",
    "bind": "bindings decide which publishes are stored and need subscribe rights on each pattern; "
            "declare another stream for other subjects",
    "dead_letter": "messages already dead-lettered stay in the old dead-letter queue; "
                   "declare another stream with the dead-letter queue it should have",
}


def updated(old: Any, args: dict[str, Any], what: str = "queue") -> Any:
    """``old`` (a QueueConfig or StreamConfig) with the settings in ``args``
    changed, validated like a declare. A setting in QUEUE_IMMUTABLE /
    STREAM_IMMUTABLE given with a different value raises
    RemoteProtocolError(IMMUTABLE_SETTING) naming it and why; the same value is
    accepted (an update may repeat the whole declaration)."""
    immutable = QUEUE_IMMUTABLE if what == "queue" else STREAM_IMMUTABLE
    changes = {k: v for k, v in args.items() if k != "name"}
    new = type(old).from_args({**old.to_dict(), **changes, "name": old.name})
    for key, why in immutable.items():
        if key in changes and (getattr(new, key) != getattr(old, key)
                               or (key == "bind" and new.bind_filters != old.bind_filters)):
            raise RemoteProtocolError(f"{what} {old.name!r}: {key} cannot change in place: {why}",
                                      ErrorCode.IMMUTABLE_SETTING)
    return new
