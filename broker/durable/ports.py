"""What the durable layer needs from outside it, as protocols.

The durable layer (queues, streams, groups, readers, admission) serves
connections without knowing what a connection is: it types against
``Peer``, which the network layer's ``ConnectionActor`` satisfies
structurally (nothing here imports broker.net or broker.app, and nothing
costs anything at run time: these are only types).

* ``Peer``: a consumer's (or publisher's) connection: push a frame to it,
  ask how much it may still take (credit), hold room for deliveries being
  stored, the consumers it holds, who it is (for permissions and info).
* ``DurableConsumer``: what every kind of consumer a connection holds offers
  (a queue Consumer, a stream group Member, a stream Reader): its id, its
  connection, what it consumes (for the ack permission check), settle, close.
* ``Host``: what ``Durable`` asks of the broker that owns it: settings,
  whether it is shutting down, the binding and group caps, and telling every
  client the durable bindings changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from tidings.broker.config import Config


class Principal(Protocol):
    """Who is on a connection (the authenticated user; "" in no-users mode)."""

    @property
    def name(self) -> str: ...


class Peer(Protocol):
    """A client connection, as the durable layer may use it. Every method is
    non-blocking except ``wait_pending_below``."""

    @property
    def number(self) -> int:
        """The broker's number for this connection (shown in info)."""
        ...

    @property
    def name(self) -> str:
        """The client's name from its HELLO (shown in info)."""
        ...

    @property
    def peer(self) -> str:
        """The client's address, for audit lines."""
        ...

    @property
    def user(self) -> Principal: ...

    @property
    def consumers(self) -> dict[int, DurableConsumer]:
        """cid -> the consumers this connection holds; the durable layer adds and removes them."""
        ...

    @property
    def pending_limit(self) -> int:
        """The bound on the connection's outbound mailbox (``max_pending_bytes``)."""
        ...

    def end_consumer(self, cid: int, reason: str, **info: Any) -> None:
        """Forget consumer ``cid`` and tell the client why (a consumer_closed NOTICE)."""
        ...

    def push_wire(self, value: list[Any], size: int = 64) -> None:
        """Queue a frame (CONFIRM, OK, NOTICE, DELIVER) for the client: never blocks, never dropped."""
        ...

    def credit(self, wake: Callable[[], None]) -> int:
        """Bytes of deliveries the connection may still take; at or below 0 hold back,
        and ``wake()`` is called once there is room again (or the connection closed)."""
        ...

    def await_credit(self, wake: Callable[[], None]) -> None:
        """The caller used up its credit: ``wake()`` once the connection has sent and has room."""
        ...

    def reserve(self, n: int) -> None:
        """Count ``n`` bytes of deliveries taken now and pushed later against the credit."""
        ...

    def release(self, n: int) -> None:
        """The reserved bytes were pushed (or dropped)."""
        ...

    async def wait_pending_below(self, n: int) -> None:
        """Wait until at most ``n`` bytes are queued for the client (or it is closing)."""
        ...


class DurableConsumer(Protocol):
    """One consumer a connection holds: a queue Consumer, a stream group Member or a stream Reader."""

    @property
    def cid(self) -> int: ...

    @property
    def conn(self) -> Peer: ...

    @property
    def source(self) -> str:
        """The queue or stream it consumes."""
        ...

    @property
    def group_name(self) -> str | None:
        """The consumer group, for a group member (its permission is STREAM/GROUP); else None."""
        ...

    def settle(self, items: list[list[Any]]) -> list[int]:
        """Apply ACK items (ack, nack, term); one result code per item (0: applied)."""
        ...

    def close(self) -> None:
        """Stop: detach from the queue or group, give back what it held."""
        ...


class BindingCaps(Protocol):
    def check_declare(self, kind: str, name: str, bind: tuple[str, ...] | list[str], rid: int) -> None:
        """Raise if a declare's bind patterns exceed the broker's binding caps."""
        ...


class GroupCaps(Protocol):
    def check_group(self, actor: Peer, stream: Any, rid: int) -> None:
        """Raise if ``stream`` may not get one more consumer group."""
        ...


class Host(Protocol):
    """What ``Durable`` asks of the broker that owns it."""

    @property
    def config(self) -> Config: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def bindings(self) -> BindingCaps: ...

    @property
    def caps(self) -> GroupCaps: ...

    def bindings_changed(self) -> None:
        """A queue or stream was declared or deleted: tell every client the new bindings."""
        ...
