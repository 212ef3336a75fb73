"""The mesh: one route per pair of brokers, and pub/sub interest across them.

Topology: a full mesh, like NATS routes. Every broker knows its peers from the
membership table (membership.py); of each pair, the broker whose id sorts
first dials the other's client port (one connection per pair, no tie to
break), retrying every RENEW_INTERVAL while the peer is alive and not
connected. The handshake is in protocol/route.py: a HELLO with the ``route``
option, proofs of the cluster secret both ways; a connection that fails it
gets nothing and is closed.

Interest: this broker's subscriptions are counted per (pattern, queue group)
(``local_changed``, called by net/publish.py ``Filtering`` on every local SUB
and UNSUB); each such entry has an interest id. A new route first gets the
whole table (a snapshot), then every change as it happens (``[iid, pattern,
group, count]``, count 0 = gone), coalesced per write. A peer's interest
becomes ``RemoteSub`` items in this broker's router, so the publish path
(net/publish.py ``route``) forwards a message to each interested peer once,
counts it as taken (confirms, no-responders) and picks a peer for a queue group
only when no local member exists. A message that arrives from a route goes to
local subscribers only (``deliver``): never forwarded again, never stored,
never answered with no-responders.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from tidings.protocol import ErrorCode, RemoteProtocolError
from tidings.protocol import frames as F
from tidings.protocol import route as R
from tidings.protocol.codec import Encoder

from tidings.broker.cluster.membership import RENEW_INTERVAL, Member, Membership
from tidings.broker.cluster.route import READ_CHUNK, RemoteSub, Route
from tidings.broker.net.publish import deliver_forwarded

if TYPE_CHECKING:
    from tidings.broker.net.publish import Filtering
    from tidings.broker.router import Router

log = logging.getLogger(__name__)

#: Seconds a route handshake (connect, HELLO, WELCOME, RAUTH) may take, either side.
HANDSHAKE_TIMEOUT: Final = 10.0
#: The largest frame a dialer accepts before the acceptor proved itself (a WELCOME is ~200 bytes).
DIALER_PRE_AUTH_MAX_FRAME: Final = 16 * 1024
#: Length bounds of a broker id in a route HELLO (ours are 16 hex digits).
MAX_ID_LENGTH: Final = 64


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port). Raises ValueError."""
    host, _, port = address.rpartition(":")
    if not host or not port:
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), int(port)


