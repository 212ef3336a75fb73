"""One route: the authenticated connection between this broker and one peer.

A ``Route`` runs after the handshake (mesh.py dials or accepts it;
protocol/route.py describes the frames). It is an actor with three tasks:

* the reader takes chunks of ``READ_CHUNK``, splits them into frames and handles
  each: RSUB updates the peer's interest in this broker's router (``RemoteSub``
  items), RMSG hands the forwarded messages to ``deliver_forwarded``
  (net/publish.py), which reaches local subscribers only;
* the writer drains everything queued per wake-up (interest changes first, then
  messages, many per RMSG frame) and sends it in one write;
* the pinger sends RPING every ``PING_INTERVAL``; a route that hears nothing for
  ``DEAD_AFTER`` is closed (its peer is gone or the network is).

The publish path hands messages over with :meth:`Route.push_msg`, the same call a
subscriber's connection takes, so ``route()`` needs no cluster code: a peer's
interest is a subscriber in the router. A message that matches several of one
peer's patterns is queued once (``push_msg`` is called for one message's
subscribers in one synchronous pass, so the route remembers the last message it
queued); a queue group this broker picked the peer for rides along as the
peer's interest id. The outbound queue is bounded in bytes (``MAX_PENDING``):
beyond it messages for this peer are dropped and counted, as for a slow
subscriber (pub/sub is at most once).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final, Protocol

import anyio
import msgpack
from anyio.abc import ByteStream

from tidings.protocol import frames as F
from tidings.protocol import route as R
from tidings.protocol import vocabulary as V
from tidings.protocol.codec import HEADER
from tidings.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

#: Bytes one receive() may take: big chunks amortise the per-read cost over many frames.
READ_CHUNK: Final = 256 * 1024
#: Bytes of messages queued for one peer before further ones are dropped (as NATS's 64 MB
#: of pending output per connection): a peer that cannot keep up must not grow our memory.
MAX_PENDING: Final = 64 * 1024 * 1024
#: One RMSG frame carries at most about this many bytes of messages: big enough to make
#: a write carry thousands of small messages, small enough to keep the receiver's
#: decode of one frame short.
FRAME_BYTES: Final = 1024 * 1024
#: Interest entries per RSUB frame (a snapshot of 100,000 subscriptions is many frames).
RSUB_CHUNK: Final = 5000
#: Seconds between pings; a route silent for DEAD_AFTER seconds is closed. Short next to
#: the membership lease (membership.py LEASE): a broken route is noticed in seconds even
#: when the peer's lease still runs.
PING_INTERVAL: Final = 2.0
DEAD_AFTER: Final = 3 * PING_INTERVAL
#: Estimated bytes of one message's envelope in the outbound queue.
MSG_OVERHEAD: Final = 24


class RouteHost(Protocol):
    """What a route asks of its owner (mesh.py ``Mesh``)."""

    def deliver(self, msgs: list[Any], pairs: Any) -> None:
        """Messages the peer forwarded: to local subscribers only."""
        ...

    def remote_interest(self, route: Route, entries: Any) -> None:
        """The peer's interest changed (RSUB entries)."""
        ...

    def interest_snapshot(self) -> list[list[Any]]:
        """This broker's whole interest, sent first on a new route."""
        ...


class RemoteSub:
    """A peer's interest in one (pattern, queue group), as an item of the local router.

    The publish path treats it as a subscriber: ``conn.push_msg(sid, item, size)``
    queues the message on the route. ``sid`` is the peer's interest id for a queue
    group (the peer delivers to one of its members) and 0 for plain interest."""

    __slots__ = ("conn", "sid", "pattern", "group", "delivered", "count")
    remote: Final = True  # router.py keeps remote group members apart (local ones are preferred)
    flt: Final = None  # the peer applies its own subscriptions' filters

    def __init__(self, conn: Route, iid: int, pattern: str, group: str | None, count: int) -> None:
        self.conn = conn
        self.sid = iid if group is not None else 0
        self.pattern = pattern
        self.group = group
        self.delivered = 0
        self.count = count


