"""Frame types: one frozen, slotted dataclass per operation.

On the wire every frame is a msgpack array whose first element is the
operation code (:class:`Op`); the remaining elements are positional and
documented in docs/PROTOCOL.md. Batches (``Pub.messages``, ``Msg.messages``,
``Deliver.items``, ``Ack.items``, ``Confirm.items``) stay as plain lists of
plain lists so that one C-level ``unpackb`` call produces them and nothing
is re-wrapped per message; the index constants below name their positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Final, Union

PROTOCOL_VERSION: Final = 1
#: HELLO option: the client reads a CONFIRM result that is a bare message id (a message
#: stored in one queue and no stream, docs/PROTOCOL.md 7.8). Without it the broker sends
#: the map {"id", "queues"} that every older client reads.
HELLO_CONFIRM_IDS: Final = "confirm_ids"


class Op(IntEnum):
    # both directions
    PING = 2
    PONG = 3
    # client -> server
    HELLO = 1
    PUB = 10
    SUB = 11
    UNSUB = 12
    CALL = 13
    CONSUME = 14
    STOP = 15
    ACK = 16
    # server -> client
    WELCOME = 64
    OK = 65
    ERR = 66
    MSG = 67
    CONFIRM = 68
    DELIVER = 69
    NOTICE = 70


# Positions inside one PUB message: [subject, payload, headers, reply, seq, opts]
P_SUBJECT, P_PAYLOAD, P_HEADERS, P_REPLY, P_SEQ, P_OPTS = range(6)
PUB_FIELDS: Final = 6
# Positions inside one MSG message: [subject, payload, headers, reply]
M_SUBJECT, M_PAYLOAD, M_HEADERS, M_REPLY = range(4)
MSG_FIELDS: Final = 4
# Positions inside one DELIVER item:
# [delivery_id, subject, payload, headers, delivery_count, timestamp_ms, meta]
D_ID, D_SUBJECT, D_PAYLOAD, D_HEADERS, D_COUNT, D_TIMESTAMP, D_META = range(7)
DELIVER_FIELDS: Final = 7
# Positions inside the meta of a stream DELIVER item: [partition, offset, key, generation]
# (a queue's meta is a map: {"id": message id, "msg_id": publisher's id}).
SM_PARTITION, SM_OFFSET, SM_KEY, SM_GENERATION = range(4)
# Positions inside one ACK item: [delivery_id, action, arg]
A_ID, A_ACTION, A_ARG = range(3)
ACK_FIELDS: Final = 3
# Positions inside one CONFIRM item: [seq, code, result]
C_SEQ, C_CODE, C_RESULT = range(3)
CONFIRM_FIELDS: Final = 3


# The keys of a NACK's map argument: "delay" (ms, or nil for the back-off schedule) and
# "error" (why the handler failed: kept as the message's last error, in tidings-last-error).
NACK_KEYS: Final = frozenset({"delay", "error"})
# Characters of a NACK's error (or a REJECT's reason) worth sending: a dead-lettered message's
# tidings-last-error keeps at most this much (broker/durable/deadletter.py MAX_LAST_ERROR).
MAX_ERROR_TEXT: Final = 1000


def nack_parts(arg: Any) -> tuple[int | None, str | None]:
    """A NACK's checked argument -> (delay in ms or None, error text or None)."""
    if type(arg) is dict:
        error = arg.get("error")
        return arg.get("delay"), error[:MAX_ERROR_TEXT] if error else None
    return arg, None


class AckAction(IntEnum):
    ACK = 0
    NACK = 1  # arg: delay in ms, nil for the queue's backoff schedule, or {"delay"?: ms, "error"?: str}
    REJECT = 2  # arg: reason string or nil; straight to the dead-letter queue
    IN_PROGRESS = 3  # arg: nil; extends the ack deadline


