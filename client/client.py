"""The tidings client: one connection, coalesced writes, requests matched by id.

Hot-path design (see docs/CLIENT.md): ``publish`` appends the message to a
pending batch and returns; one writer task turns everything pending into
as few frames and one socket write per wake-up. A publisher that never
yields is made to wait once the pending batch reaches ``FLUSH_BYTES``, so
a plain loop of awaited publishes runs at full speed with bounded memory.
The reader task decodes whole 64 KiB chunks and hands each MSG batch to
its subscription in one step.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import os
import secrets
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
from anyio.abc import ByteStream, TaskGroup

from protocol import CLOSED, NEED_DATA, Connection, Role
from protocol import frames as F
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.subjects import PatternSet, validate_pattern, validate_subject

from .errors import (
    ConnectError,
    ConnectionClosedError,
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    ProtocolViolationError,
    TidingsError,
    TimeoutError,
    for_code,
)
from .message import Message
from .consumer import ConsumeContext, Delivery, QueueConsumer, StreamMessage
from .errors import PublishBufferFullError
from .subscription import DEFAULT_MAX_PENDING, Subscription

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 7421
DEFAULT_URL: Final = f"tidings://127.0.0.1:{DEFAULT_PORT}"
READ_CHUNK: Final = 65_536
FLUSH_BYTES: Final = 256 * 1024  # a publisher waits for the writer once this much is pending (bounds memory)
DEFAULT_TIMEOUT: Final = 10.0  # seconds for requests, flush and the handshake unless told otherwise
MSG_OVERHEAD: Final = 16
CLIENT_MAX_FRAME: Final = 32 * 1024 * 1024 + 64 * 1024
DEFAULT_MAX_IN_FLIGHT: Final = 65_536  # unconfirmed durable publishes one client keeps before publish waits


class _Waiter:
    """A one-shot result slot a task can await (cheaper than a future per call)."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any) -> None:
        self.value = value
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def wait(self) -> Any:
        # No checkpoint when already set: a producer draining finished confirms
        # keeps publishing without a task switch per message, so the writer
        # gets whole batches instead of one message per wake-up.
        if not self.event.is_set():
            await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


