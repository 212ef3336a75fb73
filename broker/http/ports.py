"""What the HTTP port reads and asks of the broker: ``HttpHost``.

broker/http/ never imports the composition root (broker/app.py): ``app.Broker``
satisfies this port structurally. Types only: no cost at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from tidings.broker.ops.view import BrokerView

if TYPE_CHECKING:
    from tidings.broker.schemas.registry import SchemaRegistry
    from tidings.broker.security.audit import AuditLog
    from tidings.broker.security.auth import Users


class HttpHost(BrokerView, Protocol):
    """The broker as the HTTP port sees it: the ops view (metrics, readiness), the
    users HTTP requests log in as, the audit log, and the publish path of the gateway."""

    @property
    def users(self) -> Users | None:
        """The configured users; None in no-users mode (no login on the HTTP port)."""
        ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def schemas(self) -> SchemaRegistry:
        """Schema bindings: while ``schemas.active``, a gateway publish passes ``screen`` first."""
        ...

    @property
    def durable_match(self) -> Callable[[str], Any] | None:
        """The durable targets (queues, streams) bound to a subject; None when there are none."""
        ...

    async def publish_durable(self, conn: Any, batch: list[Any]) -> None:
        """Store durable publishes (message, targets) and confirm them to ``conn``."""
        ...