# Keys of the optional per-message options map of a PUB message.
OPT_MSG_ID: Final = "id"  # str: publisher-supplied id for de-duplication
OPT_KEY: Final = "key"  # str: partition key for streams
OPT_DELAY: Final = "delay"  # int ms: deliver no earlier than now + delay
OPT_AT: Final = "at"  # int ms since the epoch: deliver no earlier than this
OPT_TTL: Final = "ttl"  # int ms: expire if not delivered in time
OPT_NEW: Final = "new"  # int 1: the publisher vouches this msg_id was never sent before (skip the look-up)
OPT_PRIORITY: Final = "prio"  # int 0..MAX_PRIORITY: order in a priority queue (higher first); ignored elsewhere
PUB_OPTIONS: Final = frozenset({OPT_MSG_ID, OPT_KEY, OPT_DELAY, OPT_AT, OPT_TTL, OPT_NEW, OPT_PRIORITY})

# CALL methods of the schema registry (docs/PROTOCOL.md §15: their args and results).
CALL_SCHEMA_REGISTER: Final = "schema.register"  # {name, schema, compatibility?} -> {name, version, created}
CALL_SCHEMA_CHECK: Final = "schema.check"  # {name, schema, compatibility?} -> {compatible, reasons, version, ...}
CALL_SCHEMA_GET: Final = "schema.get"  # {name, version?} -> {name, version, schema, compatibility, ...}
CALL_SCHEMA_LIST: Final = "schema.list"  # {} -> [{name, latest, compatibility, bindings, counts}]
CALL_SCHEMA_BIND: Final = "schema.bind"  # {pattern, name, on_invalid?, dead_letter?} -> the binding
CALL_SCHEMA_UNBIND: Final = "schema.unbind"  # {pattern} -> the removed binding
CALL_SCHEMA_BINDINGS: Final = "schema.bindings"  # {} -> [binding]

Headers = dict[str, Union[str, int, bytes]]


@dataclass(frozen=True, slots=True)
class Hello:
    OP: ClassVar[Op] = Op.HELLO
    version: int
    client_name: str
    auth: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [Op.HELLO, self.version, self.client_name, self.auth, self.options]


@dataclass(frozen=True, slots=True)
class Welcome:
    OP: ClassVar[Op] = Op.WELCOME
    version: int
    server_name: str
    info: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Op.WELCOME, self.version, self.server_name, self.info]


@dataclass(frozen=True, slots=True)
class Ping:
    OP: ClassVar[Op] = Op.PING
    rid: int

    def to_wire(self) -> list[Any]:
        return [Op.PING, self.rid]


@dataclass(frozen=True, slots=True)
class Pong:
    OP: ClassVar[Op] = Op.PONG
    rid: int

    def to_wire(self) -> list[Any]:
        return [Op.PONG, self.rid]


@dataclass(frozen=True, slots=True)
class Pub:
    """A batch of publishes. Each message is
    ``[subject, payload, headers|nil, reply|nil, seq, opts|nil]``; ``seq`` > 0
    asks for a CONFIRM carrying that seq, 0 asks for none."""

    OP: ClassVar[Op] = Op.PUB
    messages: list[list[Any]]

    def to_wire(self) -> list[Any]:
        return [Op.PUB, self.messages]


@dataclass(frozen=True, slots=True)
class Sub:
    """Subscribe ``sid`` to ``pattern`` (in queue group ``group``). ``filter``, an
    optional sixth element, is a content filter (protocol/filters.py): only
    messages it matches are delivered."""

    OP: ClassVar[Op] = Op.SUB
    rid: int
    sid: int
    pattern: str
    group: str | None = None
    filter: dict[str, Any] | None = None

    def to_wire(self) -> list[Any]:
        if self.filter is None:
            return [Op.SUB, self.rid, self.sid, self.pattern, self.group]
        return [Op.SUB, self.rid, self.sid, self.pattern, self.group, self.filter]


