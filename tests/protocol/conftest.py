"""Shared helpers for the sans-IO protocol tests: a client and a server
Connection paired over a fake link, and raw frame building."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from tidings.protocol import Connection, Role
from tidings.protocol import frames as F
from tidings.protocol.codec import HEADER


def raw_frame(value: Any) -> bytes:
    """Length-prefix one msgpack value, bypassing every check of Connection.send."""
    body = msgpack.packb(value, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def open_pair(*, client_max_frame: int | None = None,
              server_max_frame: int | None = None,
              server_max_payload: int | None = None) -> tuple[Connection, Connection]:
    """Return (client, server), both OPEN after a real HELLO/WELCOME exchange."""
    c = Connection(Role.CLIENT) if client_max_frame is None else Connection(Role.CLIENT, max_frame=client_max_frame)
    kw: dict[str, int] = {}
    if server_max_frame is not None:
        kw["max_frame"] = server_max_frame
    if server_max_payload is not None:
        kw["max_payload"] = server_max_payload
    s = Connection(Role.SERVER, **kw)
    s.receive_data(c.send(F.Hello(1, "test-client", None, {})))
    assert isinstance(s.next_event(), F.Hello)
    c.receive_data(s.send(F.Welcome(1, "test-server", {})))
    assert isinstance(c.next_event(), F.Welcome)
    return c, s


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    return open_pair()


@pytest.fixture
def make_pair() -> Callable[..., tuple[Connection, Connection]]:
    return open_pair


@pytest.fixture
def wire() -> Callable[[Any], bytes]:
    return raw_frame
