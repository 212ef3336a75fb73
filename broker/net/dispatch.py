"""Request dispatch: every frame of a connection past HELLO but PUB and PING.

The connection actor hands each request to its port (``handle_request``,
net/ports.py); the Broker wires that to a ``Dispatcher``, which checks the
connection's permissions and caps, then goes to the pub/sub router (SUB,
UNSUB), the durable layer (CONSUME, STOP, ACK) or a CALL handler (the
broker's own ``stats``/``server.info`` and the durable layer's and backup's
methods). Denials and state-changing calls are audited here. PUB messages
are checked by the connection actor itself, on its hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Final

from tidings.protocol import ErrorCode, RemoteProtocolError
from tidings.protocol import frames as F
from tidings.protocol.filters import FilterError

from tidings.broker.net.connection import ConnectionActor, Subscription
from tidings.broker.net.publish import Filtering
from tidings.broker.router import Router
from tidings.broker.security.permissions import Need, redrive_needs

if TYPE_CHECKING:
    from tidings.broker.durable.core import Durable
    from tidings.broker.net.caps import Caps
    from tidings.broker.security.audit import AuditLog

# Every call is written to the audit log except these, which read only counters and settings (a
# dashboard polling them would drown the log). Calls that change state or read messages (dlq.list,
# backup) are audited, and so is any call added later unless it is listed here: fail closed.
UNAUDITED_CALLS: Final = frozenset({"stats", "server.info", "queue.list", "queue.info", "dlq.count",
                                    "stream.list", "stream.info", "stream.groups",
                                    "schema.get", "schema.list", "schema.bindings", "schema.check"})


class Dispatcher:
    """Answers the requests of every connection (owned by the Broker, event loop thread).

    ``calls`` are the broker's own CALL methods (``handler(args)``);
    ``durable_calls`` the durable layer's and backup's (``handler(args, rid)``,
    maybe a coroutine)."""

    def __init__(self, *, router: Router[Subscription], caps: Caps, durable: Durable, audit: AuditLog,
                 calls: dict[str, Callable[[dict[str, Any]], Any]],
                 durable_calls: dict[str, Callable[..., Any]], filtering: Filtering | None = None) -> None:
        self.router = router
        self.filtering = filtering if filtering is not None else Filtering(Router(), lambda m: None)
        self.caps = caps
        self.durable = durable
        self.audit = audit
        self.calls = calls
        self.durable_calls = durable_calls

    def denied(self, actor: ConnectionActor, action: str, name: str, rid: int) -> RemoteProtocolError:
        """Audit a permission denial and return the error to answer it with."""
        self.audit.permission_denied(actor.user.name, actor.peer, action, name)
        return RemoteProtocolError(f"permission denied: {action} on {name!r}", ErrorCode.PERMISSION_DENIED,
                                   rid=rid)

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
            self.filtering.remove(self.router, sub)
            if ev.rid:
                actor.push_wire([F.Op.OK, ev.rid, None])
        elif t is F.Call:
            result = await self.call(actor, ev.method, ev.args, ev.rid)
            actor.push_wire([F.Op.OK, ev.rid, result], 256)
        elif t is F.Consume:
            if actor.restricted:
                name = ev.args.get("queue", ev.args.get("stream"))
                group = ev.args.get("group") if "queue" not in ev.args else None
                if isinstance(group, str) and isinstance(name, str):
                    # a group member: its group is part of the permission (it commits the group's offsets)
                    if not actor.perms.allows_group(name, group):
                        raise self.denied(actor, "consume", f"{name}/{group}", ev.rid)
                elif isinstance(name, str) and not actor.perms.allows("consume", name):
                    raise self.denied(actor, "consume", name, ev.rid)
            self.caps.check_consumer(actor, ev.rid)
            if "queue" in ev.args:
                result = self.durable.consume(actor, ev.cid, ev.args, ev.rid)
            elif "stream" in ev.args and ev.args.get("group") is not None:
                result = await self._join_group(actor, ev)
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

    async def _join_group(self, actor: ConnectionActor, ev: F.Consume) -> Any:
        """A stream CONSUME with a group: joining (maybe creating) a consumer
        group moves its partition assignments and commits its offsets, which
        other users' members share, so every join is audited with its outcome."""
        stream, group = ev.args.get("stream"), ev.args.get("group")
        target = f"{stream}/{group}" if isinstance(stream, str) and isinstance(group, str) else None
        try:
            result = await self.durable.streams.consume(actor, ev.cid, ev.args, ev.rid)
        except Exception as exc:  # audited whatever the failure, then re-raised unchanged
            self.audit.admin(actor.user.name, actor.peer, "group.join", target,
                             getattr(getattr(exc, "code", None), "name", "INTERNAL"))
            raise
        self.audit.admin(actor.user.name, actor.peer, "group.join", target, "ok")
        return result

    def _check_ack(self, actor: ConnectionActor, ev: F.Ack) -> None:
        """Acks are covered by the consume check made when the consumer was
        created; checked again here (a cached lookup) so that no path
        settles deliveries of a name the user may not consume."""
        c = actor.consumers.get(ev.cid)
        if c is None:
            return  # settle() answers an unknown consumer
        name, group = c.source, c.group_name
        if group is not None:
            if not actor.perms.allows_group(name, group):
                raise self.denied(actor, "consume", f"{name}/{group}", ev.rid)
        elif not actor.perms.allows("consume", name):
            raise self.denied(actor, "consume", name, ev.rid)

    def _subscribe(self, actor: ConnectionActor, ev: F.Sub) -> None:
        if actor.restricted and not actor.perms.allows("subscribe", ev.pattern):
            raise self.denied(actor, "subscribe", ev.pattern, ev.rid)
        if ev.sid in actor.subs:
            raise RemoteProtocolError(f"subscription id {ev.sid} is already in use", ErrorCode.INVALID_ARGUMENT,
                                      rid=ev.rid)
        self.caps.check_subscription(actor, ev.rid)
        flt = None
        if ev.filter is not None:
            try:
                flt = self.filtering.compile(ev.filter)
            except FilterError as exc:
                raise RemoteProtocolError(str(exc), ErrorCode.INVALID_ARGUMENT, rid=ev.rid) from None
        sub = Subscription(actor, ev.sid, ev.pattern, ev.group, flt)
        actor.subs[ev.sid] = sub
        self.filtering.add(self.router, sub)
        if ev.rid:
            actor.push_wire([F.Op.OK, ev.rid, None])

    async def call(self, actor: ConnectionActor, method: str, args: dict[str, Any], rid: int) -> Any:
        """Run a CALL after checking the user may; raises RemoteProtocolError.
        State-changing calls are audited with their outcome."""
        if actor.restricted:
            need = actor.perms.check_call(method, args)
            if need is None and method == "dlq.redrive":  # these needs depend on the queues that exist
                dests = self.durable.redrive_destinations(args)
                need = actor.perms.first_unmet(redrive_needs((q.name, q.cfg.bind) for q in dests))
            if need is None and method in ("queue.delete", "stream.delete"):  # deletes the DLQ too
                dl = self.durable.dead_letter_to_delete(args, method.split(".")[0])
                if dl is not None and not actor.perms.allows("admin", dl):
                    need = Need("admin", dl)
            if need is not None:
                raise self.denied(actor, need.action, need.name, rid)
        if method in UNAUDITED_CALLS:
            return await self._dispatch_call(actor, method, args, rid)
        target = args.get("name", args.get("pattern"))  # for backup: the file name; schema.unbind: the pattern
        try:
            result = await self._dispatch_call(actor, method, args, rid)
        except Exception as exc:  # audited whatever the failure, then re-raised unchanged
            outcome = getattr(getattr(exc, "code", None), "name", "INTERNAL")
            self.audit.admin(actor.user.name, actor.peer, method, target, outcome)
            raise
        self.audit.admin(actor.user.name, actor.peer, method, target, "ok")
        return result

    async def _dispatch_call(self, actor: ConnectionActor, method: str, args: dict[str, Any], rid: int) -> Any:
        handler = self.calls.get(method)
        if handler is not None:
            return handler(args)
        dhandler = self.durable_calls.get(method)
        if dhandler is None:
            raise RemoteProtocolError(f"unknown method {method!r}", ErrorCode.UNKNOWN_OPERATION, rid=rid)
        result = dhandler(args, rid)
        if hasattr(result, "__await__"):
            result = await result
        return result
