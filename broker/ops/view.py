"""What the operations endpoints read of the broker: a narrow, read-only view.

/metrics, /healthz and /readyz (ops/metrics.py) read counters and flags of
the running broker at scrape time. They get a ``BrokerView``, not the
Broker: ops/ never imports the composition root (broker/app.py), which
satisfies the view structurally. Types only: no cost at run time.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import anyio

    from tidings.broker.config import Config
    from tidings.broker.durable.core import Durable
    from tidings.broker.ops.limits import ResourceMonitor
    from tidings.broker.ops.stats import Stats
    from tidings.broker.router import Router
    from tidings.broker.schemas.registry import SchemaRegistry


class BrokerView(Protocol):
    """The running broker's state as the metrics and health endpoints read it."""

    @property
    def config(self) -> Config: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def durable(self) -> Durable:
        """Queues, streams and the store: depths, counters, whether storage is open."""
        ...

    @property
    def monitor(self) -> ResourceMonitor: ...

    @property
    def connections(self) -> Sized:
        """The open connections (only counted)."""
        ...

    @property
    def router(self) -> Router[Any]:
        """Pub/sub subscriptions (only counted)."""
        ...

    @property
    def subscription_count(self) -> int:
        """Live pub/sub subscriptions, those with a content filter included."""
        ...

    @property
    def ready(self) -> anyio.Event:
        """Set once the broker has recovered its state and listens."""
        ...

    @property
    def schemas(self) -> SchemaRegistry:
        """The schema registry: valid/invalid publishes per schema."""
        ...

    @property
    def bound_address(self) -> tuple[str, int] | None: ...

    @property
    def shutting_down(self) -> bool: ...