class Mesh:
    """Routes and interest of this broker (owned by the event loop thread)."""

    def __init__(self, membership: Membership, router: Router[Any], filtering: Filtering, server_name: str) -> None:
        self.membership = membership
        self.router = router
        self.filtering = filtering
        self.server_name = server_name
        self.routes: dict[str, Route] = {}  # peer id -> its route, once authenticated
        self._dialing: set[str] = set()
        self._local: dict[tuple[str, str | None], list[Any]] = {}  # (pattern, group) -> [iid, pattern, group, count]
        self._by_iid: dict[int, tuple[str, str | None]] = {}
        self._next_iid = 0
        self.remote_count = 0  # RemoteSub items in the router
        self.refused = 0  # route handshakes refused (a wrong proof, a stranger)
        # ``on_refused(peer, claimed id, why)``: a refused route handshake (the audit log's auth_failed)
        self.on_refused: Callable[[str, str, str], None] | None = None
        self._tg: TaskGroup | None = None
        membership.watch(died=self._died)

    # ----------------------------------------------------------------- interest

    def local_changed(self, pattern: str, group: str | None, delta: int) -> None:
        """A local subscription on ``pattern`` (in ``group``) was added (+1) or removed (-1)."""
        key = (pattern, group)
        e = self._local.get(key)
        if e is None:
            if delta <= 0:
                return
            self._next_iid += 1
            e = self._local[key] = [self._next_iid, pattern, group, 0]
            self._by_iid[e[0]] = key
        e[3] += delta
        entry = list(e)
        if e[3] <= 0:
            del self._local[key]
            del self._by_iid[e[0]]
            entry[3] = 0
        for r in self.routes.values():
            r.queue_interest(entry)

    def interest_snapshot(self) -> list[list[Any]]:
        """Every (pattern, group) this broker's clients subscribe to, as RSUB entries."""
        return [list(e) for e in self._local.values()]

    def remote_interest(self, route: Route, entries: Any) -> None:
        """Apply a peer's RSUB entries to the router. Raises RemoteProtocolError on a bad one."""
        router = self.router
        subs = route.subs
        for e in entries:
            if (type(e) is not list or len(e) != 4 or type(e[0]) is not int or type(e[1]) is not str
                    or (e[2] is not None and type(e[2]) is not str) or type(e[3]) is not int):
                raise RemoteProtocolError("an RSUB entry must be [iid, pattern, group, count]", fatal=True)
            iid, pattern, group, count = e
            rs = subs.get(iid)
            if count > 0:
                if rs is None:
                    rs = subs[iid] = RemoteSub(route, iid, pattern, group, count)
                    router.add(pattern, rs, group)
                    self.remote_count += 1
                else:
                    rs.count = count
            elif rs is not None:
                del subs[iid]
                router.remove(rs.pattern, rs, rs.group)
                self.remote_count -= 1

    def _drop_interest(self, route: Route) -> None:
        for rs in route.subs.values():
            self.router.remove(rs.pattern, rs, rs.group)
            self.remote_count -= 1
        route.subs.clear()

    def deliver(self, msgs: list[Any], pairs: Any) -> None:
        """Messages a peer forwarded: to local subscribers only (net/publish.py
        ``deliver_forwarded``); ``pairs`` names the queue groups (our interest ids) the
        peer picked this broker for, per message index."""
        groups = None
        if pairs:
            by_iid = self._by_iid
            group_of = self.router.group
            groups = {}
            for i, iids in pairs:
                gs = []
                for iid in iids:
                    key = by_iid.get(iid)
                    gs.append(group_of(key[0], key[1]) if key is not None and key[1] is not None else None)
                groups[i] = gs
        deliver_forwarded(self.router, self.filtering, msgs, groups, RemoteSub)

    # ------------------------------------------------------------------- routes

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Dial the peers this broker dials (those whose id sorts after ours), again after
        a failure at each membership change or RENEW_INTERVAL, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                while True:
                    self._dial_missing(tg)
                    with anyio.move_on_after(RENEW_INTERVAL):
                        await self.membership.changed()
            finally:
                for r in list(self.routes.values()):
                    r.close()

    def _dial_missing(self, tg: TaskGroup) -> None:
        me = self.membership.my_id
        for m in list(self.membership.peers.values()):
            if m.id > me and m.id not in self.routes and m.id not in self._dialing:
                self._dialing.add(m.id)
                tg.start_soon(self._dial, m)

    def _died(self, member: Member) -> None:
        r = self.routes.get(member.id)
        if r is not None:
            log.warning("cluster: closing the route to %s: its lease lapsed", member.id)
            r.close()

    async def _dial(self, member: Member) -> None:
        stream: ByteStream | None = None
        try:
            try:
                with anyio.fail_after(HANDSHAKE_TIMEOUT):
                    host, port = split_address(member.address)
                    stream = await anyio.connect_tcp(host, port)
                    split = await self._dial_handshake(stream, member)
            except (OSError, TimeoutError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError,
                    RemoteProtocolError) as exc:
                log.info("cluster: cannot open a route to %s at %s: %s", member.id, member.address,
                         str(exc) or type(exc).__name__)
                split = None
            if split is None or stream is None:
                if stream is not None:
                    await anyio.aclose_forcefully(stream)
                return
            route = Route(self, member.id, member.address, stream, split, dialer=True)
            self._register(route)
        except Exception:  # actor boundary: a peer's odd answer must not take the mesh down
            log.exception("cluster: dialing %s at %s failed", member.id, member.address)
            if stream is not None:
                await anyio.aclose_forcefully(stream)
            return
        finally:
            self._dialing.discard(member.id)
        await self._serve(route)

    async def _dial_handshake(self, stream: ByteStream, member: Member) -> R.FrameSplitter | None:
        """The dialer's side of the handshake; the splitter (with what followed) or None if refused."""
        enc = Encoder()
        me = self.membership.my_id
        secret = self.membership.secret
        nd = R.nonce()
        await stream.send(enc.encode_value([F.Op.HELLO, F.PROTOCOL_VERSION, R.ROUTE_CLIENT_NAME, None,
                                            {R.HELLO_ROUTE: {"id": me, "to": member.id, "nonce": nd}}]))
        split = R.FrameSplitter(DIALER_PRE_AUTH_MAX_FRAME)
        frames: list[Any] = []
        while not frames:
            frames = split.feed(await stream.receive(READ_CHUNK), one=True)
        w = frames[0]
        if type(w) is list and len(w) == 4 and w[0] == F.Op.ERR:
            log.warning("cluster: broker %s at %s refused our route: %s", member.id, member.address, w[3])
            return None
        info = w[3].get(R.HELLO_ROUTE) if type(w) is list and len(w) == 4 and w[0] == F.Op.WELCOME \
            and type(w[3]) is dict else None
        if type(info) is not dict or info.get("id") != member.id or type(info.get("nonce")) is not bytes \
                or not R.proof_ok(R.proof(secret, "acceptor", me, member.id, nd, info["nonce"]), info.get("proof")):
            log.error("cluster: the broker at %s did not prove the cluster secret (or is not %s): no route",
                      member.address, member.id)
            return None
        await stream.send(enc.encode_value([R.RAUTH, R.proof(secret, "dialer", me, member.id, nd, info["nonce"])]))
        return split

    async def accept(self, stream: ByteStream, options: dict[str, Any], peer: str) -> None:
        """The acceptor's side: a connection on the client port said HELLO with the route
        option. Answers, checks the dialer's proof, then serves the route until it ends.
        A connection that does not prove the cluster secret gets AUTH_FAILED and nothing else."""
        enc = Encoder()
        info = options.get(R.HELLO_ROUTE)
        me = self.membership.my_id
        if (type(info) is not dict or type(info.get("id")) is not str or not 0 < len(info["id"]) <= MAX_ID_LENGTH
                or type(info.get("nonce")) is not bytes or len(info["nonce"]) != R.NONCE_BYTES):
            await self._refuse(stream, enc, peer, "?", ErrorCode.INVALID_ARGUMENT, "malformed route HELLO")
            return
        dialer, nd = info["id"], info["nonce"]
        if info.get("to") != me:
            # a peer's stale view (this address's previous broker restarted): not an intruder
            await self._refuse(stream, enc, peer, dialer, ErrorCode.BAD_STATE,
                               f"this is broker {me}, not {info.get('to')!r} (membership changed)", stale=True)
            return
        secret = self.membership.secret
        na = R.nonce()
        await stream.send(enc.encode_value([
            F.Op.WELCOME, F.PROTOCOL_VERSION, self.server_name,
            {R.HELLO_ROUTE: {"id": me, "nonce": na, "proof": R.proof(secret, "acceptor", dialer, me, nd, na)},
             "max_frame": R.MAX_FRAME}]))
        split = R.FrameSplitter(R.PRE_AUTH_MAX_FRAME)
        frames: list[Any] = []
        try:
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                while not frames:
                    frames = split.feed(await stream.receive(READ_CHUNK), one=True)
        except (RemoteProtocolError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            frames = []
        first = frames[0] if frames else None
        if not (type(first) is list and len(first) == 2 and first[0] == R.RAUTH
                and R.proof_ok(R.proof(secret, "dialer", dialer, me, nd, na), first[1])):
            await self._refuse(stream, enc, peer, dialer, ErrorCode.AUTH_FAILED, "route authentication failed")
            return
        known = self.membership.peers.get(dialer)
        route = Route(self, dialer, known.address if known is not None else peer, stream, split, dialer=False)
        self._register(route)
        await self._serve(route)

    async def _refuse(self, stream: ByteStream, enc: Encoder, peer: str, claimed: str, code: ErrorCode,
                      why: str, stale: bool = False) -> None:
        if stale:
            log.info("cluster: refused a route from %s (broker %s): %s", peer, claimed, why)
        else:
            self.refused += 1
            log.warning("cluster: refused a route from %s (claiming broker %s): %s", peer, claimed, why)
            if self.on_refused is not None:
                self.on_refused(peer, claimed, why)
        try:
            await stream.send(enc.encode_value([F.Op.ERR, 0, int(code), why]))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def _register(self, route: Route) -> None:
        old = self.routes.get(route.peer_id)
        if old is not None:
            old.close()  # a stale route to the same broker (it reconnected): the new one wins
        self.routes[route.peer_id] = route
        log.info("cluster: route to %s at %s is up (%s)", route.peer_id, route.address,
                 "dialed" if route.dialer else "accepted")

    async def _serve(self, route: Route) -> None:
        try:
            await route.run()
        finally:
            if self.routes.get(route.peer_id) is route:
                del self.routes[route.peer_id]
            self._drop_interest(route)
            log.info("cluster: route to %s at %s is down", route.peer_id, route.address)

    def close(self) -> None:
        for r in list(self.routes.values()):
            r.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def info(self) -> dict[str, Any]:
        """What ``stats`` shows under "cluster"."""
        m = self.membership
        peers = []
        for pid in sorted(set(m.peers) | set(self.routes)):
            r = self.routes.get(pid)
            member = m.peers.get(pid)
            address = member.address if member is not None else r.address if r is not None else ""
            peers.append({"id": pid, "address": address, "alive": member is not None, "route": r is not None,
                          "forwarded": r.forwarded + r.queued if r else 0, "received": r.received if r else 0,
                          "dropped": r.dropped if r else 0, "interest": len(r.subs) if r else 0})
        return {"id": m.my_id, "address": m.address, "peers": peers, "routes": len(self.routes),
                "local_interest": len(self._local), "remote_interest": self.remote_count,
                "routes_refused": self.refused, "lease_renewals": m.renewals,
                "lease_renew_failures": m.renew_failures}
