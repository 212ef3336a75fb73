"""The broker: listener, shared registries, request dispatch, ordered shutdown.

``Broker.serve()`` binds the listener, prints the ready line
``tidings listening on HOST:PORT`` (the real bound port, so ``--port 0``
works), accepts connections into their own actors under one task group,
and on SIGINT/SIGTERM shuts down in a fixed order: stop accepting, tell
every client (NOTICE shutdown), let each connection flush for a bounded
time, then cancel what is left.

Security lives here too: HELLO credentials are checked against the
configured users (``admit``), every request is checked against the
connection's permissions before it is dispatched (PUB messages are
checked by the connection actor itself, on its hot path), the listener
speaks TLS when ``[tls]`` is configured, and the audit log records logins,
denials, administrative operations and limit refusals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
from typing import Any, Callable, Final

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup

from protocol import ErrorCode, RemoteProtocolError
from protocol import frames as F

from . import tls
from .audit import AuditFile, AuditLog, logger_sink
from .auth import AuthError, AuthThrottled, Users, auth_method
from .config import Config, ConfigError, is_loopback
from .connection import ConnectionActor, Subscription
from .backup import backup_handler
from .durable import Durable
from .limits import ResourceMonitor
from .router import Router
from .stats import Stats

log = logging.getLogger(__name__)

SHUTDOWN_GRACE: Final = 5.0  # seconds connections get to drain on SIGTERM before they are cancelled
MAX_SUBS_PER_CONNECTION: Final = 100_000  # bounds router memory one client can claim
# Calls that change state are written to the audit log (reads such as stats or queue.info are not:
# a dashboard polling them would drown the log).
AUDITED_CALLS: Final = frozenset({"queue.declare", "queue.delete", "queue.purge", "dlq.purge", "dlq.redrive",
                                  "stream.declare", "stream.delete", "stream.trim"})


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
        self._durable_calls["backup"] = backup_handler(self)
        self._live = 0  # connection actors still running (closing ones included)
        self._all_closed = anyio.Event()
        sec = config.security
        # Users without their own max_connections get the broker-wide per-user default.
        self.users: Users | None = (
            Users([dataclasses.replace(s, max_connections=s.max_connections or config.max_connections_per_user)
                   for s in sec.users.values()]) if sec.auth_enabled else None)
        # Lines go to the logger until serve() opens the audit file.
        self.audit = AuditLog(logger_sink())
        self._audit_file: AuditFile | None = None
        self.monitor = ResourceMonitor(memory_high_water=config.memory_high_water,
                                       min_free_disk=config.min_free_disk, data_dir=config.data_dir,
                                       interval=config.resource_check_interval)

    # ------------------------------------------------------ connections

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def admit(self, actor: ConnectionActor, hello: F.Hello) -> tuple[ErrorCode, str] | None:
        """Decide whether a connection that said HELLO may stay; None = yes.

        With users configured this authenticates the HELLO's credentials
        (hashing runs in a worker thread), counts the connection against
        the user's max_connections and gives the actor its user; every
        outcome is audited. Unknown user, wrong password and wrong token
        get the same AUTH_FAILED message."""
        if self._shutting_down:
            return ErrorCode.SHUTTING_DOWN, "the broker is shutting down"
        users = self.users
        if users is None:
            return None
        method = auth_method(hello.auth)
        try:
            user = await users.authenticate(hello.auth, actor.peer_ip)
        except AuthThrottled as exc:
            self.audit.auth_throttled(actor.peer, exc.retry_after)
            return exc.code, exc.message
        except AuthError as exc:
            self.audit.auth_failed(exc.user, actor.peer, method, exc.reason)
            return exc.code, exc.message
        if self._shutting_down:
            return ErrorCode.SHUTTING_DOWN, "the broker is shutting down"
        if actor.number not in self.connections:
            # closed while its password was being hashed: counting it now would leak the slot
            return ErrorCode.SHUTTING_DOWN, "the connection is closing"
        if not users.try_acquire(user):
            self.audit.limit_refused(user.name, actor.peer, "user.max_connections",
                                     max_connections=user.max_connections)
            return (ErrorCode.TOO_MANY_CONNECTIONS,
                    f"user {user.name!r} holds its maximum of {user.max_connections} connections")
        actor.set_user(user, counted=True)
        self.audit.auth_ok(user.name, actor.peer, method, actor.number)
        return None

    def denied(self, actor: ConnectionActor, action: str, name: str, rid: int) -> RemoteProtocolError:
        """Audit a permission denial and return the error to answer it with."""
        self.audit.permission_denied(actor.user.name, actor.peer, action, name)
        return RemoteProtocolError(f"permission denied: {action} on {name!r}", ErrorCode.PERMISSION_DENIED,
                                   rid=rid)

    def welcome_info(self, actor: ConnectionActor) -> dict[str, Any]:
        cfg = self.config
        return {
            "max_frame": actor.conn.max_frame,
            "max_payload": cfg.max_payload,
            "features": ["pubsub", "queue-groups", "request-reply", "headers", "queues", "dlq", "streams"],
            "durability": cfg.durability,
            "heartbeat_ms": int(cfg.heartbeat * 1000),
            "connection_id": actor.number,
            "user": actor.user.name or None,
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
        if actor.counted and self.users is not None:
            actor.counted = False
            self.users.release(actor.user)
        for sub in actor.subs.values():
            self.router.remove(sub.pattern, sub, sub.group)
        actor.subs.clear()
        self.durable.detach_all(actor)

    async def _handle_connection(self, stream: SocketStream) -> None:
        self._next_conn += 1
        number = self._next_conn
        try:
            host, port = stream.extra(SocketAttribute.remote_address)[:2]
            peer_ip = str(host)
            peer = f"{host}:{port}"
        except (TypeError, ValueError, OSError, anyio.TypedAttributeLookupError):
            peer_ip = peer = "?"
        self.stats.connections_total += 1
        actor = ConnectionActor(self, stream, number, peer, peer_ip)
        if len(self.connections) >= self.config.max_connections:
            self.stats.connections_refused += 1
            log.warning("refusing connection from %s: max_connections %d reached", peer, self.config.max_connections)
            self.audit.limit_refused("", peer, "max_connections", max_connections=self.config.max_connections)
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
            if actor.restricted:
                self._check_ack(actor, ev)
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
            if actor.restricted:
                name = ev.args.get("queue", ev.args.get("stream"))
                if isinstance(name, str) and not actor.perms.allows("consume", name):
                    raise self.denied(actor, "consume", name, ev.rid)
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

    def _check_ack(self, actor: ConnectionActor, ev: F.Ack) -> None:
        """Acks are covered by the consume check made when the consumer was
        created; checked again here (a cached lookup) so that no path
        settles deliveries of a name the user may not consume."""
        c = actor.consumers.get(ev.cid)
        if c is None:
            return  # settle() answers an unknown consumer
        # queue Consumer: .queue; stream Reader: .stream; group Member: .group.stream
        target = getattr(c, "queue", None)
        if target is None:
            target = getattr(c, "stream", None)
        if target is None:
            target = getattr(getattr(c, "group", None), "stream", None)
        name = getattr(target, "name", None)
        if isinstance(name, str) and not actor.perms.allows("consume", name):
            raise self.denied(actor, "consume", name, ev.rid)

    def _subscribe(self, actor: ConnectionActor, ev: F.Sub) -> None:
        if actor.restricted and not actor.perms.allows("subscribe", ev.pattern):
            raise self.denied(actor, "subscribe", ev.pattern, ev.rid)
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
        """Run a CALL after checking the user may; raises RemoteProtocolError.
        State-changing calls are audited with their outcome."""
        if actor.restricted:
            need = actor.perms.check_call(method, args)
            if need is not None:
                raise self.denied(actor, need.action, need.name, rid)
        if method not in AUDITED_CALLS:
            return await self._dispatch_call(actor, method, args, rid)
        target = args.get("name")
        try:
            result = await self._dispatch_call(actor, method, args, rid)
        except Exception as exc:  # audited whatever the failure, then re-raised unchanged
            outcome = getattr(getattr(exc, "code", None), "name", "INTERNAL")
            self.audit.admin(actor.user.name, actor.peer, method, target, outcome)
            raise
        self.audit.admin(actor.user.name, actor.peer, method, target, "ok")
        return result

    async def _dispatch_call(self, actor: ConnectionActor, method: str, args: dict[str, Any], rid: int) -> Any:
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
                                                      "last_commit_seconds", "last_batch_messages",
                                                      "pending_ops", "pending_messages", "pending_bytes",
                                                      "failed_ops", "inflight_ops", "inflight_messages",
                                                      "inflight_bytes", "transaction_seconds",
                                                      "transaction_phase", "stalled", "stalls")
                         if hasattr(st, k)}
        snap["pid"] = os.getpid()
        snap["limits"] = self.monitor.snapshot()
        snap["auth"] = {"enabled": self.users is not None, "users": len(self.users) if self.users else 0,
                        "throttled_peers": len(self.users.throttle) if self.users else 0}
        return snap

    def _info_call(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"server_name": self.config.server_name, "version": F.PROTOCOL_VERSION,
                "durability": self.config.durability, "pid": os.getpid(),
                "auth": self.users is not None, "tls": self.config.security.tls is not None}

    # ------------------------------------------------------------ serving

    async def serve(self, *, install_signals: bool = True) -> None:
        """Run until SIGINT/SIGTERM (or cancellation), then shut down in order.

        Raises ConfigError if the audit log cannot be opened, OSError if the
        listener cannot be bound (or the TLS files no longer load)."""
        cfg = self.config
        self._open_audit()
        try:
            ssl_context = cfg.security.tls.server_context() if cfg.security.tls is not None else None
            tcp = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port, reuse_port=False)
            addr = tcp.extra(SocketAttribute.local_address)
            self.bound_address = (str(addr[0]), int(addr[1]))
            listener: Any = tcp
            if ssl_context is not None:
                # The handshake gets the HELLO timeout: a peer that stalls in it holds a slot no longer.
                listener = tls.listener(tcp, ssl_context, handshake_timeout=cfg.hello_timeout)
            async with anyio.create_task_group() as root:
                try:
                    await root.start(self.audit.run_flusher)
                    await root.start(self.monitor.run)
                    if cfg.metrics_port >= 0:
                        # Before recovery: liveness answers while readiness says 503.
                        from .metrics import serve_metrics
                        await root.start(serve_metrics, self, cfg.metrics_host, cfg.metrics_port)
                    await self.durable.start(root)
                    await self._serve_connections(listener, install_signals)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.durable.close()
                    root.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_audit()
        log.info("stopped")

    def _open_audit(self) -> None:
        path = self.config.audit_path
        if path is None:
            return
        try:
            self._audit_file = AuditFile(path)
        except OSError as exc:
            raise ConfigError(f"cannot open the audit log {path}: {exc.strerror or exc}") from None
        self.audit.sink = self._audit_file.write

    async def _close_audit(self) -> None:
        # Close every rate-limit window, ended or not, so suppressed counts are not lost:
        # with the clock at infinity every window has ended.
        self.audit.clock = lambda: math.inf
        self.audit.flush()
        if self._audit_file is not None:
            await self._audit_file.aclose()

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
                # Without install_signals (in-process use) the caller stops the broker by cancelling.
                with (anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if install_signals
                      else contextlib.nullcontext()) as signals:
                    print(f"tidings listening on {shown}:{port}", flush=True)
                    sec = cfg.security
                    log.info("listening on %s:%d (durability=%s, auth=%s, tls=%s)", host, port, cfg.durability,
                             f"{len(sec.users)} users" if sec.auth_enabled else "off",
                             "on" if sec.tls is not None else "off")
                    if sec.auth_enabled and sec.tls is None and not is_loopback(cfg.host):
                        log.warning("authentication without TLS on %s: passwords and tokens cross the network "
                                    "in clear; configure [tls]", cfg.host)
                    self.ready.set()
                    if signals is None:
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
