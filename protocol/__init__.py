"""tidings wire protocol: sans-IO frames, codec, connection state machine,
error registry and subject rules. Imports nothing asynchronous."""

from __future__ import annotations

from tidings.protocol.connection import CLOSED, NEED_DATA, Connection, Role, State
from tidings.protocol.errors import REGISTRY, ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, describe
from tidings.protocol.frames import PROTOCOL_VERSION, Op

__all__ = [
    "CLOSED", "NEED_DATA", "Connection", "Role", "State", "REGISTRY", "ErrorCode",
    "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "describe",
    "PROTOCOL_VERSION", "Op",
]
