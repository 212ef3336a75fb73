"""/metrics, /healthz (and /livez), /readyz on the HTTP port.

Their behaviour is the hand-written listener's, which these routes replace:
GET or HEAD (405 with ``Allow: GET, HEAD`` otherwise), ``Cache-Control:
no-store``, ``Connection: close`` (one request per connection, as before:
probes and scrapers open one at a time), the same bodies. What they read
comes from ops/metrics.py (``Metrics.render``, ``readiness``).

With users configured /metrics needs a login (bearer token or basic auth)
of a user allowed admin on every name (``admin = [">"]``, what the ``stats``
call needs), unless ``metrics_public = true``: it names every queue, stream
and consumer group. /healthz and /readyz stay open for probes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import Receive, Scope, Send

from tidings.protocol.errors import ErrorCode

from tidings.broker.http.errors import HttpError
from tidings.broker.ops.metrics import readiness
from tidings.broker.security.permissions import ALL_NAMES

if TYPE_CHECKING:
    from tidings.broker.http.auth import HttpAuth
    from tidings.broker.ops.metrics import Metrics
    from tidings.broker.ops.view import BrokerView

TEXT: Final = "text/plain; charset=utf-8"
READ_METHODS: Final = ("GET", "HEAD")
#: Headers of every ops answer: never cached, one request per connection (as before).
OPS_HEADERS: Final = {"Cache-Control": "no-store", "Connection": "close"}


def _plain(status: int, body: bytes, media_type: str = TEXT, **extra: str) -> Response:
    return Response(body, status_code=status, media_type=media_type, headers={**OPS_HEADERS, **extra})


def _method_not_allowed() -> Response:
    return _plain(405, b"Method Not Allowed\n", Allow="GET, HEAD")


def routes(broker: BrokerView, metrics: Metrics, auth: HttpAuth, *, metrics_public: bool) -> list[BaseRoute]:
    """The ops routes of ``broker``; /metrics asks for a login when ``auth`` has users
    and ``metrics_public`` is false."""
    guarded = auth.enabled and not metrics_public

    async def metrics_endpoint(request: Request) -> Response:
        if request.method not in READ_METHODS:
            return _method_not_allowed()
        if guarded:
            try:
                user = await auth.user(request)
            except HttpError as exc:
                return _with_ops_headers(exc)
            if not user.permissions.allows("admin", ALL_NAMES):
                auth.audit.permission_denied(user.name, f"{request.client.host if request.client else '?'}",
                                             "admin", "/metrics")
                return _with_ops_headers(HttpError(ErrorCode.PERMISSION_DENIED,
                                                   "/metrics needs admin on every name (admin = [\">\"])"))
        body, content_type = await metrics.render(request.headers.get("accept", ""))
        return _plain(200, body, content_type)

    async def health(request: Request) -> Response:
        if request.method not in READ_METHODS:
            return _method_not_allowed()
        return _plain(200, b"ok\n")

    async def ready(request: Request) -> Response:
        if request.method not in READ_METHODS:
            return _method_not_allowed()
        r = readiness(broker)
        text = "".join(f"{k}: {str(v).lower()}\n" for k, v in r.items())
        return _plain(200 if r["ready"] else 503, text.encode())

    return [Route("/metrics", AnyMethod(metrics_endpoint)),
            Route("/healthz", AnyMethod(health)),
            Route("/livez", AnyMethod(health)),
            Route("/readyz", AnyMethod(ready))]


class AnyMethod:
    """An endpoint that sees every method and answers 405 itself (with ``Allow: GET, HEAD``
    in that order). Starlette gives a plain function route ``methods = {GET, HEAD}`` and
    answers other methods on its own, its Allow header ordered by set iteration, which
    changes with PYTHONHASHSEED; an ASGI app (this class) is passed every method."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _with_ops_headers(exc: HttpError) -> Response:
    resp = exc.response()
    resp.headers["Connection"] = "close"
    return resp
