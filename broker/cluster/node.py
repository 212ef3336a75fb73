"""The cluster as the broker sees it: membership and mesh, started and stopped together.

    cluster = Cluster(config, router, filtering)   # with cluster = true only
    await cluster.start(root_task_group, bound)    # registered, dialing; before clients are served
    await cluster.accept_route(stream, options, peer)  # a route HELLO on the client port
    await cluster.close()                          # at shutdown: routes closed, membership row deleted

``cluster.membership`` is the ``Membership`` other parts use (who is alive, my id,
"a peer died" callbacks: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from anyio.abc import ByteStream, TaskGroup

from tidings.broker.cluster.membership import Membership
from tidings.broker.cluster.mesh import Mesh
from tidings.broker.config import Config, ConfigError

if TYPE_CHECKING:
    from tidings.broker.net.publish import Filtering
    from tidings.broker.security.audit import AuditLog
    from tidings.broker.router import Router

log = logging.getLogger(__name__)

UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "")


class Cluster:
    """Membership and mesh of one broker (owned by the event loop thread)."""

    def __init__(self, config: Config, router: Router[Any], filtering: Filtering,
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.router = router
        self.filtering = filtering
        # Built here (its id is known from now on) so that other parts can hold it from the start;
        # its address is set and its row inserted by start().
        self.membership = Membership(config.store, "")
        self.mesh = Mesh(self.membership, router, filtering, config.server_name)
        if audit is not None:  # a refused route handshake is a failed login: audited as one
            self.mesh.on_refused = lambda peer, claimed, why: audit.auth_failed(claimed, peer, "route", why)

    async def start(self, tg: TaskGroup, bound: tuple[str, int]) -> None:
        """Register in the membership table and start the mesh. Raises ConfigError when the
        address to advertise is unknown, MembershipError when the database refuses."""
        cfg = self.config
        address = cfg.cluster_address
        if not address:
            host, port = bound
            if host in UNSPECIFIED_HOSTS:
                raise ConfigError(f"listening on {host or 'every address'}: set cluster_address to the "
                                  "host:port other brokers reach this one at")
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.membership.address = address
        # From here on every local SUB/UNSUB reaches the peers (none is served yet).
        self.filtering.on_interest = self.mesh.local_changed
        await tg.start(self.membership.run)
        await tg.start(self.mesh.run)

    async def accept_route(self, stream: ByteStream, options: dict[str, Any], peer: str) -> None:
        await self.mesh.accept(stream, options, peer)

    @property
    def remote_count(self) -> int:
        """Router items that stand for other brokers' interest (not subscriptions of ours)."""
        return self.mesh.remote_count

    def info(self) -> dict[str, Any]:
        return self.mesh.info()

    def close_routes(self) -> None:
        """Shutdown begins: close every route (peers see it at once and drop our interest)."""
        self.mesh.close()

    async def close(self) -> None:
        """Close the routes and leave the membership table (shielded, never raises)."""
        self.mesh.close()
        await self.membership.close()
