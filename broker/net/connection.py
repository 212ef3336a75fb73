"""One actor per client connection.

The actor owns its socket, its sans-IO protocol state, its subscriptions
and its outbound mailbox. It runs two tasks under its own task group:

* the reader takes 64 KiB chunks, decodes every complete frame in them and
  handles each (a PUB batch is routed in one synchronous pass);
* the writer drains the whole mailbox per wake-up and sends it in one write.

Other actors hand it work only through :meth:`push_msg` / :meth:`push_wire`,
which never block: the mailbox is bounded in bytes (``max_pending_bytes``).
Pub/sub messages beyond the bound are dropped for this subscriber and
counted, then announced with a ``slow_consumer`` NOTICE (policy "drop"), or
the connection is closed (policy "disconnect"). Replies to this client's
own requests are never dropped: instead the reader stops reading the
socket until the writer has drained below the bound, which is how a client
that does not read slows down its own requests.

Security: after HELLO the actor holds its ``user`` and that user's
``perms``. ``restricted`` is False in no-users mode (ALLOW_ALL), and then
the publish path costs one attribute check per PUB frame; otherwise each
published subject is checked (a cached lookup) and denied messages are
neither routed nor stored.

Resource limits (broker/ops/limits.py): while the broker is above its memory
high-water mark the reader pauses before each PUB frame, so publishers
stop being read while consumers keep draining; below the free-disk mark
durable publishes are refused with STORAGE_FULL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio
from anyio.abc import ByteStream, TaskGroup

from tidings.protocol import CLOSED, NEED_DATA, Connection, ErrorCode, RemoteProtocolError, Role
from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import LocalProtocolError
from tidings.protocol.filters import Filter
from tidings.protocol.route import HELLO_ROUTE

from tidings.broker.net.publish import route, route_filtered
from tidings.broker.security.auth import ANONYMOUS, User
from tidings.broker.durable.store.base import StorageError, StorageFull

if TYPE_CHECKING:
    from tidings.broker.durable.ports import DurableConsumer
    from tidings.broker.net.ports import BrokerPort

log = logging.getLogger(__name__)

READ_CHUNK: Final = 65_536  # one receive() takes up to this much: per-read costs amortise over many frames
SHUTDOWN_FLUSH: Final = 2.0  # seconds a closing connection gets to flush what it has queued
# While paused for memory, a publisher is PINGed this often so its client sees a live broker
# (the Python client declares a silent broker dead after a few seconds).
PAUSE_KEEPALIVE: Final = 1.0
PUB_MEMO: Final = 1024  # publish answers a restricted connection remembers (one dict lookup per message)


class Subscription:
    __slots__ = ("conn", "sid", "pattern", "group", "delivered", "flt")

    def __init__(self, conn: ConnectionActor, sid: int, pattern: str, group: str | None,
                 flt: Filter | None = None) -> None:
        self.conn = conn
        self.sid = sid
        self.pattern = pattern
        self.group = group
        self.delivered = 0
        self.flt = flt  # a content filter (protocol/filters.py): then routed by net/publish.py route_filtered


class ConnectionActor:
    """Serves one client. ``run()`` returns when the connection is over."""

    def __init__(self, port: BrokerPort[ConnectionActor], stream: ByteStream, number: int, peer: str,
                 peer_ip: str = "?") -> None:
        cfg = port.config
        self.port = port  # what this connection may ask of the broker (never the Broker itself)
        self.stream = stream
        self.number = number
        self.peer = peer
        self.peer_ip = peer_ip
        self.name = ""
        self.confirm_ids = False
        self.user: User = ANONYMOUS
        self.perms = ANONYMOUS.permissions
        self.restricted = False  # True: check permissions (a configured user); False: ALLOW_ALL
        self.counted = False  # counted against the user's max_connections (released on detach)
        self.admitted = False  # past HELLO: counted against the broker's max_connections
        self._pub_ok: dict[str, bool] = {}  # subject -> may publish (restricted users only)
        self.conn = Connection(Role.SERVER, max_frame=cfg.max_payload + 64 * 1024, max_payload=cfg.max_payload)
        self.subs: dict[int, Subscription] = {}
        self.consumers: dict[int, DurableConsumer] = {}  # cid -> queue consumer, group member or reader
        self.opened = time.time()
        self.msgs_in = 0
        self.msgs_out = 0
        self.dropped_total = 0
        self.credit_waits = 0  # times a durable producer held deliveries back for this connection
        self._reserved = 0  # bytes of deliveries taken but not yet pushed (see reserve())
        self._limit = cfg.max_pending_bytes
        self._drop = cfg.slow_consumer == "drop"
        self._msgs: dict[int, list[Any]] = {}
        self._msg_bytes: dict[int, int] = {}
        self._wire: list[Any] = []  # control frames and sealed message segments, in order
        self._dropped: dict[int, int] = {}
        self._pending = 0  # bytes queued or being written
        self._wake = asyncio.Event()  # the writer's wake-up, cleared and reused (never replaced)
        self._writer_idle = False
        self._space: anyio.Event | None = None
        self._below: list[tuple[int, anyio.Event]] = []
        # Durable producers (queues, groups) that stopped delivering here because the mailbox
        # was full: each is woken once when the writer has drained it below the bound.
        self._credit_waiters: dict[Callable[[], None], None] = {}  # ordered set (bound methods compare equal)
        self._reader_scope = anyio.CancelScope()
        self._closing = False
        self._writer_done = anyio.Event()
        self._tasks: TaskGroup | None = None  # run()'s task group (the writer, the watchdog)
        self._read_since = 0.0  # monotonic time the reader began waiting for data (0.0: not waiting)
        self._partial_since = 0.0  # monotonic time the frame partly buffered began to arrive (0.0: none)

    def set_user(self, user: User, *, counted: bool) -> None:
        """Adopt the authenticated ``user`` (called once, during HELLO)."""
        self.user = user
        self.perms = user.permissions
        self.restricted = not user.permissions.unrestricted
        self.counted = counted

    # ---------------------------------------------------------- mailbox

    def push_msg(self, sid: int, item: list[Any], size: int) -> None:
        """Queue one pub/sub message for subscription ``sid``; never blocks."""
        if self._pending + size > self._limit:
            if self._closing:
                return
            if self._drop:
                self._dropped[sid] = self._dropped.get(sid, 0) + 1
                self.dropped_total += 1
                self.port.stats.dropped += 1
                return
            self._slow_disconnect()
            return
        lst = self._msgs.get(sid)
        if lst is None:
            self._msgs[sid] = [item]
            self._msg_bytes[sid] = size
        else:
            lst.append(item)
            self._msg_bytes[sid] += size
        self._pending += size
        if self._writer_idle:
            self._writer_idle = False
            self._wake.set()

    def push_wire(self, value: list[Any], size: int = 64) -> None:
        """Queue a control frame (OK, ERR, CONFIRM, NOTICE, PONG, DELIVER): never dropped.

        It goes out after every message queued before it (a PONG never
        overtakes earlier messages, so flush() on a subscriber means what it
        says); messages queued between two control frames are grouped per
        subscription into batch frames."""
        if self._msgs:
            self._wire.append((self._msgs, self._msg_bytes))
            self._msgs, self._msg_bytes = {}, {}
        self._wire.append(value)
        self._pending += size
        if self._writer_idle:
            self._writer_idle = False
            self._wake.set()

    @property
    def pending_limit(self) -> int:
        """``max_pending_bytes``: the bound on this connection's outbound mailbox."""
        return self._limit

    def credit(self, wake: Callable[[], None]) -> int:
        """Bytes of durable deliveries this connection may still queue (``max_pending_bytes``
        less what is pending). At or below 0 the caller must hold its deliveries back (as
        credit: nothing is dropped) and ``wake()`` is called once the writer has drained
        the mailbox below the bound, or the connection closes."""
        left = self._limit - self._pending - self._reserved
        if left <= 0 and wake not in self._credit_waiters:
            self._credit_waiters[wake] = None
            self.credit_waits += 1
        return left

    def await_credit(self, wake: Callable[[], None]) -> None:
        """The caller used up the credit it was given (what it took is pushed, or reserved,
        after this call): ``wake()`` once the writer has sent and the mailbox is below the
        bound again. Unlike :meth:`credit` it does not look at the mailbox now, which does
        not hold the caller's own deliveries yet."""
        if wake not in self._credit_waiters:
            self._credit_waiters[wake] = None
            self.credit_waits += 1

    def reserve(self, n: int) -> None:
        """Count ``n`` bytes of deliveries taken now and pushed later (a stream group pushes
        once the store has recorded them) against this connection's credit."""
        self._reserved += n

    def release(self, n: int) -> None:
        """The reserved bytes were pushed (or dropped): they count as pending instead."""
        self._reserved -= n

    @property
    def pending_bytes(self) -> int:
        """Bytes queued in the outbound mailbox or being written."""
        return self._pending

    def end_consumer(self, cid: int, reason: str, **info: Any) -> None:
        """The broker ended consumer ``cid`` (its queue or stream was deleted, a replay
        reached its end): forget it and tell the client with a consumer_closed NOTICE."""
        self.consumers.pop(cid, None)
        self.push_wire([F.Op.NOTICE, V.NOTICE_CONSUMER_CLOSED, {"cid": cid, "reason": reason, **info}])

    def send_err(self, rid: int, code: int, message: str) -> None:
        self.port.stats.count_error(code)
        self.push_wire([F.Op.ERR, rid, int(code), message], 64 + len(message))

    def _slow_disconnect(self) -> None:
        log.warning("closing slow consumer %s (%s): outbound buffer over %d bytes",
                    self.number, self.peer, self._limit)
        self.port.stats.slow_disconnects += 1
        self.port.audit.limit_refused(self.user.name, self.peer, "max_pending_bytes",
                                        max_pending_bytes=self._limit)
        self._msgs.clear()
        self._msg_bytes.clear()
        self._wire = [w for w in self._wire if type(w) is not tuple]
        self._pending = 0
        self.send_err(0, ErrorCode.SLOW_CONSUMER, "outbound buffer limit exceeded: disconnected")
        self.close()

    def evict(self) -> None:
        """Close a connection still waiting for HELLO, to make room for a newer one."""
        self.send_err(0, ErrorCode.TOO_MANY_CONNECTIONS, "too many connections are waiting for HELLO: closed the oldest")
        self.close()

    def close(self) -> None:
        """Ask the actor to stop reading, flush its mailbox and close."""
        if not self._closing:
            self._closing = True
            self.port.detach(self)
            self._wake.set()
            if self._space is not None:
                self._space.set()
            for _n, ev in self._below:
                ev.set()
            self._below = []
            self._wake_credit()
            # Stop reading now (a reader blocked in receive() would otherwise
            # wait for the peer or the heartbeat).
            self._reader_scope.cancel()

    # ------------------------------------------------------------- run

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._writer)
                try:
                    with self._reader_scope:
                        await self._reader()
                finally:
                    self.close()
                    with anyio.move_on_after(SHUTDOWN_FLUSH, shield=True):
                        await self._writer_done.wait()
                    tg.cancel_scope.cancel()
        finally:
            self.port.detach(self)
            with anyio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _reader(self) -> None:
        conn = self.conn
        cfg = self.port.config
        stream = self.stream
        try:
            with anyio.move_on_after(cfg.hello_timeout) as scope:
                hello = await self._read_hello()
            if scope.cancelled_caught:
                self.send_err(0, ErrorCode.HELLO_TIMEOUT, f"no HELLO within {cfg.hello_timeout}s")
                self.port.audit.limit_refused("", self.peer, "hello_timeout", seconds=cfg.hello_timeout)
                return
            if hello is not None and HELLO_ROUTE in hello.options:
                await self.port.serve_route(self, hello)  # another broker: a route until it ends
                return
            if hello is None or not await self._accept_hello(hello):
                return
            assert self._tasks is not None
            self._tasks.start_soon(self._watchdog)
            # The heartbeat and the frame timeout are kept by _watchdog (one timer per
            # connection); a read only records when it began and whether a frame is partly
            # buffered (no timer or cancel scope per read).
            frame_timeout = cfg.frame_timeout
            frames_seen = conn.frames_in
            while not self._closing:
                if self._partial_since and time.monotonic() >= self._partial_since + frame_timeout:
                    self._frame_timed_out()  # a dripping peer: data keeps coming, the frame never ends
                    return
                self._read_since = time.monotonic()
                data = await stream.receive(READ_CHUNK)
                self._read_since = 0.0
                conn.receive_data(data)
                if not await self._process():
                    return
                if not conn.has_partial_frame:
                    self._partial_since = 0.0
                elif not self._partial_since or conn.frames_in != frames_seen:
                    # The frame timeout runs from when the frame now partly buffered began to
                    # arrive, not from the last byte: a peer dripping a byte at a time must not
                    # keep a frame open forever (slow-loris). Completing any frame restarts it.
                    self._partial_since = time.monotonic()
                frames_seen = conn.frames_in
                if self._pending > self._limit:
                    await self._wait_space()
                    if self._partial_since:
                        self._partial_since = time.monotonic()  # we were not reading: not the peer's delay
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError):
            return

    async def _watchdog(self) -> None:
        """The reader's timeouts, with one timer per connection that re-arms itself rather
        than one per read: PING a client silent for ``heartbeat`` seconds while the reader
        waits for it, close it after one more ``heartbeat`` of silence (two missed), and
        close with FRAME_TIMEOUT a frame begun but not completed within ``frame_timeout``.

        It only acts while the reader waits in receive() (not while it processes frames or
        waits for the writer: not the client's delay), as the timers around each receive()
        it replaces did; the reader checks the frame timeout itself for a client that keeps
        sending bytes of a frame that never ends. The watchdog sleeps at most
        min(heartbeat, frame_timeout) at a time, and every deadline set while it sleeps
        lies at least that far ahead, so none is noticed late."""
        cfg = self.port.config
        heartbeat, frame_timeout = cfg.heartbeat, cfg.frame_timeout
        step = min(heartbeat, frame_timeout)
        pinged = 0.0  # the _read_since of the wait this PINGed in (0.0: none)
        while not self._closing:
            now = time.monotonic()
            wake = now + step
            since = self._read_since
            partial = self._partial_since
            if since and partial:  # waiting for the rest of a frame: no PING, the frame timeout
                due = partial + frame_timeout
                if now >= due:
                    self._frame_timed_out()
                    self.close()
                    return
                wake = min(wake, due)
            elif since:  # waiting for the client's next frame
                if pinged == since:
                    due = since + 2 * heartbeat
                    if now >= due:
                        log.info("connection %s (%s): no answer to heartbeat, closing", self.number, self.peer)
                        self.close()
                        return
                else:
                    due = since + heartbeat
                    if now >= due:
                        pinged = since
                        self.push_wire([F.Op.PING, 0])
                        continue
                wake = min(wake, due)
            await anyio.sleep(wake - now)

    def _frame_timed_out(self) -> None:
        timeout = self.port.config.frame_timeout
        self.send_err(0, ErrorCode.FRAME_TIMEOUT, f"partial frame not completed within {timeout}s")
        self.port.audit.limit_refused(self.user.name, self.peer, "frame_timeout", seconds=timeout)

    async def wait_pending_below(self, n: int) -> None:
        """Wait until this connection's outbound mailbox holds at most ``n``
        bytes (or it is closing): producers that must not drop use this."""
        while self._pending + self._reserved > n and not self._closing:
            ev = anyio.Event()
            self._below.append((n, ev))
            await ev.wait()

    async def _wait_space(self) -> None:
        while self._pending > self._limit and not self._closing:
            self._space = anyio.Event()
            await self._space.wait()
        self._space = None

    async def _read_hello(self) -> F.Hello | None:
        conn = self.conn
        while True:
            data = await self.stream.receive(READ_CHUNK)
            conn.receive_data(data)
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return None
            if ev is NEED_DATA:
                continue
            if ev is CLOSED:
                return None
            assert isinstance(ev, F.Hello)
            return ev

    async def _accept_hello(self, hello: F.Hello) -> bool:
        self.name = hello.client_name
        # Bare-id confirm results only for a client that said it reads them (older clients
        # read the map): docs/PROTOCOL.md 7.8.
        self.confirm_ids = hello.options.get(F.HELLO_CONFIRM_IDS) is True
        port = self.port
        refusal = await port.admit(self, hello)
        if refusal is not None:
            code, message = refusal
            self.send_err(0, code, message)
            return False
        info = port.welcome_info(self)
        self.conn.send_parts(F.Welcome(F.PROTOCOL_VERSION, port.config.server_name, info), [])
        # send_parts moved the state to OPEN; now queue the real frame bytes.
        self.push_wire([F.Op.WELCOME, F.PROTOCOL_VERSION, port.config.server_name, info], 256)
        port.opened(self)
        log.debug("connection %s (%s) open: client %r", self.number, self.peer, self.name)
        return await self._process()

    async def _process(self) -> bool:
        """Handle every complete frame buffered. False: the connection must close.

        Durable publishes from consecutive PUB frames are stored as one batch
        (one store operation, one commit); any other frame first flushes the
        batch, so this connection's requests keep their order."""
        conn = self.conn
        monitor = self.port.monitor
        durable: list[Any] = []
        try:
            while True:
                try:
                    ev = conn.next_event()
                except RemoteProtocolError as exc:
                    self._protocol_error(exc)
                    if exc.fatal:
                        return False
                    continue
                if ev is NEED_DATA:
                    return True
                if ev is CLOSED:
                    return False
                if type(ev) is F.Pub:
                    if monitor.memory_high:
                        if durable:
                            batch, durable = durable, []
                            await self._store(batch)
                        await self._pause_for_memory()
                    entries = self._on_pub(ev.messages)  # type: ignore[union-attr]
                    if entries:
                        durable.extend(entries)
                    continue
                if durable:
                    batch, durable = durable, []
                    await self._store(batch)
                await self._handle(ev)  # type: ignore[arg-type]
        finally:
            if durable:
                with anyio.CancelScope(shield=True):
                    await self._store(durable)

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        self.send_err(exc.rid, exc.code, exc.message)
        if exc.code == ErrorCode.FRAME_TOO_LARGE:
            self.port.audit.limit_refused(self.user.name, self.peer, "max_frame", inbound_limit=self.conn.inbound_limit)

    async def _pause_for_memory(self) -> None:
        """Wait (not reading this socket) until the broker is below its memory high-water mark."""
        monitor = self.port.monitor
        with monitor.reader_paused():
            while monitor.memory_high and not self._closing:
                with anyio.move_on_after(PAUSE_KEEPALIVE):
                    await monitor.wait_memory_ok()
                if monitor.memory_high:
                    self.push_wire([F.Op.PING, 0])

    async def _store(self, batch: list[Any]) -> None:
        """Hand durable publishes to the store, unless the disk is nearly full."""
        if not self.port.monitor.disk_low:
            await self.port.publish_durable(self, batch)
            return
        msg = "not stored: free disk space below min_free_disk"
        confirms = [[m[F.P_SEQ], int(ErrorCode.STORAGE_FULL), msg] for m, _targets in batch if m[F.P_SEQ]]
        if confirms:
            self.push_wire([F.Op.CONFIRM, confirms], 64 * len(confirms))
        if len(confirms) < len(batch):
            self.send_err(0, ErrorCode.STORAGE_FULL, f"{len(batch) - len(confirms)} messages {msg}")
        self.port.audit.limit_refused(self.user.name, self.peer, "min_free_disk", refused=len(batch))

    async def _handle(self, ev: F.Frame) -> None:
        t = type(ev)
        if t is F.Ping:
            self.push_wire([F.Op.PONG, ev.rid])  # type: ignore[union-attr]
        elif t is not F.Pong:
            try:
                await self.port.handle_request(self, ev)
            except RemoteProtocolError as exc:
                # Errors raised deep in a handler may not know the request id: it is this frame's.
                self.send_err(exc.rid or getattr(ev, "rid", 0), exc.code, exc.message)
            except StorageError as exc:  # a read or write of this request failed: it alone fails
                log.warning("request %s failed in the store: %s", type(ev).__name__, exc)
                code = ErrorCode.STORAGE_FULL if isinstance(exc, StorageFull) else ErrorCode.STORAGE_ERROR
                self.send_err(getattr(ev, "rid", 0), code, str(exc))

    # ------------------------------------------------------------ publish

    def _on_pub(self, msgs: list[list[Any]]) -> list[Any] | None:
        """Route a PUB batch to subscribers now (net/publish.py); return the messages
        that durable targets must store (with their targets), if any."""
        port = self.port
        if self.restricted:
            msgs = self._permitted(msgs)
        dead: list[Any] | None = None
        if port.schemas.active:  # one attribute read per frame while no subject is schema-bound
            msgs, dead = self._screened(msgs)
        self.msgs_in += len(msgs)
        port.stats.published += len(msgs)
        fl = port.filtering
        if fl.active:  # one property read per frame while no filter exists
            entries, confirms = route_filtered(port.router, port.durable_match, msgs, fl)
        else:
            entries, confirms = route(port.router, port.durable_match, msgs)
        if confirms:
            self.push_wire([F.Op.CONFIRM, confirms], 16 * len(confirms))
        if dead:
            entries = dead if entries is None else entries + dead
        return entries

    def _screened(self, msgs: list[list[Any]]) -> tuple[list[list[Any]], list[Any] | None]:
        """The messages of a PUB batch that pass the schema bound to their subject (each
        stamped with what it was validated against), and the dead-letter entries
        ``(message, [queue])`` of those refused by an ``on_invalid = "dead_letter"``
        binding. Every other refusal is answered like a permission denial: in its
        CONFIRM (seq > 0), else by one ERR for the frame. No new list when all pass."""
        screen = self.port.schemas.screen
        ok: list[list[Any]] | None = None
        dead: list[Any] | None = None
        confirms: list[Any] = []
        silent: list[str] = []
        for i, m in enumerate(msgs):
            verdict = screen(m)
            if verdict is None:
                if ok is not None:
                    ok.append(m)
                continue
            if ok is None:
                ok = msgs[:i]
            violation, entry = verdict
            if entry is not None:
                if dead is None:
                    dead = []
                dead.append(entry)
            elif m[F.P_SEQ]:
                confirms.append([m[F.P_SEQ], int(ErrorCode.SCHEMA_VIOLATION), violation.message()])
            else:
                silent.append(f"{violation.message()} on subject {m[0]!r}")
        if confirms:
            self.push_wire([F.Op.CONFIRM, confirms], 256 * len(confirms))
        if silent:
            more = f" (and {len(silent) - 1} more messages in this frame)" if len(silent) > 1 else ""
            self.send_err(0, ErrorCode.SCHEMA_VIOLATION, f"{silent[0]}{more}")
        return (msgs if ok is None else ok), dead

    def _permitted(self, msgs: list[list[Any]]) -> list[list[Any]]:
        """The messages of a PUB batch this user may publish. Each denied one
        is answered: in its CONFIRM if it asked for one (seq > 0), otherwise
        by one ERR for the whole frame; the frame's first denial is audited.

        Hot path for restricted users: one dict lookup per message in this
        connection's own memo of answers (the user's permissions never change
        while it is connected), and no new list when everything is allowed."""
        get = self._pub_ok.get
        for m in msgs:
            if not get(m[0]) and not self._learn_publish(m[0]):
                break
            if m[3] is not None and not self._learn_reply(m[3]):
                break
        else:
            return msgs
        ok: list[list[Any]] = []
        confirms: list[Any] = []
        silent: list[str] = []
        first: tuple[str, str] | None = None
        for m in msgs:
            if not self._learn_publish(m[0]):
                action, name, what = "publish", m[0], f"publish on {m[0]!r}"
            elif m[3] is not None and not self._learn_reply(m[3]):
                # A reply subject is where the answer (or the broker's no-responders
                # message) goes: only where this user could listen itself.
                action, name, what = "subscribe", m[3], f"reply subject {m[3]!r} (needs subscribe on it)"
            else:
                ok.append(m)
                continue
            first = first or (action, name)
            if m[F.P_SEQ]:
                confirms.append([m[F.P_SEQ], int(ErrorCode.PERMISSION_DENIED), f"permission denied: {what}"])
            else:
                silent.append(what)
        if first is not None:
            self.port.audit.permission_denied(self.user.name, self.peer, *first)
        if confirms:
            self.push_wire([F.Op.CONFIRM, confirms], 64 * len(confirms))
        if silent:
            more = f" (and {len(silent) - 1} more messages in this frame)" if len(silent) > 1 else ""
            self.send_err(0, ErrorCode.PERMISSION_DENIED, f"permission denied: {silent[0]}{more}")
        return ok

    def _learn_publish(self, subject: str) -> bool:
        memo = self._pub_ok
        answer = memo.get(subject)
        if answer is None:
            if len(memo) >= PUB_MEMO:
                memo.clear()  # a flood of distinct subjects just recomputes (Permissions caches too)
            answer = memo[subject] = self.perms.allows("publish", subject)
        return answer

    def _learn_reply(self, reply: str) -> bool:
        # No memo here: reply subjects are unique per request (Permissions' own bounded cache suffices).
        return self.perms.allows("subscribe", reply)

    # ------------------------------------------------------------- writer

    async def _writer(self) -> None:
        conn = self.conn
        direct = _direct_writes(self.stream)
        try:
            while True:
                if not (self._msgs or self._wire or self._dropped):
                    if self._closing:
                        return
                    self._writer_idle = True
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                wire, dropped = self._wire, self._dropped
                if self._msgs:
                    wire.append((self._msgs, self._msg_bytes))
                self._msgs, self._wire, self._msg_bytes = {}, [], {}
                if dropped:
                    self._dropped = {}
                taken = self._pending
                out: list[bytes] = []
                for w in wire:
                    if type(w) is tuple:
                        msgs, msg_bytes = w
                        for sid, items in msgs.items():
                            self.msgs_out += len(items)
                            self._encode_msgs(sid, items, msg_bytes[sid], out)
                    else:
                        try:
                            conn.encode_wire(w, out)
                        except LocalProtocolError:
                            self._encode_oversized(w, out)
                for sid, n in dropped.items():
                    conn.encode_wire([F.Op.NOTICE, V.NOTICE_SLOW_CONSUMER, {"sid": sid, "dropped": n}], out)
                if direct is not None:
                    await direct(b"".join(out))
                else:
                    await self.stream.send(b"".join(out))
                self._pending -= taken
                if self._space is not None and self._pending <= self._limit:
                    self._space.set()
                if self._credit_waiters and self._pending < self._limit:
                    self._wake_credit()
                if self._below:
                    pending = self._pending
                    keep = []
                    for n, ev in self._below:
                        if pending <= n:
                            ev.set()
                        else:
                            keep.append((n, ev))
                    self._below = keep
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError):
            self.close()
        finally:
            self._writer_done.set()

    def _encode_oversized(self, w: list[Any], out: list[bytes]) -> None:
        """A control frame larger than the client's announced max_frame: an answer becomes
        REPLY_TOO_LARGE for that request (the connection stays usable), a DELIVER batch is
        split; anything else is logged and left out (sending it would break the stream)."""
        conn = self.conn
        op = w[0]
        if op == F.Op.OK:
            rid = w[1]
            msg = f"the reply is larger than this connection's max_frame of {conn.peer_max_frame} bytes"
            self.port.stats.count_error(ErrorCode.REPLY_TOO_LARGE)
            conn.encode_wire([F.Op.ERR, rid, int(ErrorCode.REPLY_TOO_LARGE), msg], out)
            return
        if op == F.Op.DELIVER and len(w[2]) > 1:
            half = len(w[2]) // 2
            for part in (w[2][:half], w[2][half:]):
                try:
                    conn.encode_wire([F.Op.DELIVER, w[1], part], out)
                except LocalProtocolError:
                    self._encode_oversized([F.Op.DELIVER, w[1], part], out)
            return
        # A single delivery larger than the client accepts stays unacked: its ack deadline
        # redelivers it and max_deliveries finally moves it to the dead-letter queue.
        log.warning("connection %s (%s): not sending a %s frame larger than the client's max_frame %d",
                    self.number, self.peer, F.Op(op).name, conn.peer_max_frame)

    def _wake_credit(self) -> None:
        waiters, self._credit_waiters = self._credit_waiters, {}
        for wake in waiters:
            wake()

    def _encode_msgs(self, sid: int, items: list[Any], est: int, out: list[bytes]) -> None:
        conn = self.conn
        budget = conn.peer_max_frame - 1024
        if est <= budget:
            try:
                conn.encode_wire([F.Op.MSG, sid, items], out)
                return
            except LocalProtocolError:
                pass  # the estimate was short; split below
        if len(items) == 1:
            log.warning("dropping a message for sid %s: larger than the client's max_frame", sid)
            return
        half = len(items) // 2
        self._encode_msgs(sid, items[:half], est // 2, out)
        self._encode_msgs(sid, items[half:], est // 2, out)


def _direct_writes(stream: ByteStream) -> Callable[[bytes], Any] | None:
    """A cheaper ``send`` for a plain TCP connection on the asyncio backend, or None.

    anyio's ``SocketStream.send`` wraps every write in a ResourceGuard, a
    cancellation checkpoint and a wait for the transport's flow control; the
    writer is this connection's only sender and needs none of that while the
    transport is below its high-water mark. So: write to the transport
    directly, and only when that takes it above the mark wait for it to drain
    (what ``send`` itself does), so ``max_pending_bytes`` still counts what the
    kernel has not taken. Any other stream (TLS, a test's memory stream, another
    backend) keeps its own ``send``; so does a write made while the transport is
    paused, which waits first as ``send`` does."""
    if type(stream).__module__ != "anyio._backends._asyncio" or type(stream).__name__ != "SocketStream":
        return None
    transport: Any = getattr(stream, "_transport", None)
    protocol: Any = getattr(stream, "_protocol", None)
    if transport is None or not isinstance(getattr(protocol, "write_event", None), asyncio.Event):
        return None
    send = stream.send
    write = transport.write

    async def direct(data: bytes) -> None:
        # The protocol replaces write_event when the transport pauses: read it each time.
        if not protocol.write_event.is_set() or protocol.exception is not None:
            await send(data)  # paused (or broken): anyio waits for the drain (or raises)
            return
        try:
            write(data)
        except RuntimeError as exc:
            if transport.is_closing():
                raise anyio.BrokenResourceError from exc
            raise
        ready = protocol.write_event
        if not ready.is_set():  # the kernel did not take it all: wait for the drain as send() would
            await ready.wait()
            if protocol.exception is not None:
                raise anyio.BrokenResourceError from protocol.exception

    return direct
