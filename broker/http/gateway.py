"""The publish gateway: ``POST /v1/publish/{subject}``, the body as the payload.

    curl -X POST http://127.0.0.1:9421/v1/publish/orders.created \\
         -H 'Authorization: Bearer TOKEN' -H 'Content-Type: application/json' \\
         -H 'Tidings-Msg-Id: order-17' -d '{"order": 17}'

A request is one PUB message, admitted the way a TCP publish is:

* the same login (auth.py: the users of broker/security/auth.py) and the same
  permission (``publish`` on the subject), denials audited;
* the same message rules (protocol/codec.py ``check_pub_message``: subject,
  headers and their reserved names, options, ``max_payload``);
* the same fan-out (net/publish.py ``route``: subscribers now, queue groups once)
  and the same durable admission (``Admission.publish``: de-dup by ``msg_id``
  per user, ``max_length``, ids and offsets, one store operation), refused
  with STORAGE_FULL below ``min_free_disk`` and OVERLOADED above
  ``memory_high_water`` (a TCP publisher is paused instead; HTTP has no
  connection to stop reading, so it is told to retry).

Request headers: ``Tidings-NAME: v`` becomes message header ``NAME`` (names
starting with ``tidings-`` are the broker's own in a message, hence the prefix is
taken off), ``ce-*`` (CloudEvents binary mode), ``Content-Type`` and the W3C
trace context (``traceparent``, ``tracestate``) are kept as they are;
``Tidings-Msg-Id`` and ``Tidings-Key`` (or the query parameters ``msg_id`` and
``key``) are the publish options. Other headers are not copied.

Answers: durable targets answer once the message is committed, with the
confirm a TCP publisher gets (``id``, ``queues``; ``stream``, ``partition``,
``offset``; ``duplicate``) as JSON, ``200``; subscribers only: ``202`` with how
many got it; nobody at all: ``404 NO_ROUTE`` (the message is dropped; a typo
in a webhook's subject shows up at once). Errors: errors.py. docs/HTTP.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.codec import check_pub_message
from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.http.auth import HttpAuth, peer_of
from tidings.broker.http.errors import HttpError
from tidings.broker.net.publish import route, route_filtered

if TYPE_CHECKING:
    from tidings.broker.http.ports import HttpHost
    from tidings.broker.security.auth import User

#: Request header prefix whose headers become message headers (prefix removed).
HEADER_PREFIX: Final = V.RESERVED_HEADER_PREFIX
#: Kept as they are: CloudEvents' binary-mode attributes.
CE_PREFIX: Final = "ce-"
#: Kept as they are too: the W3C trace context an instrumented HTTP client sends, so the
#: trace goes on through the broker to the consumers (docs/PROTOCOL.md, "Trace context").
TRACE_HEADERS: Final = frozenset({V.TRACEPARENT, V.TRACESTATE})
#: Request headers that are publish options, and the query parameters that may carry them instead.
OPTION_HEADERS: Final = {"tidings-msg-id": F.OPT_MSG_ID, "tidings-key": F.OPT_KEY}
OPTION_PARAMS: Final = {"msg_id": F.OPT_MSG_ID, "key": F.OPT_KEY}
SEQ: Final = 1  # the one message's sequence number: asks Admission for its confirm


class HttpPeer:
    """What the durable admission sees of an HTTP publish (durable/ports.py ``Peer``,
    the part a publish uses): who publishes, and where the one CONFIRM goes."""

    __slots__ = ("user", "peer", "name", "number", "consumers", "outcome", "done")

    def __init__(self, user: User, peer: str) -> None:
        self.user = user
        self.peer = peer
        self.name = "http"
        self.number = 0
        self.consumers: dict[int, Any] = {}
        self.outcome: list[Any] | None = None  # [seq, code, result]
        self.done = anyio.Event()

    def push_wire(self, value: list[Any], size: int = 64) -> None:
        if value[0] == F.Op.CONFIRM:
            for item in value[1]:
                if item[0] == SEQ:
                    self.outcome = item
                    self.done.set()


class Gateway:
    """The publish endpoint of one broker."""

    def __init__(self, broker: HttpHost, auth: HttpAuth) -> None:
        self.broker = broker
        self.auth = auth

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/publish/{subject:path}", self.publish, methods=["POST"])]

    async def publish(self, request: Request) -> Response:
        try:
            return await self._publish(request)
        except HttpError as exc:
            return exc.response()

    async def _publish(self, request: Request) -> Response:
        broker = self.broker
        cfg = broker.config
        user = await self.auth.user(request)
        if broker.shutting_down:
            raise HttpError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
        subject = request.path_params["subject"]
        headers, opts = self._headers_and_options(request)
        message = [subject, b"", headers or None, None, SEQ, opts or None]
        try:
            check_pub_message(message, cfg.max_payload)  # the body is checked by size below
        except RemoteProtocolError as exc:
            code = exc.code if exc.code is not ErrorCode.PROTOCOL_ERROR else ErrorCode.INVALID_ARGUMENT
            raise HttpError(code, exc.message) from None
        _ip, peer = peer_of(request)
        if not user.permissions.allows("publish", subject):
            broker.audit.permission_denied(user.name, peer, "publish", subject)
            raise HttpError(ErrorCode.PERMISSION_DENIED, f"permission denied: publish on {subject!r}")
        message[F.P_PAYLOAD] = await self._body(request)
        monitor = broker.monitor
        if monitor.memory_high:
            raise HttpError(ErrorCode.OVERLOADED, "the broker is above memory_high_water: retry later")
        schemas = broker.schemas
        verdict = schemas.screen(message) if schemas.active else None  # validation at the door
        broker.stats.published += 1
        if verdict is not None:
            violation, dead = verdict
            if dead is None:
                raise HttpError(ErrorCode.SCHEMA_VIOLATION, violation.message())
            # on_invalid = "dead_letter": stored in the binding's queue, routed nowhere else
            return await self._store(broker, user, peer, subject, [dead], 0, 202,
                                     {"dead_lettered": dead[1][0].name if hasattr(dead[1][0], "name")
                                      else str(dead[1][0]), "violation": violation.message()})
        plain, groups = broker.router.match(subject)
        subscribers = len(plain) + len(groups)
        fl = broker.filtering
        if fl.active:
            entries, _confirms = route_filtered(broker.router, broker.durable_match, [message], fl)
        else:
            entries, _confirms = route(broker.router, broker.durable_match, [message])
        if not entries:
            if not subscribers:
                raise HttpError(ErrorCode.NO_ROUTE, f"no subscriber and no queue or stream is bound to "
                                f"{subject!r}: the message was dropped")
            return JSONResponse({"subject": subject, "stored": False, "subscribers": subscribers}, 202)
        return await self._store(broker, user, peer, subject, entries, subscribers, 200, None)

    async def _store(self, broker: HttpHost, user: User, peer: str, subject: str, entries: list[Any],
                     subscribers: int, status: int, extra: dict[str, Any] | None) -> Response:
        """Admit ``entries`` to their durable targets and answer with the confirm once committed."""
        monitor = broker.monitor
        if monitor.disk_low:
            broker.audit.limit_refused(user.name, peer, "min_free_disk", refused=1)
            raise HttpError(ErrorCode.STORAGE_FULL, "not stored: free disk space below min_free_disk")
        sender = HttpPeer(user, peer)
        with anyio.CancelScope(shield=True):  # once admitted, the publish runs to its confirm
            await broker.publish_durable(sender, entries)
        await sender.done.wait()
        assert sender.outcome is not None
        _seq, code, result = sender.outcome
        if code:
            raise HttpError(ErrorCode(code), str(result))
        body = {"subject": subject, "stored": True, "subscribers": subscribers}
        if isinstance(result, dict):
            body.update(result)
        elif type(result) is int:  # the compact confirm of a message stored in one queue (PROTOCOL.md 7.8)
            body.update(id=result, queues=1)
        if extra:
            body.update(extra)
        return JSONResponse(body, status)

    @staticmethod
    def _headers_and_options(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        headers: dict[str, Any] = {}
        opts: dict[str, Any] = {}
        for raw_name, raw_value in request.headers.raw:
            name = raw_name.decode("latin-1").lower()
            if name in OPTION_HEADERS:
                key = OPTION_HEADERS[name]
            elif name in V.PUBLISHER_HEADERS:  # tidings- headers a publisher may set: kept as they are
                key = name
            elif name.startswith(HEADER_PREFIX):
                key = name[len(HEADER_PREFIX):]
                if not key:
                    raise HttpError(ErrorCode.INVALID_ARGUMENT, f"header {raw_name.decode('latin-1')!r} names "
                                    "no message header")
            elif name.startswith(CE_PREFIX) or name == "content-type" or name in TRACE_HEADERS:
                key = name
            else:
                continue
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise HttpError(ErrorCode.INVALID_ARGUMENT, f"header {name!r} is not UTF-8") from None
            target = opts if name in OPTION_HEADERS else headers
            if key in target and target[key] != value:
                raise HttpError(ErrorCode.INVALID_ARGUMENT, f"header {name!r} is given twice")
            target[key] = value
        for param, value in request.query_params.multi_items():
            option = OPTION_PARAMS.get(param)
            if option is None:
                raise HttpError(ErrorCode.INVALID_ARGUMENT, f"unknown query parameter {param!r} "
                                f"(known: {', '.join(OPTION_PARAMS)})")
            if option in opts and opts[option] != value:
                raise HttpError(ErrorCode.INVALID_ARGUMENT, f"{param} is given twice, with different values")
            opts[option] = value
        return headers, opts

    async def _body(self, request: Request) -> bytes:
        """The request body, at most http_max_body bytes (413 beyond) within http_body_timeout (408)."""
        cfg = self.broker.config
        limit = cfg.http_body_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(ErrorCode.LIMIT_EXCEEDED, f"body of {declared} bytes exceeds http_max_body {limit}",
                            status=413)
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(cfg.http_body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HttpError(ErrorCode.LIMIT_EXCEEDED, f"body exceeds http_max_body {limit}", status=413,
                                        headers={"Connection": "close"})
                    chunks.append(chunk)
        except TimeoutError:
            raise HttpError(ErrorCode.TIMEOUT, f"the body did not arrive within http_body_timeout "
                            f"({cfg.http_body_timeout}s)", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise HttpError(ErrorCode.INVALID_ARGUMENT, "the client went away before sending its body") from None
        return b"".join(chunks)
