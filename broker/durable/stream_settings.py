"""A stream's settings: partitions, bindings, retention, poison-message policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from tidings.protocol import numbers as N
from tidings.protocol.errors import ErrorCode, RemoteProtocolError
from tidings.protocol.subjects import validate_pattern

from tidings.broker.durable.queue_settings import DLQ_SUFFIX, validate_name

MAX_PARTITIONS: Final = N.MAX_PARTITIONS  # one actor state and one committed offset per partition and group
DEFAULT_WINDOW: Final = 100  # in-flight deliveries per partition in a consumer group


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, ErrorCode.INVALID_ARGUMENT)


def _num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v


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
    dead_letter: str | None = None  # default "<name>.dlq"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bind"] = list(self.bind)
        return d

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> StreamConfig:
        unknown = set(args) - set(cls.__dataclass_fields__)
        if unknown:
            raise _bad(f"unknown stream settings: {', '.join(sorted(unknown))}")
        name = validate_name(args.get("name"), "stream")
        p = args.get("partitions", 1)
        if type(p) is not int or not 1 <= p <= MAX_PARTITIONS:
            raise _bad(f"partitions must be an integer in 1..{MAX_PARTITIONS}")
        bind = args.get("bind", [])
        if not isinstance(bind, (list, tuple)):
            raise _bad("bind must be a list of subject patterns")
        try:
            pats = tuple(dict.fromkeys(validate_pattern(x) for x in bind))
        except RemoteProtocolError as exc:
            raise _bad(exc.message) from None

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
        dl = args.get("dead_letter") or name + DLQ_SUFFIX
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
            dead_letter=dl,
        )

    def backoff(self, attempts: int) -> float:
        return min(self.backoff_max, self.backoff_initial * self.backoff_multiplier ** max(attempts - 1, 0))
