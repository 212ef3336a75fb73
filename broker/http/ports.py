"""What the HTTP port reads and asks of the broker: ``HttpHost``.

broker/http/ never imports the composition root (broker/app.py): ``app.Broker``
satisfies this port structurally. Types only: no cost at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Protocol

from tidings.broker.ops.view import BrokerView

if TYPE_CHECKING:
    from tidings.broker.net.publish import Filtering
    from tidings.broker.schemas.registry import SchemaRegistry
    from tidings.broker.security.audit import AuditLog
    from tidings.broker.security.auth import User, Users


class ConsoleConnection(Protocol):
    """One client connection as the console lists it (net/connection.py ConnectionActor)."""

    # Read-only here (properties), so the actor's plain attributes and dicts satisfy them.
    @property
    def number(self) -> int: ...

    @property
    def name(self) -> str:
        """The client name its HELLO gave."""
        ...

    @property
    def peer(self) -> str:
        """"host:port"."""
        ...

    @property
    def user(self) -> User: ...

    @property
    def admitted(self) -> bool:
        """Past HELLO."""
        ...

    @property
    def subs(self) -> Mapping[int, Any]:
        """sid -> subscription (``.pattern``, ``.group``)."""
        ...

    @property
    def consumers(self) -> Mapping[int, Any]:
        """cid -> queue consumer, group member or stream reader."""
        ...

    @property
    def msgs_in(self) -> int: ...

    @property
    def msgs_out(self) -> int:
        """Pub/sub messages sent."""
        ...

    @property
    def opened(self) -> float:
        """Wall time it connected."""
        ...

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the client and not yet written."""
        ...


class HttpHost(BrokerView, Protocol):
    """The broker as the HTTP port sees it: the ops view (metrics, readiness), the
    users HTTP requests log in as, the audit log, the publish path of the gateway, and the
    open connections and schema registry the console lists."""

    @property
    def connections(self) -> Mapping[int, ConsoleConnection]:
        """The open connections by number (the console lists them)."""
        ...

    @property
    def users(self) -> Users | None:
        """The configured users; None in no-users mode (no login on the HTTP port)."""
        ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def schemas(self) -> SchemaRegistry:
        """Schema bindings: while ``schemas.active``, a gateway publish passes ``screen`` first;
        the console lists ``schemas.schemas`` and ``schemas.bindings`` (read only)."""
        ...

    @property
    def filtering(self) -> Filtering:
        """Content filters of subscriptions and bindings: while ``filtering.active`` a publish
        is routed by ``route_filtered``."""
        ...

    @property
    def durable_match(self) -> Callable[[str], Any] | None:
        """The durable targets (queues, streams) bound to a subject; None when there are none."""
        ...

    async def publish_durable(self, conn: Any, batch: list[Any]) -> None:
        """Store durable publishes (message, targets) and confirm them to ``conn``."""
        ...
