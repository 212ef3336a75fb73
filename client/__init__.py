"""tidings: a message broker (pub/sub, durable queues, ordered streams,
dead-letter queues) and its async client.

    from tidings import connect

    async with connect("tidings://127.0.0.1:7421") as tc:
        await tc.publish("orders.eu.created", b"{...}")

The distribution installs this one import package:

- ``tidings.client``: the async client library (re-exported here, with
  ``App`` for handlers run by ``tidings run``);
- ``tidings.sync``: the blocking client, for code without an event loop;
- ``tidings.protocol``: the wire protocol both sides share;
- ``tidings.broker``: the daemon (``tidings serve``, ``python -m tidings.broker``);
- ``tidings.cli``: the ``tidings`` command.

In the repository these are the folders ``client/client``, ``protocol``,
``broker`` and ``client/cli``; ``client/`` itself is this package (see
pyproject.toml's package-dir). Importing ``tidings`` imports nothing else;
``from tidings import connect`` imports the client library, which imports
neither the broker, aiosqlite nor uvloop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.client import (
        DEFAULT_URL,
        App,
        Client,
        ConnectError,
        ConnectionClosedError,
        Message,
        NoRespondersError,
        NoRouteError,
        Reject,
        Subscription,
        TidingsError,
        TimeoutError,
        Worker,
        connect,
        for_code,
    )

__all__ = [
    "DEFAULT_URL", "Client", "connect", "Message", "Subscription", "TidingsError", "ConnectError",
    "ConnectionClosedError", "NoRespondersError", "NoRouteError", "TimeoutError", "for_code", "Worker",
    "App", "Reject",
]


def __getattr__(name: str) -> Any:
    """The client's names, imported on first use: the daemon (``tidings.broker``) and
    the protocol live under this package too and must not load the client library."""
    if name in __all__:
        from tidings import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tidings' has no attribute {name!r}")