class Route:
    """The actor of one authenticated route (see the module doc)."""

    def __init__(self, mesh: RouteHost, peer_id: str, address: str, stream: ByteStream, splitter: R.FrameSplitter,
                 dialer: bool) -> None:
        self.mesh = mesh
        self.peer_id = peer_id
        self.address = address
        self.stream = stream
        self.dialer = dialer
        self._splitter = splitter
        splitter.limit = R.MAX_FRAME  # authenticated: what stays buffered is read at the full limit
        self.subs: dict[int, RemoteSub] = {}  # the peer's interest id -> its item in the router
        self._out: list[Any] = []
        self._groups: dict[int, list[int]] = {}  # index in _out -> interest ids of the peer's groups
        self._last: Any = None
        self._interest: dict[int, list[Any]] = {}  # our interest changes not yet sent, by id
        self._control: list[Any] = []  # RPING/RPONG frames not yet sent
        self._pending = 0
        self._wake = anyio.Event()
        self._idle = False
        self._scope = anyio.CancelScope()
        self._heard = time.monotonic()
        self.forwarded = 0  # messages sent to the peer
        self.received = 0  # messages the peer sent us
        self.dropped = 0  # messages not sent: MAX_PENDING was reached
        self.closed = False

    # ------------------------------------------------------------- the publish path

    def push_msg(self, sid: int, item: list[Any], size: int) -> None:
        """Queue a message for the peer (a subscriber's call; never blocks). Once per message
        however many of the peer's patterns match; ``sid`` > 0 adds one of its queue groups."""
        if item is self._last:
            if sid:
                self._groups.setdefault(len(self._out) - 1, []).append(sid)
            return
        if self._pending + size > MAX_PENDING:
            if self.closed:
                return
            self.dropped += 1
            if self.dropped == 1 or not self.dropped % 10_000:
                log.warning("cluster: route to %s at %s is over %d bytes of pending output: %d messages "
                            "dropped so far", self.peer_id, self.address, MAX_PENDING, self.dropped)
            return
        out = self._out
        self._last = item
        if sid:
            self._groups[len(out)] = [sid]
        out.append(item)
        self._pending += size
        if self._idle:
            self._idle = False
            self._wake.set()

    @property
    def queued(self) -> int:
        """Messages queued for the peer and not yet written."""
        return len(self._out)

    def queue_interest(self, entry: list[Any]) -> None:
        """Send ``[iid, pattern, group, count]`` with the next write (a later change of
        the same interest replaces it: only the latest count travels)."""
        self._interest[entry[0]] = entry
        if self._idle:
            self._idle = False
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._scope.cancel()

    # ------------------------------------------------------------------- running

    async def run(self) -> None:
        """Serve the route until it breaks or is closed; then the peer's interest is gone."""
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guarded, self._writer, tg)
                    tg.start_soon(self._guarded, self._pinger, tg)
                    await self._guarded(self._reader, tg)
        finally:
            self.closed = True
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(self.stream)

    async def _guarded(self, task: Any, tg: Any) -> None:
        """Run one of the route's tasks; whatever ends it ends the route (an actor boundary:
        a broken route is logged and closed, the broker keeps serving)."""
        try:
            await task()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError,
                OSError) as exc:
            log.info("cluster: route to %s at %s broke: %s", self.peer_id, self.address,
                     str(exc) or type(exc).__name__)
        except RemoteProtocolError as exc:
            log.error("cluster: route to %s at %s sent a bad frame: %s", self.peer_id, self.address, exc.message)
        except Exception:  # noqa: BLE001 - actor boundary
            log.exception("cluster: route to %s at %s failed", self.peer_id, self.address)
        finally:
            tg.cancel_scope.cancel()

    async def _reader(self) -> None:
        split = self._splitter
        stream = self.stream
        frames = split.feed(b"")  # what came with the handshake's last chunk
        while True:
            for f in frames:
                if not self._handle(f):
                    return
            while True:
                with anyio.move_on_after(PING_INTERVAL):
                    data = await stream.receive(READ_CHUNK)
                    break
                if time.monotonic() - self._heard > DEAD_AFTER:
                    log.warning("cluster: route to %s at %s silent for %.0f s: closing", self.peer_id,
                                self.address, DEAD_AFTER)
                    return
            self._heard = time.monotonic()
            frames = split.feed(data)

    def _handle(self, f: Any) -> bool:
        """Handle one frame from the peer; False: the route must close."""
        if type(f) is not list or not f:
            raise RemoteProtocolError("a route frame must be a non-empty array", fatal=True)
        op = f[0]
        if op == R.RMSG:
            msgs = f[1]
            self.received += len(msgs)
            self.mesh.deliver(msgs, f[2] if len(f) > 2 else None)
        elif op == R.RSUB:
            self.mesh.remote_interest(self, f[1])
        elif op == R.RPING:
            self._send_soon([R.RPONG])
        elif op == R.RPONG:
            pass
        elif op == F.Op.NOTICE and len(f) > 1 and f[1] == V.NOTICE_SHUTDOWN:
            log.info("cluster: broker %s at %s is shutting down", self.peer_id, self.address)
            return False
        else:
            raise RemoteProtocolError(f"unknown route operation {op!r}", fatal=True)
        return True

    def _send_soon(self, frame: list[Any]) -> None:
        self._control.append(frame)
        if self._idle:
            self._idle = False
            self._wake.set()

    async def _pinger(self) -> None:
        while True:
            await anyio.sleep(PING_INTERVAL)
            self._send_soon([R.RPING])

    async def _writer(self) -> None:
        pack = msgpack.Packer(use_bin_type=True).pack
        header = HEADER.pack
        stream = self.stream
        # The snapshot of this broker's interest goes first (before any change of it).
        for entry in self.mesh.interest_snapshot():
            self._interest[entry[0]] = entry
        while True:
            if not (self._out or self._interest or self._control):
                self._idle = True
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            parts: list[bytes] = []
            if self._control:
                control, self._control = self._control, []
                for c in control:
                    body = pack(c)
                    parts += (header(len(body)), body)
            if self._interest:
                entries = list(self._interest.values())
                self._interest = {}
                for i in range(0, len(entries), RSUB_CHUNK):
                    body = pack([R.RSUB, entries[i:i + RSUB_CHUNK]])
                    parts += (header(len(body)), body)
            if self._out:
                out, groups = self._out, self._groups
                self._out, self._groups, self._last = [], {}, None
                taken = self._pending
                self._pending = 0
                self.forwarded += len(out)
                self._frames(out, groups, taken, pack, parts)
            await stream.send(b"".join(parts))

    def _frames(self, out: list[Any], groups: dict[int, list[int]], total: int, pack: Any,
                parts: list[bytes]) -> None:
        """Encode ``out`` as RMSG frames of about FRAME_BYTES each into ``parts``."""
        header = HEADER.pack
        if total <= FRAME_BYTES:
            body = pack([R.RMSG, out, [[i, g] for i, g in groups.items()] if groups else None])
            parts += (header(len(body)), body)
            return
        start = 0
        size = 0
        n = len(out)
        for i in range(n):
            m = out[i]
            size += len(m[1]) + len(m[0]) + MSG_OVERHEAD
            if size >= FRAME_BYTES or i == n - 1:
                chunk = out[start:i + 1]
                pairs = [[j - start, g] for j, g in groups.items() if start <= j <= i] if groups else None
                body = pack([R.RMSG, chunk, pairs or None])
                parts += (header(len(body)), body)
                start = i + 1
                size = 0
