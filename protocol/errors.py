"""Error codes and protocol exceptions shared by broker and client.

Every error that crosses the wire carries a stable numeric code from
:data:`REGISTRY`. Codes never change meaning; new ones are only appended.
``retriable`` tells a client whether the same operation may succeed if
simply tried again later (after a reconnect, a back-off, or more space).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final


class ErrorCode(IntEnum):
    """Stable wire error codes. See docs/PROTOCOL.md for the table."""

    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    BAD_STATE = 4
    HELLO_TIMEOUT = 5
    INVALID_SUBJECT = 6
    INVALID_ARGUMENT = 7
    UNKNOWN_OPERATION = 8
    FRAME_TIMEOUT = 9
    AUTH_FAILED = 10
    PERMISSION_DENIED = 11
    TOO_MANY_CONNECTIONS = 12
    LIMIT_EXCEEDED = 13
    REPLY_TOO_LARGE = 14
    NO_RESPONDERS = 20
    TIMEOUT = 21
    NO_ROUTE = 22
    NOT_FOUND = 30
    CONFLICT = 31
    STALE_DELIVERY = 32
    QUEUE_FULL = 33
    STORAGE_FULL = 34
    STORAGE_ERROR = 35
    STALE_GENERATION = 36
    OFFSET_OUT_OF_RANGE = 37
    DUPLICATE = 38
    IMMUTABLE_SETTING = 39
    SLOW_CONSUMER = 40
    SHUTTING_DOWN = 41
    OVERLOADED = 42
    INTERNAL = 43
    SCHEMA_VIOLATION = 50
    SCHEMA_INCOMPATIBLE = 51
    SCHEMA_INVALID = 52


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: ErrorCode
    retriable: bool
    description: str


def _info(code: ErrorCode, retriable: bool, description: str) -> tuple[int, ErrorInfo]:
    return int(code), ErrorInfo(code, retriable, description)


REGISTRY: Final[dict[int, ErrorInfo]] = dict(
    [
        _info(ErrorCode.PROTOCOL_ERROR, False, "A frame could not be decoded or had the wrong shape."),
        _info(ErrorCode.FRAME_TOO_LARGE, False, "A frame's length prefix exceeded the limit in force."),
        _info(ErrorCode.UNSUPPORTED_VERSION, False, "The peer speaks a protocol version this side does not."),
        _info(ErrorCode.BAD_STATE, False, "The frame is not allowed in the connection's current state (e.g. before HELLO)."),
        _info(ErrorCode.HELLO_TIMEOUT, True, "No HELLO arrived within the server's HELLO timeout."),
        _info(ErrorCode.INVALID_SUBJECT, False, "A subject or subscription pattern broke the subject rules."),
        _info(ErrorCode.INVALID_ARGUMENT, False, "An argument had the wrong type or an out-of-range value."),
        _info(ErrorCode.UNKNOWN_OPERATION, False, "The operation code or admin call name is not known."),
        _info(ErrorCode.FRAME_TIMEOUT, True, "A partial frame was not completed within the frame timeout."),
        _info(ErrorCode.AUTH_FAILED, False, "Authentication failed (unknown user and wrong secret look the same)."),
        _info(ErrorCode.PERMISSION_DENIED, False, "The authenticated user may not perform this operation."),
        _info(ErrorCode.TOO_MANY_CONNECTIONS, True, "A connection limit (global or per user) is reached."),
        _info(ErrorCode.LIMIT_EXCEEDED, False, "A cap on subscriptions or consumers (per connection or per user) or on consumer groups (per stream) is reached."),
        _info(ErrorCode.REPLY_TOO_LARGE, False, "The answer would exceed the max_frame this client announced; ask for less or announce a larger max_frame."),
        _info(ErrorCode.NO_RESPONDERS, True, "A request was published and no subscriber matched its subject."),
        _info(ErrorCode.TIMEOUT, True, "The operation did not complete within its deadline."),
        _info(ErrorCode.NO_ROUTE, False, "A publish that asked for a confirm reached no queue, stream or subscriber: nothing has it."),
        _info(ErrorCode.NOT_FOUND, False, "The named queue, stream, consumer or subscription does not exist."),
        _info(ErrorCode.CONFLICT, False, "The object exists with different settings; re-declaring does not change it."),
        _info(ErrorCode.STALE_DELIVERY, False, "The delivery id is no longer held by this consumer (deadline passed or already settled)."),
        _info(ErrorCode.QUEUE_FULL, True, "The queue is at its max length and its overflow policy rejects new messages."),
        _info(ErrorCode.STORAGE_FULL, True, "Free disk space is below the low-water mark or the store is full; nothing was stored."),
        _info(ErrorCode.STORAGE_ERROR, True, "The store failed to commit; nothing was confirmed."),
        _info(ErrorCode.STALE_GENERATION, False, "The consumer-group member no longer owns the partition (rebalanced)."),
        _info(ErrorCode.OFFSET_OUT_OF_RANGE, False, "The requested offset is outside what the partition retains."),
        _info(ErrorCode.DUPLICATE, False, "An object with this identity already exists."),
        _info(ErrorCode.IMMUTABLE_SETTING, False, "An update named a setting that cannot change in place (the message names it and why)."),
        _info(ErrorCode.SLOW_CONSUMER, True, "The subscriber fell behind its outbound buffer; messages were dropped or it was cut off."),
        _info(ErrorCode.SHUTTING_DOWN, True, "The server is shutting down; reconnect and retry."),
        _info(ErrorCode.OVERLOADED, True, "The server is above a resource limit; retry later."),
        _info(ErrorCode.INTERNAL, True, "An unexpected server-side failure; it was logged."),
        _info(ErrorCode.SCHEMA_VIOLATION, False, "The payload does not match the schema bound to its subject (or its content type or schema version cannot be used); the message says where and which rule. Nothing was delivered or stored."),
        _info(ErrorCode.SCHEMA_INCOMPATIBLE, False, "The new schema version breaks the schema's compatibility mode; the message names each field and rule."),
        _info(ErrorCode.SCHEMA_INVALID, False, "The schema document is not a valid JSON Schema draft 2020-12 document."),
    ]
)


def describe(code: int) -> ErrorInfo:
    """Return the registry entry for ``code``; unknown codes map to INTERNAL."""
    return REGISTRY.get(code, REGISTRY[ErrorCode.INTERNAL])


class ProtocolError(Exception):
    """Base of every protocol-level failure.

    ``code`` is the wire error code to report, ``fatal`` tells whether the
    byte stream can still be trusted (False: answer with ERR and go on;
    True: answer with ERR if possible, then close), and ``rid`` is the
    request id of the offending frame when it could be read (else 0).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
                 *, fatal: bool = False, rid: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.fatal = fatal
        self.rid = rid


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad bytes, bad shapes, bad order."""


class LocalProtocolError(ProtocolError):
    """This side tried to break the protocol (a bug in the caller)."""
