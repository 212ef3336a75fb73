"""The client's exception tree. Every class says whether retrying may help.

Server error codes (see protocol.errors.ErrorCode and docs/PROTOCOL.md)
map to classes through one table, :data:`BY_CODE`, via :func:`for_code`.
"""

from __future__ import annotations

import builtins
import json

from tidings.protocol.errors import ErrorCode, describe


class TidingsError(Exception):
    """Root of every error the client raises. ``retriable``: may the same
    operation succeed if tried again later? ``code``: the wire code, if any."""

    retriable: bool = False
    code: int = 0

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        if code is not None:
            self.code = code


class ConnectionClosedError(TidingsError):
    """The connection to the broker is closed or was lost."""
    retriable = True


class ConnectError(ConnectionClosedError):
    """Could not connect to the broker (refused, unreachable, or no answer to HELLO in time)."""


class NotABrokerError(ConnectError):
    """Something answered at the address, but not with the tidings protocol (another
    server: NATS, Redis, HTTP...); the message quotes the first bytes it sent."""
    retriable = False


class TimeoutError(TidingsError, builtins.TimeoutError):
    """The operation did not complete within its timeout."""
    retriable = True
    code = int(ErrorCode.TIMEOUT)


class ProtocolViolationError(TidingsError):
    """The broker sent something the protocol does not allow; the connection was closed."""
    code = int(ErrorCode.PROTOCOL_ERROR)


class ServerError(TidingsError):
    """The broker answered with an error code this client has no finer class for."""


class NoRespondersError(ServerError):
    """A request was published and no subscriber matched its subject."""
    retriable = True
    code = int(ErrorCode.NO_RESPONDERS)


class NoRouteError(ServerError):
    """A publish that asked for a confirm reached no queue, stream or subscriber:
    nothing has the message (a mistyped subject, or a queue not declared yet)."""
    code = int(ErrorCode.NO_ROUTE)


class InvalidSubjectError(ServerError, ValueError):
    """A subject or pattern broke the subject rules."""
    code = int(ErrorCode.INVALID_SUBJECT)


class InvalidArgumentError(ServerError, ValueError):
    """An argument had the wrong type or value."""
    code = int(ErrorCode.INVALID_ARGUMENT)


class AuthenticationError(ServerError):
    """The broker refused the credentials."""
    code = int(ErrorCode.AUTH_FAILED)


class PermissionDeniedError(ServerError):
    """The user may not do this."""
    code = int(ErrorCode.PERMISSION_DENIED)


class NotFoundError(ServerError):
    """No such queue, stream, consumer or subscription."""
    code = int(ErrorCode.NOT_FOUND)


class ConflictError(ServerError):
    """The object exists with different settings."""
    code = int(ErrorCode.CONFLICT)


class ImmutableSettingError(ConflictError):
    """An update named a setting that cannot change in place; the message names it and why."""
    code = int(ErrorCode.IMMUTABLE_SETTING)


class StaleDeliveryError(ServerError):
    """This delivery is no longer held by this consumer (deadline passed or already settled)."""
    code = int(ErrorCode.STALE_DELIVERY)


class StaleGenerationError(ServerError):
    """The group member no longer owns the partition."""
    code = int(ErrorCode.STALE_GENERATION)


class OffsetOutOfRangeError(ServerError):
    """The offset is outside what the partition retains."""
    code = int(ErrorCode.OFFSET_OUT_OF_RANGE)


class QueueFullError(ServerError):
    """The queue is full and rejects new messages."""
    retriable = True
    code = int(ErrorCode.QUEUE_FULL)


class StorageFullError(ServerError):
    """The broker's disk is (nearly) full; nothing was stored."""
    retriable = True
    code = int(ErrorCode.STORAGE_FULL)


class StorageError(ServerError):
    """The broker failed to commit; nothing was confirmed."""
    retriable = True
    code = int(ErrorCode.STORAGE_ERROR)


