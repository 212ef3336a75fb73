"""The console's routes: the page, sign-in and out, the live event stream, the actions.

    GET  /                                   the console (index.html); 303 to sign-in without a session
    GET  /console/login                      the sign-in page     POST (JSON {user, password}): sign in
    POST /console/logout                     sign out
    GET  /console/api/session                who is signed in, the CSRF token for actions
    GET  /console/api/snapshot               one snapshot (what the event stream sends each tick)
    GET  /console/events                     text/event-stream: a snapshot per tick until the page leaves
    GET  /console/api/queues/{name}/messages peek (?limit=&offset=)
    POST /console/api/queues/{name}/purge    purge                POST .../redrive (JSON {to?, count?})
    GET  /console/static/...                 the page's CSS, JS and images (files of this package)

Every POST must carry the session's CSRF token in ``X-CSRF-Token`` and an
``Origin`` equal to the console's own; sign-in (no session yet) checks the
Origin. In no-users mode (the HTTP port is then loopback-only) nobody signs
in and every request is ANONYMOUS, but the ``Host`` must name a loopback
address (a foreign web page that resolves its own name to 127.0.0.1, DNS
rebinding, gets 403) and POSTs still need the broker's CSRF token, which
only a same-origin page can read. Every answer forbids framing, caching of
API data and any script, style or connection from another origin
(``Content-Security-Policy: default-src 'self'``).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from tidings.protocol.errors import ErrorCode

from tidings.broker.http.auth import peer_of
from tidings.broker.http.console.actions import PEEK_MAX, Actions
from tidings.broker.http.console.sessions import COOKIE, Session, Sessions, sign_in
from tidings.broker.http.console.snapshot import Hub
from tidings.broker.http.errors import HttpError
from tidings.broker.security.auth import ANONYMOUS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.types import ASGIApp

    from tidings.broker.http.ports import HttpHost
    from tidings.broker.security.auth import User

STATIC: Final = Path(__file__).parent / "static"
#: Pages with an open event stream at once; beyond it a page gets 503 and retries
#: (each costs one connection of http_max_connections and one view per tick).
MAX_VIEWERS: Final = 64
#: Largest JSON body a console POST may carry (sign-in, redrive options).
MAX_BODY: Final = 4096
#: Milliseconds a page waits before reconnecting its event stream (the ``retry:`` field).
RECONNECT_MS: Final = 2000
SECURITY_HEADERS: Final = {
    "Content-Security-Policy":
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
HEADER_PAIRS: Final = tuple((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items())
NO_STORE: Final = {"Cache-Control": "no-store"}


def _secure(resp: Response, cache: bool = False) -> Response:
    resp.headers.update(SECURITY_HEADERS)
    if not cache:
        resp.headers.update(NO_STORE)
    return resp


def _json(data: Any, status: int = 200) -> Response:
    return _secure(JSONResponse(data, status_code=status))


class _StaticWithHeaders:
    """The package's static files, each answer with the security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADER_PAIRS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _loopback_host(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Console:
    """The console of one broker: its sessions, its snapshot hub, its actions."""

    def __init__(self, host: HttpHost) -> None:
        self.host = host
        self.sessions = Sessions()
        self.hub = Hub(host)
        self.actions = Actions(host)

    @property
    def auth(self) -> bool:
        return self.host.users is not None

    # ------------------------------------------------------------ checks

    def _guard_host(self, request: Request) -> None:
        if not self.auth and not _loopback_host(request.headers.get("host", "")):
            raise HttpError(ErrorCode.PERMISSION_DENIED, "without users the console answers only to a "
                            "loopback Host (localhost, 127.0.0.1, [::1])", status=403)

    def _session(self, request: Request) -> tuple[User, Session | None]:
        """The caller's user and session; raises HttpError 401 without a live session."""
        self._guard_host(request)
        if not self.auth:
            return ANONYMOUS, None
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None:
            raise HttpError(ErrorCode.AUTH_FAILED, "not signed in (or the session expired): sign in again",
                            headers={"WWW-Authenticate": 'Cookie realm="tidings console"'})
        return s.user, s

    @staticmethod
    def _check_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != expected:
            raise HttpError(ErrorCode.PERMISSION_DENIED, "cross-origin request refused (Origin must be "
                            f"{expected})", status=403)

    def _check_post(self, request: Request, session: Session | None) -> None:
        self._check_origin(request)
        token = request.headers.get("x-csrf-token")
        ok = session.csrf_ok(token) if session is not None else (
            token is not None and Session(ANONYMOUS, self.sessions.open_csrf, 0, 0).csrf_ok(token))
        if not ok:
            raise HttpError(ErrorCode.PERMISSION_DENIED, "missing or wrong CSRF token (X-CSRF-Token)",
                            status=403)

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        """The request's JSON object ({} when empty); 413 beyond MAX_BODY, 400 if not an object."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(ErrorCode.LIMIT_EXCEEDED, f"body larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(ErrorCode.INVALID_ARGUMENT, "body is not JSON") from None
        if not isinstance(data, dict):
            raise HttpError(ErrorCode.INVALID_ARGUMENT, "body must be a JSON object")
        return data

    # ------------------------------------------------------------ pages

    async def index(self, request: Request) -> Response:
        self._guard_host(request)
        if self.auth and self.sessions.get(request.cookies.get(COOKIE)) is None:
            return _secure(RedirectResponse("/console/login", status_code=303))
        return _secure(FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8"))

    async def login_page(self, request: Request) -> Response:
        self._guard_host(request)
        if not self.auth:
            return _secure(RedirectResponse("/", status_code=303))
        return _secure(FileResponse(STATIC / "login.html", media_type="text/html; charset=utf-8"))

    async def login(self, request: Request) -> Response:
        self._guard_host(request)
        self._check_origin(request)
        users = self.host.users
        if users is None:
            raise HttpError(ErrorCode.INVALID_ARGUMENT,
                            "no users are configured: the console needs no sign-in")
        body = await self._body(request)
        ip, peer = peer_of(request)
        user = await sign_in(users, self.host.audit, body.get("user"), body.get("password"), ip, peer)
        s = self.sessions.create(user)
        resp = _json({"user": user.name, "csrf": s.csrf})
        resp.set_cookie(COOKIE, s.token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
        return resp

    async def logout(self, request: Request) -> Response:
        user, s = self._session(request)
        self._check_post(request, s)
        self.sessions.end(request.cookies.get(COOKIE))
        self.host.audit.event("console_sign_out", user.name, peer_of(request)[1])
        resp = _json({"signed_out": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
        return resp

    async def session_info(self, request: Request) -> Response:
        user, s = self._session(request)
        return _json({"auth": self.auth, "user": user.name or None,
                      "csrf": s.csrf if s is not None else self.sessions.open_csrf,
                      "tls": request.url.scheme == "https", "interval": self.hub.interval,
                      "schemas": True})  # the broker has a schema registry: show the Schemas tab

    # ------------------------------------------------------------ live data

    async def snapshot(self, request: Request) -> Response:
        user, _s = self._session(request)
        return _secure(Response(await self.hub.frame(user), media_type="application/json"))

    async def events(self, request: Request) -> Response:
        user, _s = self._session(request)
        if self.hub.viewers >= MAX_VIEWERS:
            raise HttpError(ErrorCode.OVERLOADED, f"{MAX_VIEWERS} console pages are open already")
        token = request.cookies.get(COOKIE)
        hub, host, sessions, auth = self.hub, self.host, self.sessions, self.auth

        async def stream() -> AsyncIterator[bytes]:
            hub.viewers += 1
            try:
                yield f"retry: {RECONNECT_MS}\n\n".encode()
                # Ends when the page leaves (Starlette cancels it), when the broker shuts down,
                # and when the session ends (signed out or expired).
                tick = hub.tick()
                while not host.shutting_down and (not auth or sessions.get(token) is not None):
                    yield b"event: snapshot\ndata: " + await hub.frame(user) + b"\n\n"
                    tick = await hub.next_tick(tick)
                yield b"event: end\ndata: {}\n\n"
            finally:
                hub.viewers -= 1

        return _secure(StreamingResponse(stream(), media_type="text/event-stream",
                                         headers={"X-Accel-Buffering": "no"}))

    # ------------------------------------------------------------ actions

    async def peek(self, request: Request) -> Response:
        user, _s = self._session(request)
        try:
            limit = int(request.query_params.get("limit", "20"))
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            raise HttpError(ErrorCode.INVALID_ARGUMENT,
                            f"limit (1..{PEEK_MAX}) and offset must be integers") from None
        name = request.path_params["name"]
        return _json(await self.actions.peek(user, peer_of(request)[1], name, limit, offset))

    async def purge(self, request: Request) -> Response:
        user, s = self._session(request)
        self._check_post(request, s)
        return _json(await self.actions.purge(user, peer_of(request)[1], request.path_params["name"]))

    async def redrive(self, request: Request) -> Response:
        user, s = self._session(request)
        self._check_post(request, s)
        body = await self._body(request)
        to, count = body.get("to"), body.get("count")
        if (to is not None and not isinstance(to, str)) or (count is not None and type(count) is not int):
            raise HttpError(ErrorCode.INVALID_ARGUMENT, "to must be a queue name and count an integer")
        name = request.path_params["name"]
        return _json(await self.actions.redrive(user, peer_of(request)[1], name, to, count))

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET", "HEAD"]),
            Route("/console/login", self.login_page, methods=["GET", "HEAD"]),
            Route("/console/login", self.login, methods=["POST"]),
            Route("/console/logout", self.logout, methods=["POST"]),
            Route("/console/api/session", self.session_info, methods=["GET"]),
            Route("/console/api/snapshot", self.snapshot, methods=["GET"]),
            Route("/console/events", self.events, methods=["GET"]),
            Route("/console/api/queues/{name}/messages", self.peek, methods=["GET"]),
            Route("/console/api/queues/{name}/purge", self.purge, methods=["POST"]),
            Route("/console/api/queues/{name}/redrive", self.redrive, methods=["POST"]),
            Mount("/console/static", app=_StaticWithHeaders(StaticFiles(directory=STATIC)),
                  name="console-static"),
        ]
