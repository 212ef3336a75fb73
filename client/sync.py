"""``tidings.sync``: the blocking client, for code without an event loop.

    import tidings.sync

    with tidings.sync.connect("tidings://127.0.0.1:7421") as tc:
        tc.publish("orders.eu.created", b"{...}")

See :mod:`tidings.client.sync` (the implementation lives with the client
library, which it wraps).
"""

from __future__ import annotations

from tidings.client.sync import SyncClient, SyncConsumer, SyncDelivery, SyncSubscription, connect

__all__ = ["connect", "SyncClient", "SyncSubscription", "SyncConsumer", "SyncDelivery"]