def parse_url(url: str) -> tuple[str, int, bool]:
    """``tidings://host:port`` (or ``tidings+tls://``) -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("tidings", "tidings+tls"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use tidings://HOST:PORT")
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT, parts.scheme == "tidings+tls"


class Client:
    """A connection to a tidings broker. Create it with :func:`connect`."""

    def __init__(self, url: str = DEFAULT_URL, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url
        self.name = name or f"python-client/{os.getpid()}"
        self.timeout = timeout
        self.server_info: dict[str, Any] = {}
        self.last_server_error: TidingsError | None = None
        # Accept any frame a broker may legitimately send (max_payload is capped
        # at 32 MiB broker-side), so large messages are never cut off here.
        self._conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self._stream: ByteStream | None = None
        self._tg: TaskGroup | None = None
        self._closed = False
        self._error: TidingsError | None = None
        # outbound
        # Outbound frames in the order the application issued them. Publishes
        # (and acks) extend the trailing PUB (ACK) frame while it is the last one.
        self._out: list[list[Any]] = []
        self._cur_pub: list[list[Any]] | None = None
        self._cur_ack: tuple[int, list[list[Any]]] | None = None
        self._pub_bytes = 0
        self._wake = anyio.Event()
        self._writer_idle = False
        self._drained: anyio.Event | None = None
        self._writer_done = anyio.Event()
        # correlation
        self._rids = itertools.count(1)
        self._seqs = itertools.count(1)
        self._sids = itertools.count(1)
        self._requests: dict[int, _Waiter] = {}
        self._confirms: dict[int, _Waiter] = {}
        self._subs: dict[int, Subscription] = {}
        self._consumers: dict[int, QueueConsumer] = {}
        self._cids = itertools.count(1)
        self._in_flight = 0
        self.max_in_flight = DEFAULT_MAX_IN_FLIGHT
        self._in_flight_space: anyio.Event | None = None
        self._subjects: set[str] = set()
        self._bindings = PatternSet()
        self._bindings_epoch = -1
        # request/reply
        self._inbox = f"_INBOX.{secrets.token_hex(8)}"
        self._inbox_sid = 0
        self._replies: dict[str, _Waiter] = {}
        self._reply_ids = itertools.count(1)

    # ----------------------------------------------------------- lifecycle

    async def _start(self, tg: TaskGroup) -> None:
        host, port, tls = parse_url(self.url)
        if tls:
            raise ConnectError("TLS is not supported by this client version yet")
        try:
            with anyio.fail_after(self.timeout):
                self._stream = await anyio.connect_tcp(host, port)
                hello = F.Hello(F.PROTOCOL_VERSION, self.name, None, {})
                await self._stream.send(self._conn.send(hello))
                welcome = await self._read_welcome()
        except builtins.TimeoutError as exc:
            await self._abort()
            raise ConnectError(f"no answer from {host}:{port} within {self.timeout}s") from exc
        except OSError as exc:
            await self._abort()
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            await self._abort()
            raise
        self.server_info = welcome.info
        self._apply_bindings(welcome.info.get("bindings"))
        self._tg = tg
        tg.start_soon(self._reader)
        tg.start_soon(self._writer)

    async def _abort(self) -> None:
        if self._stream is not None:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _read_welcome(self) -> F.Welcome:
        assert self._stream is not None
        while True:
            try:
                data = await self._stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                raise ConnectError("the broker closed the connection during the handshake") from exc
            self._conn.receive_data(data)
            try:
                ev = self._conn.next_event()
            except RemoteProtocolError as exc:
                raise ProtocolViolationError(f"bad handshake from the broker: {exc}") from exc
            if ev is NEED_DATA:
                continue
            if isinstance(ev, F.Err):
                raise for_code(ev.code, ev.message)
            if isinstance(ev, F.Welcome):
                return ev
            raise ProtocolViolationError("the broker did not answer HELLO")  # pragma: no cover

    async def close(self) -> None:
        """Send what is pending, then close. Idempotent."""
        if self._closed:
            return
        try:
            if self._error is None and self._out:
                with anyio.move_on_after(self.timeout, shield=True):
                    await self._wait_drained()
        finally:
            self._shutdown(ConnectionClosedError("the client was closed"))
            if self._stream is not None:
                with anyio.CancelScope(shield=True):
                    await self._stream.aclose()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()

    def _shutdown(self, error: TidingsError) -> None:
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = error
        for w in list(self._requests.values()) + list(self._confirms.values()) + list(self._replies.values()):
            w.fail(error)
        self._requests.clear()
        self._confirms.clear()
        self._replies.clear()
        clean = isinstance(error, ConnectionClosedError) and str(error) == "the client was closed"
        for sub in list(self._subs.values()):
            sub._end(None if clean else error)
        for cons in list(self._consumers.values()):
            cons._end(None if clean else error)
        if self._in_flight_space is not None:
            self._in_flight_space.set()
        self._wake.set()
        if self._drained is not None:
            self._drained.set()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise self._error or ConnectionClosedError("the connection is closed")

    # ------------------------------------------------------------- writer

    def _wake_writer(self) -> None:
        if self._writer_idle:
            self._writer_idle = False
            self._wake.set()

    async def _writer(self) -> None:
        conn = self._conn
        try:
            while True:
                if not self._out:
                    if self._drained is not None:
                        self._drained.set()
                        self._drained = None
                    if self._closed:
                        return
                    self._writer_idle = True
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                out, self._out = self._out, []
                self._cur_pub = None
                self._cur_ack = None
                self._pub_bytes = 0
                parts: list[bytes] = []
                for w in out:
                    if w[0] == F.Op.PUB:
                        self._encode_pubs(w[1], parts)
                    else:
                        conn.encode_wire(w, parts)
                assert self._stream is not None
                await self._stream.send(b"".join(parts))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._shutdown(ConnectionClosedError(f"connection lost: {exc}"))
        finally:
            self._writer_done.set()

    def _encode_pubs(self, pubs: list[list[Any]], parts: list[bytes]) -> None:
        try:
            self._conn.encode_wire([F.Op.PUB, pubs], parts)
            return
        except LocalProtocolError:
            if len(pubs) == 1:
                raise
        half = len(pubs) // 2
        self._encode_pubs(pubs[:half], parts)
        self._encode_pubs(pubs[half:], parts)

    async def _wait_drained(self) -> None:
        """Wait until the writer has handed everything pending to the socket."""
        while self._out and not self._closed:
            if self._drained is None:
                self._drained = anyio.Event()
            ev = self._drained
            self._wake_writer()
            await ev.wait()

    def _send(self, wire: list[Any]) -> None:
        self._out.append(wire)
        self._cur_pub = None
        self._cur_ack = None
        self._wake_writer()

    def _queue_pub(self, m: list[Any]) -> None:
        cur = self._cur_pub
        if cur is None:
            cur = self._cur_pub = []
            self._out.append([F.Op.PUB, cur])
            self._cur_ack = None
        cur.append(m)
        self._pub_bytes += len(m[1]) + len(m[0]) + MSG_OVERHEAD
        if self._writer_idle:
            self._writer_idle = False
            self._wake.set()

    def _queue_ack(self, cid: int, item: list[Any]) -> None:
        cur = self._cur_ack
        if cur is None or cur[0] != cid:
            items: list[list[Any]] = []
            self._out.append([F.Op.ACK, 0, cid, items])
            cur = self._cur_ack = (cid, items)
            self._cur_pub = None
        cur[1].append(item)
        self._wake_writer()

    # ------------------------------------------------------------- reader

    async def _reader(self) -> None:
        conn = self._conn
        stream = self._stream
        assert stream is not None
        error: TidingsError
        try:
            while True:
                data = await stream.receive(READ_CHUNK)
                conn.receive_data(data)
                while True:
                    ev = conn.next_event()
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        raise anyio.EndOfStream
                    self._dispatch(ev)  # type: ignore[arg-type]
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            last = self.last_server_error
            error = self._error or last or ConnectionClosedError(
                f"the broker closed the connection ({exc.__class__.__name__})")
        except ProtocolError as exc:
            log.error("protocol violation from the broker: %s", exc)
            error = ProtocolViolationError(str(exc))
        self._shutdown(error)
        with anyio.CancelScope(shield=True):
            await stream.aclose()

    def _dispatch(self, ev: F.Frame) -> None:
        t = type(ev)
        if t is F.Msg:
            sid = ev.sid  # type: ignore[union-attr]
            sub = self._subs.get(sid)
            if sub is not None:
                sub._push(ev.messages)  # type: ignore[union-attr]
            elif sid == self._inbox_sid:
                self._on_replies(ev.messages)  # type: ignore[union-attr]
        elif t is F.Deliver:
            cons = self._consumers.get(ev.cid)  # type: ignore[union-attr]
            if cons is not None:
                cons._push(ev.items)  # type: ignore[union-attr]
        elif t is F.Confirm:
            confirms = self._confirms
            n = 0
            for seq, code, result in ev.items:  # type: ignore[union-attr]
                w = confirms.pop(seq, None)
                if w is not None:
                    n += 1
                    if code:
                        w.fail(for_code(code, result if isinstance(result, str) else "publish failed"))
                    else:
                        w.set(PublishAck.from_wire(result))
            if n:
                self._in_flight -= n
                sp = self._in_flight_space
                if sp is not None and self._in_flight < self.max_in_flight:
                    self._in_flight_space = None
                    sp.set()
        elif t is F.Ok:
            w = self._requests.pop(ev.rid, None)  # type: ignore[union-attr]
            if w is not None:
                w.set(ev.result)  # type: ignore[union-attr]
        elif t is F.Err:
            err = for_code(ev.code, ev.message)  # type: ignore[union-attr]
            w = self._requests.pop(ev.rid, None) if ev.rid else None  # type: ignore[union-attr]
            if w is not None:
                w.fail(err)
            else:
                # A connection-level error: the broker closes the connection after
                # fatal ones (then this becomes the reason); others are notices.
                log.warning("broker error: %s (code %s)", ev.message, ev.code)  # type: ignore[union-attr]
                self.last_server_error = err
        elif t is F.Ping:
            self._send([F.Op.PONG, ev.rid])  # type: ignore[union-attr]
        elif t is F.Pong:
            w = self._requests.pop(ev.rid, None)  # type: ignore[union-attr]
            if w is not None:
                w.set(None)
        elif t is F.Notice:
            self._on_notice(ev.kind, ev.info)  # type: ignore[union-attr]

    def _on_notice(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "bindings":
            self._apply_bindings(info)
        elif kind == "slow_consumer":
            sub = self._subs.get(info.get("sid", -1))
            n = info.get("dropped", 0)
            if sub is not None and isinstance(n, int):
                sub.dropped_by_broker += n
            log.warning("the broker dropped %s messages for subscription %s: this client is too slow", n,
                        info.get("sid"))
        elif kind == "shutdown":
            log.info("the broker is shutting down")
        elif kind == "consumer_closed":
            cons = self._consumers.pop(info.get("cid", -1), None)
            if cons is not None:
                cons._end(None)
        elif kind == "assignment":
            cons = self._consumers.get(info.get("cid", -1))
            if cons is not None:
                cons.assignment = (info.get("generation", 0), list(info.get("partitions", [])))
        elif kind == "stale_acks":
            cons = self._consumers.get(info.get("cid", -1))
            if cons is not None:
                cons._stale(int(info.get("count", 0)))

    def _apply_bindings(self, info: Any) -> None:
        if not isinstance(info, dict):
            return
        epoch, patterns = info.get("epoch"), info.get("patterns")
        if isinstance(epoch, int) and isinstance(patterns, list) and epoch >= self._bindings_epoch:
            self._bindings_epoch = epoch
            self._bindings = PatternSet([p for p in patterns if isinstance(p, str)])

    # ------------------------------------------------------------ publish

    def _check_subject(self, subject: str) -> None:
        if subject not in self._subjects:
            try:
                validate_subject(subject)
            except RemoteProtocolError as exc:
                raise InvalidSubjectError(exc.message) from None
            if len(self._subjects) > 4096:
                self._subjects.clear()
            self._subjects.add(subject)

    def _message(self, subject: str, payload: Any, headers: dict[str, Any] | None, reply: str | None,
                 msg_id: str | None, key: str | None, delay: float | None, at: Any,
                 ttl: float | None) -> list[Any]:
        if type(payload) is not bytes:
            payload = payload.encode() if isinstance(payload, str) else bytes(payload)
        if len(payload) > self._conn.max_payload:
            raise InvalidArgumentError(
                f"payload of {len(payload)} bytes exceeds the broker's max_payload of {self._conn.max_payload}")
        self._check_subject(subject)
        if reply is not None:
            self._check_subject(reply)
        opts: dict[str, Any] | None = None
        if msg_id is not None or key is not None or delay is not None or at is not None or ttl is not None:
            opts = {}
            if msg_id is not None:
                opts[F.OPT_MSG_ID] = str(msg_id)
            if key is not None:
                opts[F.OPT_KEY] = str(key)
            if delay is not None:
                opts[F.OPT_DELAY] = max(0, int(delay * 1000))
            if at is not None:
                ts = at.timestamp() if hasattr(at, "timestamp") else float(at)
                opts[F.OPT_AT] = max(0, int(ts * 1000))
            if ttl is not None:
                opts[F.OPT_TTL] = max(1, int(ttl * 1000))
        return [subject, payload, headers, reply, 0, opts]

    def _wants_confirm(self, m: list[Any], confirm: bool | None) -> bool:
        if confirm is not None:
            return confirm
        return m[5] is not None or bool(self._bindings and self._bindings.match(m[0]))

    def publish_nowait(self, subject: str, payload: bytes | bytearray | memoryview | str, *,
                       headers: dict[str, Any] | None = None, reply: str | None = None,
                       msg_id: str | None = None, key: str | None = None, delay: float | None = None,
                       at: Any = None, ttl: float | None = None, confirm: bool | None = None) -> Confirmation:
        """Queue a publish without waiting and return a :class:`Confirmation`
        to await later, so one task can keep many confirms in flight.

        Raises PublishBufferFullError when ``max_in_flight`` publishes are
        already unconfirmed (await some confirmations first), and
        ConnectionClosedError when the connection is gone.
        """
        if self._closed:
            self._check_open()
        m = self._message(subject, payload, headers, reply, msg_id, key, delay, at, ttl)
        if not self._wants_confirm(m, confirm):
            self._queue_pub(m)
            return Confirmation(None)
        if self._in_flight >= self.max_in_flight:
            raise PublishBufferFullError(f"{self._in_flight} publishes are waiting for confirms")
        return Confirmation(self._queue_confirmed(m))

    def _queue_confirmed(self, m: list[Any]) -> _Waiter:
        seq = next(self._seqs)
        m[4] = seq
        w = _Waiter()
        self._confirms[seq] = w
        self._in_flight += 1
        self._queue_pub(m)
        return w

    async def publish(self, subject: str, payload: bytes | bytearray | memoryview | str, *,
                      headers: dict[str, Any] | None = None, reply: str | None = None,
                      msg_id: str | None = None, key: str | None = None, delay: float | None = None,
                      at: Any = None, ttl: float | None = None, confirm: bool | None = None) -> PublishAck | None:
        """Publish ``payload`` to ``subject``.

        When no durable queue or stream is bound to the subject this returns
        None as soon as the message is buffered (the writer sends it with
        others in one frame); :meth:`flush` waits until the broker has it.
        When the subject is bound to a durable target (the broker tells the
        client which patterns are bound), or ``confirm=True``, or a durable
        option is given, it returns only after the broker committed the
        message to storage, with a :class:`PublishAck`; it raises the mapped
        error (e.g. QueueFullError, StorageFullError) if it was not stored.

        ``msg_id`` de-duplicates within the broker's window; ``delay``
        (seconds) or ``at`` (datetime or epoch seconds) defer delivery;
        ``ttl`` (seconds) expires the message if not delivered in time;
        ``key`` picks a stream partition.
        """
        if self._closed:
            self._check_open()
        m = self._message(subject, payload, headers, reply, msg_id, key, delay, at, ttl)
        if self._wants_confirm(m, confirm):
            while self._in_flight >= self.max_in_flight and not self._closed:
                if self._in_flight_space is None:
                    self._in_flight_space = anyio.Event()
                await self._in_flight_space.wait()
            self._check_open()
            result: PublishAck = await self._queue_confirmed(m).wait()
            return result
        self._queue_pub(m)
        if self._pub_bytes >= FLUSH_BYTES:
            await self._wait_drained()
        return None

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has received and processed everything sent so far
        (a PING/PONG round trip behind all pending frames)."""
        await self._request([F.Op.PING, 0], timeout, rid_index=1)

    async def _request(self, wire: list[Any], timeout: float | None = None, rid_index: int = 1) -> Any:
        self._check_open()
        rid = next(self._rids)
        wire[rid_index] = rid
        w = _Waiter()
        self._requests[rid] = w
        self._send(wire)
        t = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(t):
                return await w.wait()
        except builtins.TimeoutError as exc:
            if isinstance(exc, TidingsError):
                raise
            raise TimeoutError(f"no answer from the broker within {t}s") from exc
        finally:
            self._requests.pop(rid, None)

    async def call(self, method: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Invoke a named broker method (admin and introspection); returns its result."""
        return await self._request([F.Op.CALL, 0, method, args or {}], timeout)

    # ---------------------------------------------------------- subscribe

    async def subscribe(self, pattern: str, group: str | None = None, *,
                        max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Subscribe to ``pattern`` (``*`` one token, ``>`` the rest).

        With ``group``, the subscription joins that queue group: each
        message goes to one member of the group. Returns once the broker
        has registered it, so messages published afterwards are received.
        """
        try:
            validate_pattern(pattern)
        except RemoteProtocolError as exc:
            raise InvalidSubjectError(exc.message) from None
        sid = next(self._sids)
        sub = Subscription(self, sid, pattern, group, max_pending)
        self._subs[sid] = sub
        try:
            await self._request([F.Op.SUB, 0, sid, pattern, group])
        except BaseException:
            self._subs.pop(sid, None)
            raise
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is None or self._closed:
            return
        await self._request([F.Op.UNSUB, 0, sub.sid])

    # ------------------------------------------------------------ queues

    async def declare_queue(self, name: str, *, bind: list[str] | tuple[str, ...] = (),
                            **settings: Any) -> dict[str, Any]:
        """Create a durable queue (or confirm an identical one exists).

        ``bind``: subject patterns whose publishes are stored in the queue.
        Settings (all optional): ack_deadline (s), max_deliveries (0 =
        unlimited; default 5), backoff_initial, backoff_multiplier,
        backoff_max, backoff_jitter, backoff_schedule (list of s),
        dead_letter (default "<name>.dlq"), message_ttl (s),
        dead_letter_expired, max_length, overflow ("reject" or
        "dead_letter_oldest"). Raises ConflictError if the queue exists with
        different settings. Returns the queue's info.
        """
        args = {"name": name, "bind": list(bind), **settings}
        return await self.call("queue.declare", args)  # type: ignore[no-any-return]

    async def delete_queue(self, name: str) -> dict[str, Any]:
        return await self.call("queue.delete", {"name": name})  # type: ignore[no-any-return]

    async def purge_queue(self, name: str) -> int:
        return (await self.call("queue.purge", {"name": name}))["purged"]  # type: ignore[no-any-return]

    async def queue_info(self, name: str) -> dict[str, Any]:
        return await self.call("queue.info", {"name": name})  # type: ignore[no-any-return]

    async def list_queues(self) -> list[dict[str, Any]]:
        return await self.call("queue.list")  # type: ignore[no-any-return]

    async def dlq_list(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Peek at a dead-letter queue's messages (they stay where they are)."""
        return await self.call("dlq.list", {"name": queue, "limit": limit, "offset": offset})  # type: ignore

    async def dlq_redrive(self, queue: str, *, count: int | None = None, to: str | None = None) -> int:
        """Move up to ``count`` (default all) messages from dead-letter queue
        ``queue`` back to their source queue (or to queue ``to``)."""
        args: dict[str, Any] = {"name": queue}
        if count is not None:
            args["count"] = count
        if to is not None:
            args["to"] = to
        return (await self.call("dlq.redrive", args))["redriven"]  # type: ignore[no-any-return]

    async def dlq_purge(self, queue: str) -> int:
        return (await self.call("dlq.purge", {"name": queue}))["purged"]  # type: ignore[no-any-return]

    def consume(self, queue: str, *, prefetch: int = 100) -> ConsumeContext:
        """``async with tc.consume(queue, prefetch=N) as deliveries:`` then
        ``async for d in deliveries:``; settle each with ack/nack/reject."""
        return ConsumeContext(self, queue, {"queue": queue, "prefetch": prefetch})

    async def _start_consumer(self, name: str, args: dict[str, Any],
                              kind: type[Delivery] = Delivery) -> QueueConsumer:
        cid = next(self._cids)
        cons = QueueConsumer(self, cid, name, args.get("prefetch") or args.get("window") or 0, kind)
        self._consumers[cid] = cons
        try:
            cons.info = await self._request([F.Op.CONSUME, 0, cid, args])
        except BaseException:
            self._consumers.pop(cid, None)
            raise
        return cons

    # ----------------------------------------------------------- streams

    async def declare_stream(self, name: str, *, partitions: int = 1, bind: list[str] | tuple[str, ...] = (),
                             **settings: Any) -> dict[str, Any]:
        """Create a stream of ``partitions`` ordered partitions bound to ``bind``
        patterns (or confirm an identical one exists; ConflictError if it
        differs). Settings: max_age (s), max_messages and max_bytes (per
        partition), max_deliveries (default 5, then the stream's DLQ),
        ack_deadline (s), backoff_initial/multiplier/max (s), dead_letter."""
        args = {"name": name, "partitions": partitions, "bind": list(bind), **settings}
        return await self.call("stream.declare", args)  # type: ignore[no-any-return]

    async def delete_stream(self, name: str) -> dict[str, Any]:
        return await self.call("stream.delete", {"name": name})  # type: ignore[no-any-return]

    async def stream_info(self, name: str) -> dict[str, Any]:
        return await self.call("stream.info", {"name": name})  # type: ignore[no-any-return]

    async def list_streams(self) -> list[dict[str, Any]]:
        return await self.call("stream.list")  # type: ignore[no-any-return]

    def stream_consume(self, stream: str, group: str, *, window: int = 100,
                       start: str = "earliest") -> ConsumeContext:
        """``async with tc.stream_consume(stream, group=...) as msgs:`` joins a
        consumer group. Partitions are shared among the group's members and
        each is delivered in order, at most ``window`` unacked at a time;
        ``await m.ack()`` commits. ``start`` applies to a new group."""
        return ConsumeContext(self, stream, {"stream": stream, "group": group, "window": window,
                                             "start": start}, StreamMessage)

    async def read_stream(self, stream: str, partition: int = 0, start: Any = "earliest", *,
                          follow: bool = False, out_of_range: str = "error") -> Any:
        """Replay one partition outside any group: an async iterator of
        StreamMessage from ``start`` ("earliest", "latest", an offset, or a
        datetime / {"time_ms": ...}), ending at the end of the partition
        unless ``follow``. An offset outside what is retained raises
        OffsetOutOfRangeError, or starts at the earliest with
        ``out_of_range="earliest"``."""
        if hasattr(start, "timestamp"):
            start = {"time_ms": int(start.timestamp() * 1000)}
        args = {"stream": stream, "partition": partition, "start": start, "follow": follow,
                "out_of_range": out_of_range}
        cons = await self._start_consumer(stream, args, StreamMessage)
        try:
            async for m in cons:
                yield m
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_consumer(cons)

    async def _stop_consumer(self, cons: QueueConsumer) -> None:
        cons._end(None)
        if self._consumers.pop(cons.cid, None) is None or self._closed:
            return
        try:
            await self._request([F.Op.STOP, 0, cons.cid])
        except (ConnectionClosedError, TimeoutError):
            pass

    # ------------------------------------------------------ request/reply

    async def _ensure_inbox(self) -> None:
        if self._inbox_sid:
            return
        sid = next(self._sids)
        self._inbox_sid = sid
        try:
            await self._request([F.Op.SUB, 0, sid, self._inbox + ".>", None])
        except BaseException:
            self._inbox_sid = 0
            raise

    def _on_replies(self, msgs: list[list[Any]]) -> None:
        for m in msgs:
            w = self._replies.pop(m[0], None)
            if w is not None:
                w.set(Message(m[0], m[1], m[2], m[3], self))

    async def request(self, subject: str, payload: bytes | str = b"", *, headers: dict[str, Any] | None = None,
                      timeout: float = 5.0) -> Message:
        """Publish a request and return the first reply.

        Raises NoRespondersError at once if no subscriber matches
        ``subject``, and client TimeoutError if no reply comes in time."""
        await self._ensure_inbox()
        reply = f"{self._inbox}.{next(self._reply_ids)}"
        w = _Waiter()
        self._replies[reply] = w
        try:
            await self.publish(subject, payload, headers=headers, reply=reply)
            with anyio.fail_after(timeout):
                msg: Message = await w.wait()
        except builtins.TimeoutError as exc:
            if isinstance(exc, TidingsError):
                raise
            raise TimeoutError(f"no reply on {subject!r} within {timeout}s") from exc
        finally:
            self._replies.pop(reply, None)
        if not msg.payload and msg.headers and msg.headers.get("status") == "503":
            raise NoRespondersError(f"no responders for {subject!r}")
        return msg


class PublishAck:
    """What the broker confirmed for a durable publish: the stored message's
    ``id``, how many ``queues`` stored it, and ``duplicate`` if the msg_id
    had been seen within the de-duplication window (stored once)."""

    __slots__ = ("id", "queues", "duplicate", "stream", "partition", "offset", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.id: int | None = raw.get("id")
        self.queues: int = raw.get("queues", 0)
        self.duplicate: bool = bool(raw.get("duplicate", False))
        self.stream: str | None = raw.get("stream")
        self.partition: int | None = raw.get("partition")
        self.offset: int | None = raw.get("offset")

    def __iter__(self) -> Any:
        """``partition, offset = await tc.publish(...)`` when a stream stored it."""
        return iter((self.partition, self.offset))

    @classmethod
    def from_wire(cls, result: Any) -> PublishAck | None:
        return cls(result) if isinstance(result, dict) else None

    def __repr__(self) -> str:
        where = f", stream={self.stream!r}, partition={self.partition}, offset={self.offset}" if self.stream else ""
        return f"PublishAck(id={self.id}, queues={self.queues}, duplicate={self.duplicate}{where})"


class Confirmation:
    """An awaitable for one publish's confirm (see :meth:`Client.publish_nowait`)."""

    __slots__ = ("_w",)

    def __init__(self, waiter: _Waiter | None) -> None:
        self._w = waiter

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> PublishAck | None:
        if self._w is None:
            return None
        result: PublishAck | None = await self._w.wait()
        return result

    def done(self) -> bool:
        return self._w is None or self._w.event.is_set()


class connect:
    """``async with connect(url) as tc:`` opens a :class:`Client` and closes it on exit.

    ``url`` is ``tidings://HOST:PORT`` (default ``tidings://127.0.0.1:7421``).
    Raises ConnectError if the broker cannot be reached or refuses us.
    """

    def __init__(self, url: str = DEFAULT_URL, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._client = Client(url, name=name, timeout=timeout)
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Client:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await self._client._start(tg)
        except BaseException:
            # Close the (still empty) task group without handing it the error,
            # so the caller sees ConnectError itself, not an ExceptionGroup.
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self._client

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> bool | None:
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._client.close()
        finally:
            result = await self._tg.__aexit__(et, ev, tb)
        return result
