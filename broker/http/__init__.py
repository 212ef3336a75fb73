"""The broker's HTTP port: one ASGI app (Starlette) served by uvicorn inside the
broker's event loop.

- ``app.py``: builds the app from the routes each part contributes (ops routes,
  the publish gateway, later the console);
- ``server.py``: ``HttpServer`` runs uvicorn as a task of the broker's task group,
  with the connection guard that keeps idle and slow clients from starving it;
- ``ops.py``: /metrics, /healthz, /readyz;
- ``gateway.py``: ``POST /v1/publish/{subject}``;
- ``auth.py``: bearer token / basic auth against the broker's users.
"""