class SlowConsumerError(ServerError):
    """This client fell behind and messages were dropped or it was cut off."""
    retriable = True
    code = int(ErrorCode.SLOW_CONSUMER)


class TooManyConnectionsError(ServerError):
    """The broker is at a connection limit."""
    retriable = True
    code = int(ErrorCode.TOO_MANY_CONNECTIONS)


class LimitExceededError(ServerError):
    """A cap on subscriptions or consumers (per connection or per user) or on a stream's consumer groups is reached."""
    code = int(ErrorCode.LIMIT_EXCEEDED)


class ReplyTooLargeError(ServerError):
    """The broker's answer would exceed this client's max_frame; ask for less."""
    code = int(ErrorCode.REPLY_TOO_LARGE)


class ServerShuttingDownError(ServerError):
    """The broker is shutting down."""
    retriable = True
    code = int(ErrorCode.SHUTTING_DOWN)


class OverloadedError(ServerError):
    """The broker is above a resource limit."""
    retriable = True
    code = int(ErrorCode.OVERLOADED)


class SchemaViolationError(ServerError, ValueError):
    """The payload does not match the schema bound to its subject (or its content
    type or named schema version cannot be used); nothing was delivered or stored.
    ``pointer`` is the JSON Pointer of the first violation in the payload ("" for
    the whole payload), ``rule`` the rule it broke (a JSON Schema keyword such as
    ``type`` or ``required``, or ``content-type``, ``decode``, ``schema-version``)."""
    code = int(ErrorCode.SCHEMA_VIOLATION)

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.rule, self.pointer = parse_violation(message)


class SchemaIncompatibleError(ServerError, ValueError):
    """A new schema version breaks its schema's compatibility mode; the message
    names each field and rule."""
    code = int(ErrorCode.SCHEMA_INCOMPATIBLE)


class SchemaInvalidError(ServerError, ValueError):
    """The schema document is not a valid JSON Schema draft 2020-12 document."""
    code = int(ErrorCode.SCHEMA_INVALID)


def parse_violation(message: str) -> tuple[str, str]:
    """(rule, pointer) from a SCHEMA_VIOLATION message ``RULE at "POINTER": ...``;
    ("", "") when it has another shape."""
    rule, sep, rest = message.partition(" at ")
    if not sep or " " in rule or not rest.startswith('"'):
        return "", ""
    try:
        pointer, _end = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return "", ""
    return (rule, pointer) if isinstance(pointer, str) else ("", "")


class PublishBufferFullError(TidingsError):
    """Too many unconfirmed publishes are buffered (e.g. during an outage)."""
    retriable = True


BY_CODE: dict[int, type[ServerError]] = {
    cls.code: cls for cls in (
        NoRespondersError, NoRouteError, InvalidSubjectError, InvalidArgumentError, AuthenticationError,
        PermissionDeniedError, NotFoundError, ConflictError, StaleDeliveryError, StaleGenerationError,
        OffsetOutOfRangeError, QueueFullError, StorageFullError, StorageError, SlowConsumerError,
        TooManyConnectionsError, ServerShuttingDownError, OverloadedError, LimitExceededError,
        ReplyTooLargeError, SchemaViolationError, SchemaIncompatibleError, SchemaInvalidError,
        ImmutableSettingError,
    )
}


def for_code(code: int, message: str) -> TidingsError:
    """Return the exception instance for a wire error code."""
    cls = BY_CODE.get(code)
    if cls is not None:
        return cls(message, code=code)
    if code == ErrorCode.TIMEOUT:
        return TimeoutError(message)
    if code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE, ErrorCode.BAD_STATE,
                ErrorCode.UNKNOWN_OPERATION, ErrorCode.UNSUPPORTED_VERSION):
        err: TidingsError = ProtocolViolationError(message, code=code)
        return err
    err = ServerError(message, code=code)
    err.retriable = describe(code).retriable
    return err
