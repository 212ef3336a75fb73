"""The broker: listener, shared registries, request dispatch, ordered shutdown.

``Broker.serve()`` binds the listener, prints the ready line
``tidings listening on HOST:PORT`` (the real bound port, so ``--port 0``
works), accepts connections into their own actors under one task group,
and on SIGINT/SIGTERM shuts down in a fixed order: stop accepting, tell
every client (NOTICE shutdown), let each connection flush for a bounded
time, then cancel what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Final

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from protocol import ErrorCode, RemoteProtocolError
from protocol import frames as F

from .config import Config
from .connection import ConnectionActor, Subscription
from .durable import Durable
from .router import Router
from .stats import Stats

log = logging.getLogger(__name__)

SHUTDOWN_GRACE: Final = 5.0  # seconds connections get to drain on SIGTERM before they are cancelled
MAX_SUBS_PER_CONNECTION: Final = 100_000  # bounds router memory one client can claim


class Broker:
    """Shared state of one broker process, owned by the event loop thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.router: Router[Subscription] = Router()
        self.stats = Stats()
        self.connections: dict[int, ConnectionActor] = {}
        self._next_conn = 0
        self.durable = Durable(self)
        self.durable_match: Callable[[str], Any] | None = self.durable.match
        self.bindings_epoch = 0
        self.bound_address: tuple[str, int] | None = None
        self._tg: TaskGroup | None = None
        self._shutting_down = False
        self.ready = anyio.Event()
        self._calls: dict[str, Callable[[dict[str, Any]], Any]] = {
            "stats": self._stats_call, "server.info": self._info_call}
        self._durable_calls = self.durable.calls()
        self._live = 0  # connection actors still running (closing ones included)
        self._all_closed = anyio.Event()

    # ------------------------------------------------------ connections

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def admit(self, actor: ConnectionActor) -> tuple[ErrorCode, str] | None:
        """Decide whether a connection that said HELLO may stay; None = yes."""
        if self._shutting_down:
            return ErrorCode.SHUTTING_DOWN, "the broker is shutting down"
        return None

    def welcome_info(self, actor: ConnectionActor) -> dict[str, Any]:
        cfg = self.config
        return {
            "max_frame": actor.conn.max_frame,
            "max_payload": cfg.max_payload,
            "features": ["pubsub", "queue-groups", "request-reply", "headers", "queues", "dlq", "streams"],
            "durability": cfg.durability,
            "heartbeat_ms": int(cfg.heartbeat * 1000),
            "connection_id": actor.number,
            "bindings": {"epoch": self.bindings_epoch, "patterns": self.binding_patterns()},
        }

    def binding_patterns(self) -> list[str]:
        return self.durable.binding_patterns()

    def bindings_changed(self) -> None:
        """Tell every client the new set of durably bound patterns (before the
        declaring client's OK, which is queued after this)."""
        self.bindings_epoch += 1
        info = {"epoch": self.bindings_epoch, "patterns": self.binding_patterns()}
        for actor in self.connections.values():
            actor.push_wire([F.Op.NOTICE, "bindings", info], 256)

    def detach(self, actor: ConnectionActor) -> None:
        """Forget a closing connection: drop its subscriptions at once."""
        if self.connections.pop(actor.number, None) is None:
            return
        for sub in actor.subs.values():
            self.router.remove(sub.pattern, sub, sub.group)
        actor.subs.clear()
        self.durable.detach_all(actor)

    async def _handle_connection(self, stream: SocketStream) -> None:
        self._next_conn += 1
        number = self._next_conn
        try:
            host, port = stream.extra(SocketAttribute.remote_address)[:2]
            peer = f"{host}:{port}"
        except (TypeError, ValueError, OSError):
            peer = "?"
        self.stats.connections_total += 1
        actor = ConnectionActor(self, stream, number, peer)
        if len(self.connections) >= self.config.max_connections:
            self.stats.connections_refused += 1
            log.warning("refusing connection from %s: max_connections %d reached", peer, self.config.max_connections)
            await self._refuse(actor, ErrorCode.TOO_MANY_CONNECTIONS,
                               f"the broker holds its maximum of {self.config.max_connections} connections")
            return
        self.connections[number] = actor
        self._live += 1
        log.debug("connection %d from %s", number, peer)
        try:
            await actor.run()
        except Exception:  # actor boundary: one broken connection must not take the broker down
            log.exception("connection %d (%s) failed", number, peer)
        finally:
            self.detach(actor)
            self._live -= 1
            if self._shutting_down and not self._live:
                self._all_closed.set()
            log.debug("connection %d (%s) closed", number, peer)

    async def _refuse(self, actor: ConnectionActor, code: ErrorCode, message: str) -> None:
        from protocol.codec import Encoder
        with anyio.move_on_after(1.0):
            try:
                await actor.stream.send(Encoder().encode_value([F.Op.ERR, 0, int(code), message]))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        with anyio.CancelScope(shield=True):
            await actor.stream.aclose()

    # ---------------------------------------------------------- requests

    async def handle_request(self, actor: ConnectionActor, ev: Any) -> None:
        """Dispatch a non-PUB frame. Raises RemoteProtocolError for bad requests."""
        t = type(ev)
        if t is F.Ack:
            self.durable.settle(actor, ev)
        elif t is F.Sub:
            self._subscribe(actor, ev)
        elif t is F.Unsub:
            sub = actor.subs.pop(ev.sid, None)
            if sub is None:
                raise RemoteProtocolError(f"no subscription {ev.sid}", ErrorCode.NOT_FOUND, rid=ev.rid)
            self.router.remove(sub.pattern, sub, sub.group)
            if ev.rid:
                actor.push_wire([F.Op.OK, ev.rid, None])
        elif t is F.Call:
            result = await self.call(actor, ev.method, ev.args, ev.rid)
            actor.push_wire([F.Op.OK, ev.rid, result], 256)
        elif t is F.Consume:
            if "queue" in ev.args:
                result = self.durable.consume(actor, ev.cid, ev.args, ev.rid)
            elif "stream" in ev.args:
                result = await self.durable.streams.consume(actor, ev.cid, ev.args, ev.rid)
            else:
                raise RemoteProtocolError("CONSUME needs a 'queue' or a 'stream'", ErrorCode.INVALID_ARGUMENT,
                                          rid=ev.rid)
            actor.push_wire([F.Op.OK, ev.rid, result], 128)
        elif t is F.Stop:
            self.durable.stop(actor, ev.cid, ev.rid)
            actor.push_wire([F.Op.OK, ev.rid, None])
        else:
            raise RemoteProtocolError(f"unexpected {t.__name__}", ErrorCode.BAD_STATE, rid=getattr(ev, "rid", 0))

    def _subscribe(self, actor: ConnectionActor, ev: F.Sub) -> None:
        if ev.sid in actor.subs:
            raise RemoteProtocolError(f"subscription id {ev.sid} is already in use", ErrorCode.INVALID_ARGUMENT,
                                      rid=ev.rid)
        if len(actor.subs) >= MAX_SUBS_PER_CONNECTION:
            raise RemoteProtocolError("too many subscriptions on one connection", ErrorCode.OVERLOADED, rid=ev.rid)
        sub = Subscription(actor, ev.sid, ev.pattern, ev.group)
        actor.subs[ev.sid] = sub
        self.router.add(ev.pattern, sub, ev.group)
        if ev.rid:
            actor.push_wire([F.Op.OK, ev.rid, None])

    async def call(self, actor: ConnectionActor, method: str, args: dict[str, Any], rid: int) -> Any:
        handler = self._calls.get(method)
        if handler is not None:
            return handler(args)
        dhandler = self._durable_calls.get(method)
        if dhandler is None:
            raise RemoteProtocolError(f"unknown method {method!r}", ErrorCode.UNKNOWN_OPERATION, rid=rid)
        result = dhandler(args, rid)
        if hasattr(result, "__await__"):
            result = await result
        return result

    def _stats_call(self, args: dict[str, Any]) -> dict[str, Any]:
        snap = self.stats.snapshot()
        snap["connections"] = len(self.connections)
        snap["subscriptions"] = self.router.count
        snap["queues"] = len(self.durable.queues)
        snap["confirmed"] = self.durable.confirmed
        snap["duplicates"] = self.durable.duplicates
        st = self.durable.store
        snap["store"] = {k: getattr(st, k) for k in ("commits", "committed_ops", "committed_messages",
                                                      "last_commit_seconds", "last_batch_size")
                         if hasattr(st, k)}
        snap["pid"] = os.getpid()
        return snap

    def _info_call(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"server_name": self.config.server_name, "version": F.PROTOCOL_VERSION,
                "durability": self.config.durability, "pid": os.getpid()}

    # ------------------------------------------------------------ serving

    async def serve(self, *, install_signals: bool = True) -> None:
        """Run until SIGINT/SIGTERM (or cancellation), then shut down in order."""
        cfg = self.config
        listener = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port, reuse_port=False)
        addr = listener.extra(SocketAttribute.local_address)
        self.bound_address = (str(addr[0]), int(addr[1]))
        async with anyio.create_task_group() as root:
            try:
                await self.durable.start(root)
                await self._serve_connections(listener, install_signals)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.durable.close()
                root.cancel_scope.cancel()
        log.info("stopped")

    async def _serve_connections(self, listener: Any, install_signals: bool = True) -> None:
        cfg = self.config
        async with anyio.create_task_group() as ctg:
            self._tg = ctg
            accept_scope = anyio.CancelScope()
            accept_done = anyio.Event()

            async def accept_loop() -> None:
                try:
                    with accept_scope:
                        await listener.serve(self._handle_connection, task_group=ctg)
                finally:
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()
                    accept_done.set()

            ctg.start_soon(accept_loop)
            host, port = self.bound_address
            shown = f"[{host}]" if ":" in host else host
            try:
                # Signals are caught before the ready line, so a SIGTERM right after it is graceful.
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    print(f"tidings listening on {shown}:{port}", flush=True)
                    log.info("listening on %s:%d (durability=%s)", host, port, cfg.durability)
                    self.ready.set()
                    if not install_signals:
                        await anyio.sleep_forever()
                    async for signum in signals:
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        break
            finally:
                with anyio.CancelScope(shield=True):
                    accept_scope.cancel()
                    await accept_done.wait()
                    await self._drain_connections()
                ctg.cancel_scope.cancel()

    async def _drain_connections(self) -> None:
        """Tell every client we are going, and give them SHUTDOWN_GRACE to flush."""
        self._shutting_down = True
        for actor in list(self.connections.values()):
            actor.push_wire([F.Op.NOTICE, "shutdown", {}])
            actor.close()
        if self._live:
            with anyio.move_on_after(SHUTDOWN_GRACE):
                await self._all_closed.wait()
        sys.stdout.flush()
