"""The HTTP port: uvicorn serving the broker's ASGI app inside the broker's event loop.

    server = HttpServer(app, "127.0.0.1", 0, max_connections=256, header_timeout=10.0)
    await tg.start(server.run)   # binds, prints "tidings http on http://HOST:PORT", reports (host, port)
    ...
    await server.stop()          # graceful: stop accepting, let requests in flight finish (bounded)

uvicorn is a maintained HTTP/1.1 server (h11 parser, keep-alive, flow control,
pipelining) instead of the hand-written listener it replaces. It runs as one
task of the broker's task group on the broker's own loop: no second loop, no
thread, no lifespan (the broker owns start-up and shutdown), and it installs no
signal handlers (the broker's ordered shutdown calls :meth:`HttpServer.stop`).

What uvicorn does not bound, :class:`GuardedH11Protocol` does (issue 10.5: 32
silent sockets used to starve /healthz, and a liveness probe then kills a
healthy broker):

* a request head must be complete within ``header_timeout`` seconds of the
  connection opening (or of the previous response): a silent socket or a
  slow-loris sender dripping a byte at a time is answered ``408`` and closed
  (uvicorn itself only times out idle keep-alive connections);
* a head larger than ``MAX_REQUEST_HEAD`` is answered ``431`` (h11's
  incomplete-event limit);
* at ``max_connections`` open connections a new one closes the oldest that
  waits on its peer (idle, still sending its head or body, or not reading
  its answer): idle and slow clients can never lock probes out. Only when
  every connection is being answered (bounded work) is the new one closed;
* uvicorn's ``limit_concurrency`` (503 beyond it) bounds requests in progress,
  those whose client has gone included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any, ClassVar, Final

import anyio
import h11
import uvicorn
from anyio.abc import TaskStatus
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: Largest request head (request line and headers) accepted; 431 beyond. A scrape or a
#: gateway publish with its tidings-*/ce-* headers is well under 8 KiB.
MAX_REQUEST_HEAD: Final = 16 * 1024
#: Seconds an idle keep-alive connection stays open after its last response.
KEEP_ALIVE: Final = 5
#: Seconds requests in flight get to finish when the broker shuts down (then they are cancelled).
GRACEFUL_SHUTDOWN: Final = 5
#: Pending connections the kernel queues before accept().
BACKLOG: Final = 1024
#: uvicorn's limit_concurrency, per allowed connection: requests in progress (those whose
#: client left while the broker works on them included) beyond which it answers 503.
CONCURRENCY_PER_CONNECTION: Final = 2


def _plain(status: int, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
            ).encode("latin-1") + body


RESPONSE_408: Final = _plain(408, "Request Timeout")
RESPONSE_431: Final = _plain(431, "Request Header Fields Too Large")


class ConnectionGuard:
    """The open connections of one HTTP server, oldest first, and the caps on them."""

    def __init__(self, max_connections: int, header_timeout: float, max_head: int = MAX_REQUEST_HEAD) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.max_head = max_head
        self.conns: dict[GuardedH11Protocol, None] = {}  # insertion order = oldest first
        self.evicted = 0  # closed to make room for a newer connection
        self.refused = 0  # closed at once: every open connection was being answered
        self.timed_out = 0  # answered 408: no complete request head within header_timeout

    @property
    def active(self) -> int:
        return len(self.conns)

    def opened(self, conn: GuardedH11Protocol) -> bool:
        """Count a new connection, first making room if at the cap; False: refuse it."""
        if len(self.conns) >= self.max_connections and not self._make_room():
            self.refused += 1
            return False
        self.conns[conn] = None
        return True

    def closed(self, conn: GuardedH11Protocol) -> None:
        self.conns.pop(conn, None)

    def _make_room(self) -> bool:
        for conn in self.conns:
            if conn.waiting_on_peer():
                del self.conns[conn]
                self.evicted += 1
                conn.evict()
                return True
        return False


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a 431 for oversized
    heads and the connection cap of its server's :class:`ConnectionGuard`
    (a subclass per server sets ``guard``)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes received since the current request head began

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.opened(self):
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is complete (or the request failed and the connection closes)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request head gets header_timeout too

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.guard.max_head:  # h11 refused the head for its size
            self.transport.write(RESPONSE_431)
            self.transport.close()
            return
        super().send_400_response(msg)

    def waiting_on_peer(self) -> bool:
        """Idle, still sending its request head or body, or not reading its answer."""
        state = self.conn.their_state
        return state is h11.IDLE or state is h11.SEND_BODY or self.flow.write_paused

    def evict(self) -> None:
        self._disarm()
        self.transport.abort()  # abort, not close: a peer that does not read would keep it open

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.guard.timed_out += 1
        self.transport.write(RESPONSE_408)
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the broker owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (the first address ``host`` resolves to)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class HttpServer:
    """One uvicorn server for ``app`` on ``host:port``, run by :meth:`run` in the
    broker's task group and ended by :meth:`stop` (or by cancelling that task)."""

    def __init__(self, app: Any, host: str, port: int, *, max_connections: int, header_timeout: float) -> None:
        self.host = host
        self.port = port
        self.guard = ConnectionGuard(max_connections, header_timeout)
        protocol = type("BrokerH11Protocol", (GuardedH11Protocol,), {"guard": self.guard})
        self.config = uvicorn.Config(
            app, http=protocol, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, timeout_keep_alive=KEEP_ALIVE, h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
            limit_concurrency=CONCURRENCY_PER_CONNECTION * max_connections,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN, backlog=BACKLOG)
        self.server = _Server(self.config)
        # uvicorn logs a WARNING per malformed request: a hostile client must not flood the log.
        # Its errors (an endpoint raising) still show; so does everything at --log-level debug.
        uv = logging.getLogger("uvicorn.error")
        if uv.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
            uv.setLevel(logging.ERROR)
        self.address: tuple[str, int] | None = None
        self._stopped = anyio.Event()

    async def run(self, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, print ``tidings http on http://HOST:PORT`` (and the older ``tidings metrics
        on`` line, same address, for scripts that read it), report ``(host, port)``, serve
        until :meth:`stop` or cancellation. Raises OSError if it cannot bind."""
        sock = _bind(self.host, self.port)
        addr = sock.getsockname()
        self.address = bound = (str(addr[0]), int(addr[1]))
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"tidings http on http://{shown}:{bound[1]}", flush=True)
        print(f"tidings metrics on http://{shown}:{bound[1]}", flush=True)
        log.info("http on http://%s:%d (/metrics, /healthz, /readyz, /v1/publish)", shown, bound[1])
        task_status.started(bound)
        try:
            await self.server.serve(sockets=[sock])
        finally:
            self._close_now()
            sock.close()
            self._stopped.set()

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (at most
        GRACEFUL_SHUTDOWN seconds), then return. A no-op if the server is not running."""
        if self.address is None or self._stopped.is_set():
            return
        self.server.should_exit = True
        await self._stopped.wait()

    def _close_now(self) -> None:
        """After a cancellation (or a graceful stop, where this finds nothing left):
        no listener, no connection and no request task outlives the server."""
        for srv in getattr(self.server, "servers", ()):
            srv.close()
        for conn in list(self.server.server_state.connections):
            conn.transport.abort()
        for task in list(self.server.server_state.tasks):
            task.cancel()
