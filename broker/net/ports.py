"""What a connection may ask of the broker: the port a ConnectionActor gets.

The connection actor does not hold the Broker. It holds a ``BrokerPort``:
the settings and shared registries it reads on its hot path (the router,
the durable bindings match, counters, the audit log, the resource monitor)
and the few things it asks the broker to do:

* ``admit``: may this HELLO stay (authentication, connection caps)?
* ``serve_route``: the HELLO came from another broker of the cluster;
* ``welcome_info`` / ``opened``: what WELCOME carries; after it, the
  durable bindings (NOTICEs) follow;
* ``handle_request``: dispatch any request frame but PUB and PING;
* ``publish_durable``: hand a batch of durable publishes to the durable layer;
* ``detach``: the connection is closing: forget it.

``app.Broker`` satisfies it structurally. The port is generic in the
connection type so that this module imports nothing of the connection
(``BrokerPort[ConnectionActor]``). Types only: no cost at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

if TYPE_CHECKING:
    from tidings.protocol import ErrorCode
    from tidings.protocol import frames as F

    from tidings.broker.config import Config
    from tidings.broker.ops.limits import ResourceMonitor
    from tidings.broker.ops.stats import Stats
    from tidings.broker.net.publish import Filtering
    from tidings.broker.router import Router
    from tidings.broker.schemas.registry import SchemaRegistry
    from tidings.broker.security.audit import AuditLog

Conn = TypeVar("Conn", contravariant=True)


class BrokerPort(Protocol[Conn]):
    """What a connection of type ``Conn`` may read and ask of the broker."""

    @property
    def config(self) -> Config: ...

    @property
    def stats(self) -> Stats:
        """Broker-wide counters the connection adds to (published, dropped, errors)."""
        ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def monitor(self) -> ResourceMonitor:
        """Memory high-water and free-disk flags: a publisher pauses, durable publishes are refused."""
        ...

    @property
    def router(self) -> Router[Any]:
        """Pub/sub subscriptions by subject pattern (read per PUB frame)."""
        ...

    @property
    def schemas(self) -> SchemaRegistry:
        """Schema bindings: while ``schemas.active``, each published message passes ``screen``."""
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

    async def admit(self, conn: Conn, hello: F.Hello) -> tuple[ErrorCode, str] | None:
        """Decide whether a connection that said HELLO may stay; None = yes, else the refusal."""
        ...

    async def serve_route(self, conn: Conn, hello: F.Hello) -> None:
        """The HELLO has the route option (another broker of a cluster): serve the
        connection as a route until it ends (broker/cluster/mesh.py)."""
        ...

    def welcome_info(self, conn: Conn) -> dict[str, Any]:
        """The info map of the WELCOME frame."""
        ...

    def opened(self, conn: Conn) -> None:
        """WELCOME is queued: queue what follows it (the durable bindings)."""
        ...

    async def handle_request(self, conn: Conn, frame: Any) -> None:
        """Dispatch a request frame (not PUB, PING, PONG); raises RemoteProtocolError."""
        ...

    async def publish_durable(self, conn: Conn, batch: list[Any]) -> None:
        """Store durable publishes (message, targets) and confirm them to ``conn``."""
        ...

    def detach(self, conn: Conn) -> None:
        """The connection is closing: drop its subscriptions, consumers and counts. Idempotent."""
        ...
