"""The web console at ``/`` of the HTTP port: a live view of the broker and its admin actions.

    part = console.routes(broker)     # a part of build_app (broker/http/app.py), after the others

- ``web.py``: the routes (the page, sign-in, the event stream, the actions) and
  their checks (session, CSRF token, Origin, loopback Host without users);
- ``sessions.py``: server-side sessions behind an HttpOnly, SameSite=Strict cookie;
- ``snapshot.py``: one snapshot per tick shared by every open page, cut per user
  to what its permissions let it see;
- ``actions.py``: peek, purge, redrive, checked and audited like their TCP calls;
- ``static/``: the page itself, plain HTML, CSS and JavaScript (no build step, no
  CDN: the files ship in the package).

Pages: overview, queues, streams, connections, and schemas (the schema registry's
schemas and subject bindings, read-only, from the same per-tick snapshot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidings.broker.http.console.web import Console

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from tidings.broker.http.ports import HttpHost


def routes(host: HttpHost) -> list[BaseRoute]:
    """The console's routes for ``host`` (one Console, its sessions and its snapshot hub)."""
    return Console(host).routes()
