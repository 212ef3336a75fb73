"""The tidings client library: ``from tidings.client import connect`` (also ``from tidings import connect``).

    async with connect("tidings://127.0.0.1:7421") as tc:
        sub = await tc.subscribe("orders.>")
        await tc.publish("orders.eu.created", b"{...}")
        async for msg in sub:
            ...

Importing this package imports neither the broker, aiosqlite nor uvloop.
"""

from __future__ import annotations

from tidings.client.app import App
from tidings.client.client import DEFAULT_URL, Client, connect
from tidings.client.errors import (
    ConnectError,
    ConnectionClosedError,
    NoRespondersError,
    NoRouteError,
    TidingsError,
    TimeoutError,
    for_code,
)
from tidings.client.message import Message
from tidings.client.subscription import Subscription
from tidings.client.worker import Reject, Worker

__all__ = [
    "DEFAULT_URL", "Client", "connect", "Message", "Subscription", "TidingsError", "ConnectError",
    "ConnectionClosedError", "NoRespondersError", "NoRouteError", "TimeoutError", "for_code", "Worker",
    "App", "Reject",
]
