"""The broker: the composition root. It builds the shared registries, the
durable layer, security and ops, serves the listener and owns ordered shutdown.

``Broker.serve()`` binds the listener, prints the ready line
``tidings listening on HOST:PORT`` (the real bound port, so ``--port 0``
works), accepts connections into their own actors under one task group,
and on SIGINT/SIGTERM shuts down in a fixed order: stop accepting, tell
every client (NOTICE shutdown), let each connection flush for a bounded
time, stop the HTTP port (its requests in flight, gateway publishes
included, finish for a bounded time), close the store, then cancel what is
left. The HTTP port (broker/http/, on with ``http_port``) starts before
recovery, so /healthz answers while /readyz says 503.

Each connection actor gets the Broker as its port (net/ports.py: admit,
welcome_info, opened, handle_request, publish_durable, detach), never more.
HELLO credentials are checked here against the configured users
(``admit``); every request is checked against the connection's permissions
and dispatched by net/dispatch.py (PUB messages are checked by the
connection actor itself, on its hot path); the listener speaks TLS when
``[tls]`` is configured, and the audit log records logins, denials,
administrative operations and limit refusals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import math
import os
import resource
import signal
import sys
from typing import Any, Callable, Final

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup
from anyio.streams.tls import TLSStream

from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V

from tidings.broker.security import tls
from tidings.broker.security.audit import AuditFile, AuditLog, logger_sink
from tidings.broker.security.auth import AuthError, AuthThrottled, Users, auth_method
from tidings.broker.config import Config, ConfigError, is_loopback
from tidings.broker.cluster.node import Cluster
from tidings.broker.net.connection import ConnectionActor, Subscription
from tidings.broker.ops.backup import backup_handler
from tidings.broker.net.bindings import BindingsFeed
from tidings.broker.net.caps import Caps
from tidings.broker.net.dispatch import Dispatcher
from tidings.broker.net.publish import Filtering
from tidings.broker.durable.core import Durable
from tidings.broker.ops.limits import ResourceMonitor
from tidings.broker.router import Router
from tidings.broker.schemas.registry import SchemaRegistry
from tidings.broker.ops.stats import Stats

log = logging.getLogger(__name__)

SHUTDOWN_GRACE: Final = 5.0  # seconds connections get to drain on SIGTERM before they are cancelled
# File descriptors kept out of the connection budget: SQLite (db, WAL, shm), the audit and log files,
# the listeners, metrics/health clients, backups, with room to spare. max_connections and
# max_pending_handshakes are clamped at start-up so that, with this reserve, they fit RLIMIT_NOFILE.
FD_RESERVE: Final = 64
# Out of descriptors (or kernel memory) in accept(): the connection waits in the kernel's backlog
# while we back off (doubling from the first to the second value, seconds) and keep serving the
# connections we have; a silent one closing at its hello_timeout frees a descriptor.
ACCEPT_BACKOFF: Final = (0.05, 1.0)
ACCEPT_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer went away between the SYN and our accept(): nothing to do but accept the next one.
ACCEPT_PEER_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM})
MAX_SUBS_PER_CONNECTION: Final = 100_000  # bounds router memory one client can claim
# Seconds the HTTP port gets to stop at shutdown: uvicorn's own grace for requests in flight
# (broker/http/server.py GRACEFUL_SHUTDOWN) and a little more; then it is cancelled.
HTTP_STOP_GRACE: Final = 7.0


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
        # The connection's port (net/ports.py) hands durable publishes straight to their admission.
        self.publish_durable = self.durable.admission.publish
        self.bindings = BindingsFeed(config, self.durable, self.connections)
        self.bound_address: tuple[str, int] | None = None
        self._tg: TaskGroup | None = None
        self._shutting_down = False
        self.ready = anyio.Event()
        # serve.py sets it (the daemon, not in-process use): after recovery, the long-lived state
        # goes to the collector's permanent generation, so full passes stop walking it
        self.freeze_gc_when_ready = False
        # The schema registry keeps its state in the durable store; a binding's dead-letter
        # destination is a queue target, as the durable bindings match returns them.
        self.schemas = SchemaRegistry(self.durable.store, self.durable.queues.get, now_ms=self.durable.now_ms)
        # Content filters of subscriptions and bindings (net/publish.py); payload fields are
        # read where a schema binds the subject.
        self.filtering = Filtering(self.durable.filtered, self.schemas.decoded)
        durable_calls = self.durable.calls()
        durable_calls["backup"] = backup_handler(self)
        durable_calls.update(self.schemas.calls())
        self._live = 0  # connection actors still running (closing ones included)
        # Connections that have not completed HELLO, oldest first: number -> (peer ip, evict callback).
        self._pending: dict[int, tuple[str, Callable[[], None]]] = {}
        self._pending_per_ip: dict[str, int] = {}
        self.admitted = 0  # connections past HELLO: what max_connections counts
        # In force after the start-up clamp to the descriptor limit (see clamp_to_fd_limit).
        self.max_connections = config.max_connections
        self.max_pending_handshakes = config.max_pending_handshakes
        self._ssl_context: Any = None
        self._all_closed = anyio.Event()
        sec = config.security
        # Users without their own max_connections get the broker-wide per-user default.
        self.users: Users | None = (
            Users([dataclasses.replace(s, max_connections=s.max_connections or config.max_connections_per_user)
                   for s in sec.users.values()], upgrade=sec.hash_upgrader()) if sec.auth_enabled else None)
        if self.users is not None:
            weak = self.users.weak_hashes()
            if weak:
                log.warning("password hashes weaker than the current scrypt cost for %d user(s) (%s): %s",
                            len(weak), ", ".join(weak[:10]),
                            "upgraded in the config file at each one's next login" if sec.hash_upgrader()
                            else "password_upgrade is off: regenerate them with `tidings passwd`")
        # Lines go to the logger until serve() opens the audit file.
        self.audit = AuditLog(logger_sink())
        self.caps = Caps(config, self.audit)
        # Requests (everything but PUB and PING) of every connection: net/dispatch.py.
        self.dispatcher = Dispatcher(
            router=self.router, caps=self.caps, durable=self.durable, audit=self.audit, filtering=self.filtering,
            calls={"stats": self._stats_call, "server.info": self._info_call}, durable_calls=durable_calls)
        self.handle_request = self.dispatcher.handle_request  # the connection's port (net/ports.py)
        self._audit_file: AuditFile | None = None
        self.http: Any = None  # the HTTP port (broker/http/server.py HttpServer) while it runs
        # Several brokers on one database (broker/cluster/): membership, routes, interest.
        self.cluster: Cluster | None = (Cluster(config, self.router, self.filtering, self.audit)
                                        if config.cluster else None)
        # Who is alive (docs/ARCHITECTURE.md "Membership"); None without cluster = true.
        self.membership = self.cluster.membership if self.cluster is not None else None
        self.monitor = ResourceMonitor(memory_high_water=config.memory_high_water,
                                       min_free_disk=config.min_free_disk, data_dir=config.data_dir,
                                       interval=config.resource_check_interval)

    @property
    def subscription_count(self) -> int:
        """Live pub/sub subscriptions: the router's and the filtered ones kept apart."""
        remote = self.cluster.remote_count if self.cluster is not None else 0  # other brokers' interest
        return self.router.count + self.filtering.subs.count - remote

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
        get the same AUTH_FAILED message. An admitted connection counts
        against ``max_connections`` (checked before the password is hashed
        and again when it is counted) and stops counting as a pending
        handshake."""
        if self._shutting_down:
            return ErrorCode.SHUTTING_DOWN, "the broker is shutting down"
        full = self._refuse_if_full(actor)
        if full is not None:
            return full
        users = self.users
        if users is None:
            self._handshake_done(actor)
            return None
        method = auth_method(hello.auth)
        tls_cfg = self.config.security.tls
        names: tuple[str, ...] = ()
        if tls_cfg is not None and tls_cfg.client_cert_user is not None:
            names = tls.cert_names(tls.peer_certificate(actor.stream), tls_cfg.client_cert_user)
            if names and method == "none":
                method = "certificate"
        try:
            user = await users.authenticate(hello.auth, actor.peer_ip, names)
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
        full = self._refuse_if_full(actor)
        if full is not None:
            return full
        if not users.try_acquire(user):
            self.audit.limit_refused(user.name, actor.peer, "user.max_connections",
                                     max_connections=user.max_connections)
            return (ErrorCode.TOO_MANY_CONNECTIONS,
                    f"user {user.name!r} holds its maximum of {user.max_connections} connections")
        actor.set_user(user, counted=True)
        self.caps.joined(actor)
        self._handshake_done(actor)
        self.audit.auth_ok(user.name, actor.peer, method, actor.number)
        return None

    def _refuse_if_full(self, actor: ConnectionActor) -> tuple[ErrorCode, str] | None:
        if self.admitted < self.max_connections:
            return None
        self.stats.connections_refused += 1
        log.warning("refusing connection from %s: max_connections %d reached", actor.peer, self.max_connections)
        self.audit.limit_refused("", actor.peer, "max_connections", max_connections=self.max_connections)
        return (ErrorCode.TOO_MANY_CONNECTIONS,
                f"the broker holds its maximum of {self.max_connections} connections")

    # Connections before HELLO: capped in total and per source address; at a cap the oldest
    # one is evicted, so a flood of silent sockets cannot lock real clients out.

    def _track_handshake(self, number: int, peer_ip: str, evict: Callable[[], None]) -> None:
        """Count a new connection as pending, first evicting the oldest pending
        one from the same address (per-address cap) or from anywhere (total cap)."""
        cfg = self.config
        if self._pending_per_ip.get(peer_ip, 0) >= cfg.max_pending_handshakes_per_ip:
            oldest = next(n for n, (ip, _e) in self._pending.items() if ip == peer_ip)
            self._evict(oldest, "max_pending_handshakes_per_ip", cfg.max_pending_handshakes_per_ip)
        elif len(self._pending) >= self.max_pending_handshakes:
            self._evict(next(iter(self._pending)), "max_pending_handshakes", self.max_pending_handshakes)
        self._pending[number] = (peer_ip, evict)
        self._pending_per_ip[peer_ip] = self._pending_per_ip.get(peer_ip, 0) + 1

    def _evict(self, number: int, limit: str, value: int) -> None:
        peer_ip, evict = self._pending[number]
        self._untrack_handshake(number)
        self.stats.handshakes_evicted += 1
        self.audit.limit_refused("", peer_ip, limit, **{limit: value})
        evict()

    def _untrack_handshake(self, number: int) -> None:
        entry = self._pending.pop(number, None)
        if entry is None:
            return
        ip = entry[0]
        left = self._pending_per_ip[ip] - 1
        if left:
            self._pending_per_ip[ip] = left
        else:
            del self._pending_per_ip[ip]

    def _handshake_done(self, actor: ConnectionActor) -> None:
        self._untrack_handshake(actor.number)
        actor.admitted = True
        self.admitted += 1

    @property
    def pending_handshakes(self) -> int:
        return len(self._pending)

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
            # Only the epoch: the patterns follow in bindings NOTICEs (broker/net/bindings.py), so the
            # handshake reply stays small whatever is declared.
            "bindings": {"epoch": self.bindings.epoch},
        }

    async def serve_route(self, actor: ConnectionActor, hello: F.Hello) -> None:
        """A HELLO with the route option: another broker of the cluster (broker/cluster/mesh.py
        authenticates it); the connection is a route until it ends. Refused unless clustered."""
        self._untrack_handshake(actor.number)  # not a client: neither pending nor admitted,
        self.connections.pop(actor.number, None)  # nor told of shutdowns (the cluster closes routes)
        if self.cluster is None:
            actor.send_err(0, ErrorCode.BAD_STATE, "this broker is not in a cluster (cluster = false)")
            return
        await self.cluster.accept_route(actor.stream, hello.options, actor.peer)

    def opened(self, actor: ConnectionActor) -> None:
        """WELCOME is queued for ``actor``: the durable bindings it may see follow (NOTICEs)."""
        self.bindings.send(actor)

    def bindings_changed(self) -> None:
        """Tell every client the new set of durably bound patterns (before the
        declaring client's OK, which is queued after this)."""
        self.bindings.changed()

    def detach(self, actor: ConnectionActor) -> None:
        """Forget a closing connection: drop its subscriptions at once."""
        if self.connections.pop(actor.number, None) is None:
            return
        self._untrack_handshake(actor.number)
        if actor.admitted:
            actor.admitted = False
            self.admitted -= 1
        if actor.counted and self.users is not None:
            actor.counted = False
            self.users.release(actor.user)
        for sub in actor.subs.values():
            self.filtering.remove(self.router, sub)
        actor.subs.clear()
        self.caps.left(actor)
        self.durable.detach_all(actor)

    async def _handle_connection(self, stream: SocketStream) -> None:
        self._next_conn += 1
        number = self._next_conn
        try:
            addr = stream.extra(SocketAttribute.remote_address)
            host, port = (addr, 0) if isinstance(addr, str) else addr[:2]  # a str: a UNIX socket path
            peer_ip = str(host)
            peer = f"{host}:{port}"
        except (TypeError, ValueError, OSError, anyio.TypedAttributeLookupError):
            peer_ip = peer = "?"
        self.stats.connections_total += 1
        if self._ssl_context is not None:
            # The TLS handshake is part of the pending handshake: capped, evictable, timed out.
            tls_scope = anyio.CancelScope()
            self._track_handshake(number, peer_ip, tls_scope.cancel)
            wrapped = None
            try:
                with tls_scope:
                    wrapped = await self._tls_handshake(stream)
            finally:
                self._untrack_handshake(number)
            if wrapped is None:
                await anyio.aclose_forcefully(stream)
                return
            stream = wrapped
        actor = ConnectionActor(self, stream, number, peer, peer_ip)
        self._track_handshake(number, peer_ip, actor.evict)
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

    async def _tls_handshake(self, stream: SocketStream) -> Any:
        """The server side of a TLS handshake within the HELLO timeout; None if it failed."""
        try:
            with anyio.fail_after(self.config.hello_timeout):
                return await TLSStream.wrap(stream, server_side=True, ssl_context=self._ssl_context,
                                            standard_compatible=False)
        except Exception as exc:  # any failure of a stranger's handshake: one INFO line, then close
            await tls.BrokerTLSListener.handle_handshake_error(exc, stream)
            return None

    # ------------------------------------------------------------- calls

    def _stats_call(self, args: dict[str, Any]) -> dict[str, Any]:
        snap = self.stats.snapshot()
        snap["connections"] = len(self.connections)
        snap["pending_handshakes"] = len(self._pending)
        snap["max_connections"] = self.max_connections
        snap["subscriptions"] = self.subscription_count
        conns = self.connections.values()
        snap["outbound_bytes"] = sum(a.pending_bytes for a in conns)
        snap["outbound_bytes_max"] = max((a.pending_bytes for a in conns), default=0)
        snap["credit_waits"] = sum(a.credit_waits for a in conns)
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
        snap["store"]["state_failures"] = self.durable.state_failures
        snap["store"]["read_errors"] = self.durable.read_errors
        snap["pid"] = os.getpid()
        if self.cluster is not None:
            snap["cluster"] = self.cluster.info()
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
            # The TLS handshake runs in the connection's task (_handle_connection) within the HELLO
            # timeout: a peer that stalls in it holds a pending-handshake slot no longer.
            self._ssl_context = ssl_context
            self.clamp_to_fd_limit()
            async with anyio.create_task_group() as root:
                try:
                    await root.start(self.audit.run_flusher)
                    await root.start(self.monitor.run)
                    if cfg.http_port >= 0:
                        # Before recovery: liveness answers while readiness says 503. Imported
                        # here: the web stack is only loaded when the HTTP port is on.
                        from tidings.broker.http.app import build_server
                        self.http = build_server(self, cfg.http_host, cfg.http_port)
                        await root.start(self.http.run)
                    await self.durable.start(root)
                    await self.schemas.load()
                    if self.cluster is not None:
                        await self.cluster.start(root, self.bound_address)
                    await self._serve_connections(tcp, install_signals)
                finally:
                    with anyio.CancelScope(shield=True):
                        if self.http is not None:
                            # After the TCP clients drained (/readyz said 503 meanwhile), before the
                            # store closes: gateway publishes in flight get their confirms.
                            with anyio.move_on_after(HTTP_STOP_GRACE):
                                await self.http.stop()
                        if self.cluster is not None:
                            await self.cluster.close()
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

    def clamp_to_fd_limit(self) -> None:
        """Fit max_connections and max_pending_handshakes (one descriptor
        each) into RLIMIT_NOFILE minus FD_RESERVE, with a warning if they
        had to shrink. Pending handshakes keep at least a quarter of the
        budget (real clients need them to get in at all)."""
        cfg = self.config
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        # The HTTP port's connections have their own cap: keep descriptors for them too.
        http = cfg.http_max_connections if cfg.http_port >= 0 else 0
        budget = max(soft - FD_RESERVE - http, 2)
        pending = cfg.max_pending_handshakes
        conns = cfg.max_connections
        if conns + pending > budget:
            pending = min(pending, max(budget // 4, 1))
            conns = min(conns, budget - pending)
            log.warning("the open-file limit is %d: max_connections lowered from %d to %d and "
                        "max_pending_handshakes from %d to %d (%d descriptors are kept in reserve); "
                        "raise the limit (ulimit -n, LimitNOFILE=) to allow more", soft, cfg.max_connections,
                        conns, cfg.max_pending_handshakes, pending, FD_RESERVE + http)
        self.max_connections = conns
        self.max_pending_handshakes = pending

    async def _accept_loop(self, listener: SocketListener, tg: TaskGroup) -> None:
        """Accept connections into ``tg`` until cancelled. Running out of
        descriptors or kernel memory is logged and waited out (with
        backoff), never fatal: the connections we have keep being served."""
        backoff = ACCEPT_BACKOFF[0]
        failing = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_PEER_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_RESOURCE_ERRNOS:
                    raise
                self.stats.accept_errors += 1
                if not failing:
                    failing = True
                    log.error("cannot accept connections: %s; retrying with backoff, serving the %d open ones",
                              exc.strerror or exc, len(self.connections))
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                continue
            if failing:
                failing = False
                log.info("accepting connections again")
            backoff = ACCEPT_BACKOFF[0]
            tg.start_soon(self._handle_connection, stream)

    async def _serve_connections(self, listener: Any, install_signals: bool = True) -> None:
        cfg = self.config
        async with anyio.create_task_group() as ctg:
            self._tg = ctg
            accept_scope = anyio.CancelScope()
            accept_done = anyio.Event()

            async def accept_loop() -> None:
                try:
                    with accept_scope:
                        async with anyio.create_task_group() as atg:
                            for one in getattr(listener, "listeners", [listener]):
                                atg.start_soon(self._accept_loop, one, ctg)
                finally:
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()
                    accept_done.set()

            ctg.start_soon(accept_loop)
            assert self.bound_address is not None  # set by _listen() above
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
                    if self.freeze_gc_when_ready:
                        gc.freeze()
                    self.ready.set()
                    if signals is None:
                        await anyio.sleep_forever()
                    else:
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
        if self.cluster is not None:
            self.cluster.close_routes()
        for actor in list(self.connections.values()):
            actor.push_wire([F.Op.NOTICE, V.NOTICE_SHUTDOWN, {}])
            actor.close()
        if self._live:
            with anyio.move_on_after(SHUTDOWN_GRACE):
                await self._all_closed.wait()
        sys.stdout.flush()
