"""What the console does to queues: peek, purge, redrive a dead-letter queue.

Each action is the TCP call of the same name (``dlq.list``, ``queue.purge``,
``dlq.redrive``) with the same permission check and the same audit line:

* the user's permissions are checked with ``Permissions.check_call`` (and, for
  a redrive, ``redrive_needs`` on every queue it may move messages into), as
  broker/net/dispatch.py does: purge and redrive need ``admin`` on the queue,
  a peek reads payloads and needs ``consume`` (like ``dlq.list``);
* a refusal is audited as ``permission_denied``; every action that ran is
  audited as ``admin`` with its outcome.

A peek is non-destructive: it reads stored rows (``Store.list_messages``),
never takes a message from the queue. Payloads come back as text when they
are UTF-8 and as hex otherwise, both cut to ``PEEK_PAYLOAD_BYTES``; the page
shows them as text nodes, never as HTML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

from tidings.broker.durable.store.base import StorageError, StorageFull
from tidings.broker.http.errors import HttpError
from tidings.broker.security.permissions import redrive_needs

if TYPE_CHECKING:
    from tidings.broker.http.ports import HttpHost
    from tidings.broker.security.auth import User

#: Messages one peek returns at most (a page of the table in the browser).
PEEK_MAX: Final = 100
#: Payload bytes of each peeked message sent to the browser (the size is shown in full).
PEEK_PAYLOAD_BYTES: Final = 2048
#: Characters of a header value sent to the browser.
PEEK_HEADER_CHARS: Final = 512


def _payload(data: Any) -> dict[str, Any]:
    raw = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data).encode()
    cut = raw[:PEEK_PAYLOAD_BYTES]
    try:
        text, kind = cut.decode("utf-8"), "text"
    except UnicodeDecodeError as exc:
        if len(raw) > PEEK_PAYLOAD_BYTES and exc.start >= len(cut) - 3:  # a character cut in two at the end
            text, kind = cut[:exc.start].decode("utf-8"), "text"
        else:
            text, kind = cut.hex(" "), "hex"
    return {"kind": kind, "data": text, "size": len(raw), "truncated": len(raw) > PEEK_PAYLOAD_BYTES}


def _header(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value)[:PEEK_HEADER_CHARS // 2].hex()
    return str(value)[:PEEK_HEADER_CHARS]


class Actions:
    """Console actions on ``host``'s durable layer, checked and audited like TCP calls."""

    def __init__(self, host: HttpHost) -> None:
        self.host = host

    def _check(self, user: User, peer: str, method: str, args: dict[str, Any]) -> None:
        perms = user.permissions
        if perms.unrestricted:
            return
        need = perms.check_call(method, args)
        if need is None and method == "dlq.redrive":  # these needs depend on the queues that exist
            dests = self.host.durable.redrive_destinations(args)
            need = perms.first_unmet(redrive_needs((q.name, q.cfg.bind) for q in dests))
        if need is not None:
            self.host.audit.permission_denied(user.name, peer, need.action, need.name)
            raise HttpError(ErrorCode.PERMISSION_DENIED, f"permission denied: {need.action} on {need.name!r}")

    async def _run(self, user: User, peer: str, method: str, args: dict[str, Any]) -> Any:
        """Check, run and audit one call; broker errors become HttpErrors with their code."""
        self._check(user, peer, method, args)
        durable = self.host.durable
        outcome = "INTERNAL"
        try:
            if method == "queue.purge":
                result: Any = await durable.purge(args, 0)
            elif method == "dlq.redrive":
                result = await durable.redrive(args, 0)
            elif method == "dlq.list":
                result = await durable.dlq_list(args, 0)
            else:
                raise AssertionError(method)
            outcome = "ok"
            return result
        except RemoteProtocolError as exc:
            outcome = exc.code.name
            raise HttpError(exc.code, exc.message) from None
        except StorageError as exc:
            code = ErrorCode.STORAGE_FULL if isinstance(exc, StorageFull) else ErrorCode.STORAGE_ERROR
            outcome = code.name
            raise HttpError(code, f"storage: {exc}") from None
        finally:
            self.host.audit.admin(user.name, peer, method, args.get("name"), outcome)

    async def purge(self, user: User, peer: str, name: str) -> dict[str, Any]:
        """Remove every ready message of queue ``name``: {"purged": n}."""
        result: dict[str, Any] = await self._run(user, peer, "queue.purge", {"name": name})
        return result

    async def redrive(self, user: User, peer: str, name: str, to: str | None = None,
                      count: int | None = None) -> dict[str, Any]:
        """Move messages of dead-letter queue ``name`` back to their source queue (or ``to``):
        {"redriven": n, "skipped": m}."""
        args: dict[str, Any] = {"name": name}
        if to:
            args["to"] = to
        if count is not None:
            args["count"] = count
        result: dict[str, Any] = await self._run(user, peer, "dlq.redrive", args)
        return result

    async def peek(self, user: User, peer: str, name: str, limit: int, offset: int) -> dict[str, Any]:
        """Up to ``limit`` stored messages of queue ``name`` from ``offset``, made safe to show."""
        if not 1 <= limit <= PEEK_MAX or offset < 0:
            raise HttpError(ErrorCode.INVALID_ARGUMENT, f"limit must be 1..{PEEK_MAX} and offset >= 0")
        rows = await self._run(user, peer, "dlq.list", {"name": name, "limit": limit, "offset": offset})
        return {"queue": name, "offset": offset, "messages": [
            {"id": r["id"], "subject": r["subject"],
             "msg_id": None if r["msg_id"] is None else _header(r["msg_id"]),
             "published_ms": r["published_ms"],
             "deliveries": r["deliveries"], "payload": _payload(r["payload"]),
             "headers": {str(k)[:PEEK_HEADER_CHARS]: _header(v) for k, v in (r["headers"] or {}).items()}}
            for r in rows]}