@dataclass(frozen=True, slots=True)
class Unsub:
    OP: ClassVar[Op] = Op.UNSUB
    rid: int
    sid: int

    def to_wire(self) -> list[Any]:
        return [Op.UNSUB, self.rid, self.sid]


@dataclass(frozen=True, slots=True)
class Call:
    """A named request (declare, list, purge, redrive, stats, ...)."""

    OP: ClassVar[Op] = Op.CALL
    rid: int
    method: str
    args: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Op.CALL, self.rid, self.method, self.args]


@dataclass(frozen=True, slots=True)
class Consume:
    """Start a consumer ``cid`` on a queue or stream described by ``args``."""

    OP: ClassVar[Op] = Op.CONSUME
    rid: int
    cid: int
    args: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Op.CONSUME, self.rid, self.cid, self.args]


@dataclass(frozen=True, slots=True)
class Stop:
    OP: ClassVar[Op] = Op.STOP
    rid: int
    cid: int

    def to_wire(self) -> list[Any]:
        return [Op.STOP, self.rid, self.cid]


@dataclass(frozen=True, slots=True)
class Ack:
    """Settle deliveries of consumer ``cid``: items are
    ``[delivery_id, action, arg]``. ``rid`` 0 asks for no reply; otherwise
    the server answers OK with one error code per item (0 = done)."""

    OP: ClassVar[Op] = Op.ACK
    rid: int
    cid: int
    items: list[list[Any]]

    def to_wire(self) -> list[Any]:
        return [Op.ACK, self.rid, self.cid, self.items]


@dataclass(frozen=True, slots=True)
class Ok:
    OP: ClassVar[Op] = Op.OK
    rid: int
    result: Any = None

    def to_wire(self) -> list[Any]:
        return [Op.OK, self.rid, self.result]


@dataclass(frozen=True, slots=True)
class Err:
    """An error answer. ``rid`` 0 means the error concerns the connection
    (or a frame with no request id)."""

    OP: ClassVar[Op] = Op.ERR
    rid: int
    code: int
    message: str

    def to_wire(self) -> list[Any]:
        return [Op.ERR, self.rid, self.code, self.message]


@dataclass(frozen=True, slots=True)
class Msg:
    """Pub/sub messages for subscription ``sid``: ``[subject, payload, headers|nil, reply|nil]``."""

    OP: ClassVar[Op] = Op.MSG
    sid: int
    messages: list[Any]

    def to_wire(self) -> list[Any]:
        return [Op.MSG, self.sid, self.messages]


@dataclass(frozen=True, slots=True)
class Confirm:
    """Outcomes of publishes that asked for one: ``[seq, code, result]``."""

    OP: ClassVar[Op] = Op.CONFIRM
    items: list[Any]

    def to_wire(self) -> list[Any]:
        return [Op.CONFIRM, self.items]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Durable deliveries for consumer ``cid``; see the D_* positions."""

    OP: ClassVar[Op] = Op.DELIVER
    cid: int
    items: list[Any]

    def to_wire(self) -> list[Any]:
        return [Op.DELIVER, self.cid, self.items]


@dataclass(frozen=True, slots=True)
class Notice:
    """An unsolicited server event: ``kind`` names it, ``info`` details it."""

    OP: ClassVar[Op] = Op.NOTICE
    kind: str
    info: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [Op.NOTICE, self.kind, self.info]


Frame = Union[Hello, Welcome, Ping, Pong, Pub, Sub, Unsub, Call, Consume, Stop, Ack,
              Ok, Err, Msg, Confirm, Deliver, Notice]

CLIENT_OPS: Final = frozenset({Op.HELLO, Op.PING, Op.PONG, Op.PUB, Op.SUB, Op.UNSUB,
                               Op.CALL, Op.CONSUME, Op.STOP, Op.ACK})
SERVER_OPS: Final = frozenset({Op.WELCOME, Op.PING, Op.PONG, Op.OK, Op.ERR, Op.MSG,
                               Op.CONFIRM, Op.DELIVER, Op.NOTICE})
