"""The broker's ASGI app, built from the routes its parts contribute.

    app = build_app(ops.routes(...), gateway.routes())       # one Starlette app
    server = build_server(broker)                             # the whole HTTP port of a broker

A part is a list of Starlette routes or mounts (``Route``, ``Mount``): the ops
endpoints (ops.py), the publish gateway (gateway.py), the console (a ``Mount``
at ``/`` with its static files). Parts are matched in the order given; a plain
index at ``/`` comes last, so a part mounted at ``/`` takes its place. An
``HttpError`` raised by any endpoint becomes its JSON answer (errors.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tidings.broker.http import console, ops
from tidings.broker.http.auth import HttpAuth
from tidings.broker.http.errors import HttpError
from tidings.broker.http.gateway import Gateway
from tidings.broker.http.server import ConnectionGuard, HttpServer
from tidings.broker.ops.metrics import Metrics, install_hooks

if TYPE_CHECKING:
    from tidings.broker.http.ports import HttpHost

INDEX: Final = b"tidings: /metrics /healthz /readyz POST /v1/publish/SUBJECT\n"


async def _index(request: Request) -> Response:
    if request.method not in ops.READ_METHODS:
        return Response(b"Method Not Allowed\n", 405, headers={**ops.OPS_HEADERS, "Allow": "GET, HEAD"},
                        media_type=ops.TEXT)
    return Response(INDEX, 200, headers=ops.OPS_HEADERS, media_type=ops.TEXT)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return exc.response()


def build_app(*parts: Iterable[BaseRoute]) -> Starlette:
    """One app serving every part's routes, in order, then the index at ``/``."""
    routes: list[BaseRoute] = [r for part in parts for r in part]
    routes.append(Route("/", _index, methods=None))
    return Starlette(routes=routes, exception_handlers={HttpError: _http_error})


def build_server(broker: HttpHost, host: str, port: int, *, metrics: Metrics | None = None,
                 extra: Sequence[Iterable[BaseRoute]] = (), header_timeout: float | None = None) -> HttpServer:
    """The HTTP port of ``broker``: ops routes, the publish gateway, any ``extra``
    parts and the console (before the index), served on ``host:port``. Installs the metrics hooks unless
    ``metrics`` is given."""
    cfg = broker.config
    if metrics is None:
        metrics = install_hooks(broker)
    auth = HttpAuth(broker.users, broker.audit)
    # The console comes last: it serves "/" (the plain index steps aside) and /console/...
    app = build_app(ops.routes(broker, metrics, auth, metrics_public=cfg.metrics_public),
                    Gateway(broker, auth).routes(), *extra, console.routes(broker))
    server = HttpServer(app, host, port, max_connections=cfg.http_max_connections,
                        header_timeout=cfg.http_header_timeout if header_timeout is None else header_timeout)
    # Read on the loop with the histograms, so a scrape's numbers are one instant's.
    metrics.histograms.register(GuardCollector(server.guard))
    return server


class GuardCollector:
    """``tidings_http_*``: the HTTP port's connections and what its guard closed."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        g = self.guard
        yield GaugeMetricFamily("tidings_http_connections", "HTTP connections open now.", value=g.active)
        yield CounterMetricFamily("tidings_http_evicted", "HTTP connections closed to make room at "
                                  "http_max_connections (the oldest one waiting on its client).", value=g.evicted)
        yield CounterMetricFamily("tidings_http_refused", "HTTP connections closed at once at "
                                  "http_max_connections (every open one was being answered).", value=g.refused)
        yield CounterMetricFamily("tidings_http_header_timeouts", "HTTP connections answered 408: no complete "
                                  "request head within http_header_timeout.", value=g.timed_out)

