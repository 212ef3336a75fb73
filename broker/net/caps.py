"""Caps on what one connection and one user may hold: subscriptions, consumers, groups.

Each is a named config setting (broker/config.py, docs/OPERATIONS.md). A
request over a cap is refused with LIMIT_EXCEEDED for that request only,
and audited; the connection goes on. Per-user caps count every connection
of the user and apply only when users are configured (in no-users mode
every client is the same anonymous user).

Counts are read from the connections themselves (``len(actor.subs)``,
``len(actor.consumers)``) rather than kept as separate counters that every
removal path would have to keep in step: the per-user sum walks that
user's connections, at most ``max_connections_per_user``, and only when a
subscription or consumer is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

if TYPE_CHECKING:
    from tidings.broker.config import Config
    from tidings.broker.durable.ports import Peer
    from tidings.broker.net.connection import ConnectionActor
    from tidings.broker.security.audit import AuditLog


class Caps:
    def __init__(self, config: Config, audit: AuditLog) -> None:
        self.config = config
        self.audit = audit
        self._by_user: dict[str, set[ConnectionActor]] = {}

    def joined(self, actor: ConnectionActor) -> None:
        """``actor`` authenticated as a configured user: count it toward that user's caps."""
        if actor.user.name:
            self._by_user.setdefault(actor.user.name, set()).add(actor)

    def left(self, actor: ConnectionActor) -> None:
        conns = self._by_user.get(actor.user.name)
        if conns is not None:
            conns.discard(actor)
            if not conns:
                del self._by_user[actor.user.name]

    def check_subscription(self, actor: ConnectionActor, rid: int) -> None:
        """Raise LIMIT_EXCEEDED if ``actor`` may not add one more subscription."""
        cfg = self.config
        self._check(actor, rid, "max_subscriptions_per_connection", cfg.max_subscriptions_per_connection,
                    len(actor.subs), "subscriptions")
        conns = self._by_user.get(actor.user.name)
        if conns is not None:
            self._check(actor, rid, "max_subscriptions_per_user", cfg.max_subscriptions_per_user,
                        sum(len(a.subs) for a in conns), "subscriptions")

    def check_consumer(self, actor: ConnectionActor, rid: int) -> None:
        """Raise LIMIT_EXCEEDED if ``actor`` may not start one more consumer (queue
        consumer, group member or stream reader)."""
        cfg = self.config
        self._check(actor, rid, "max_consumers_per_connection", cfg.max_consumers_per_connection,
                    len(actor.consumers), "consumers")
        conns = self._by_user.get(actor.user.name)
        if conns is not None:
            self._check(actor, rid, "max_consumers_per_user", cfg.max_consumers_per_user,
                        sum(len(a.consumers) for a in conns), "consumers")

    def check_group(self, actor: Peer, stream: Any, rid: int) -> None:
        """Raise LIMIT_EXCEEDED if ``stream`` may not get one more consumer group."""
        self._check(actor, rid, "max_groups_per_stream", self.config.max_groups_per_stream,
                    len(stream.groups), f"consumer groups on stream {stream.name!r}")

    def _check(self, actor: Peer, rid: int, setting: str, cap: int, count: int, what: str) -> None:
        if count < cap:
            return
        self.audit.limit_refused(actor.user.name, actor.peer, setting, **{setting: cap})
        scope = "this user" if setting.endswith("_per_user") else (
            "this connection" if setting.endswith("_per_connection") else "the broker")
        raise RemoteProtocolError(f"{what}: {scope} holds its maximum of {cap} ({setting})",
                                  ErrorCode.LIMIT_EXCEEDED, rid=rid)
