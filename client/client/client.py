"""The tidings client: one connection, coalesced writes, requests matched by id,
and a supervisor that rides through broker restarts.

Hot path (see docs/CLIENT.md): ``publish`` appends the message to a pending
batch and returns; one writer task turns everything pending into as few
frames and one socket write per wake-up. A publisher that never yields is
made to wait once the pending batch reaches ``FLUSH_BYTES``, so a plain
loop of awaited publishes runs at full speed with bounded memory. The
reader task decodes whole 64 KiB chunks and hands each MSG batch to its
subscription in one step.

Resilience: a heartbeat task PINGs an idle broker and declares it dead
after ``dead_after`` seconds of silence; a lost connection is re-dialled
with exponential backoff and jitter (a URL with several brokers tries the
others first, then round the list), every subscription and consumer is
restored, and unconfirmed durable publishes are resent with their message
ids (generated when the application gave none), so the broker's
de-duplication makes the resend invisible.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import importlib
import itertools
import logging
import os
import random
import re
import secrets
import ssl
import time
from typing import Any, AsyncGenerator, Callable, Final, Generator, Sequence
from urllib.parse import quote, unquote, urlsplit

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, TaskGroup

from tidings.protocol import CLOSED, NEED_DATA, Connection, Role
from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tidings.protocol.filters import FilterError, compile_filter
from tidings.protocol.frames import M_HEADERS, M_PAYLOAD, M_REPLY, M_SUBJECT, P_OPTS, P_SEQ
from tidings.protocol.numbers import MAX_DURATION_MS, MAX_PRIORITY, MAX_TIMESTAMP_MS
from tidings.protocol.subjects import PatternSet, validate_pattern, validate_subject
from tidings.protocol.vocabulary import DEFAULT_PORT

from tidings.client.admin import ConsumeContext, Durable, DurablePort
from tidings.client.codec import UNSET, Payload, to_bytes, with_json
from tidings.client.consumer import ConsumerPort, Delivery, DeliveryT, QueueConsumer, StreamMessage
from tidings.client.errors import (
    ConnectError,
    ConnectionClosedError,
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotABrokerError,
    NotFoundError,
    ProtocolViolationError,
    PublishBufferFullError,
    TidingsError,
    TimeoutError,
    for_code,
)
from tidings.client.events import Upcaster, Upcasters, encode_data, event_headers
from tidings.client.message import Message
from tidings.client.results import Confirmation, PublishAck, Waiter
from tidings.client.schemas import Schemas
from tidings.client.subscription import DEFAULT_MAX_PENDING, Subscription, SubscriptionPort
from tidings.client.tracing import CURRENT, PROPAGATION, Propagation
from tidings.client.units import seconds_to_ms

log = logging.getLogger(__name__)

DEFAULT_URL: Final = V.DEFAULT_URL
READ_CHUNK: Final = 65_536
FLUSH_BYTES: Final = 256 * 1024  # a publisher waits for the writer once this much is pending (bounds memory)
DEFAULT_TIMEOUT: Final = 10.0  # seconds for requests, flush and the handshake unless told otherwise
MSG_OVERHEAD: Final = 16
# PUB frames are cut to about this size (still one write): the broker counts the arrays and maps
# of frames over 128 KiB as it decodes them (protocol/codec.py), which costs it a little per
# message; frames this size are as cheap per message and need no counting.
PUB_FRAME_TARGET: Final = 96 * 1024
CLIENT_MAX_FRAME: Final = 32 * 1024 * 1024 + 64 * 1024  # any frame a broker may send (max_payload <= 32 MiB)
DEFAULT_MAX_IN_FLIGHT: Final = 65_536  # unconfirmed durable publishes one client keeps before publish waits
DEFAULT_MAX_IN_FLIGHT_BYTES: Final = 64 * 1024 * 1024  # ... and their payload bytes
DEFAULT_OUTAGE_BUFFER: Final = 8 * 1024 * 1024  # bytes of plain publishes kept while disconnected
REPLY_ID_BYTES: Final = 12  # random bytes per request's reply subject (96 bits: not guessable)
URL_FORM: Final = "tidings://HOST:PORT[,HOST:PORT...] (or tidings+tls://...)"  # what error messages show
HANDSHAKE_QUOTE: Final = 40  # first bytes of a non-tidings answer quoted in NotABrokerError
TLS_RECORDS: Final = (b"\x15", b"\x16")  # first byte of a TLS alert or handshake record

# A new connection's binding set: (epoch, patterns, frames that arrived before its last chunk).
_Initial = tuple[int, list[str], list[F.Frame]]


def _add_chunk(building: tuple[int, list[str]] | None, info: dict[str, Any]) -> tuple[int, list[str]] | None:
    """Add one bindings NOTICE's patterns to the set being built (a new
    epoch starts a new set); a malformed notice leaves it as it was."""
    epoch, patterns = info.get("epoch"), info.get("patterns")
    if type(epoch) is not int or not isinstance(patterns, list):
        return building
    if building is None or building[0] != epoch:
        building = (epoch, [])
    building[1].extend(p for p in patterns if isinstance(p, str))
    return building


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerURL:
    """A parsed broker URL: the brokers to try (in the URL's order, duplicates dropped),
    TLS or not, and the credentials it carries (``tidings://USER:PASSWORD@...``,
    percent-decoded; None when absent). ``str()`` shows it without the password."""

    addresses: tuple[tuple[str, int], ...]
    tls: bool = False
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = "tidings+tls" if self.tls else "tidings"
        user = f"{quote(self.user, safe='')}@" if self.user is not None else ""
        return f"{scheme}://{user}{','.join(_hostport(a) for a in self.addresses)}"


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_urls(url: str) -> BrokerURL:
    """``tidings://[USER[:PASSWORD]@]HOST:PORT[,HOST:PORT...]`` (or ``tidings+tls://``)
    -> :class:`BrokerURL`.

    Comma-separated addresses name the brokers of one service (docs/SCALING.md); an
    IPv6 address goes in brackets (``[::1]:7421``); a missing port is 7421; ``host:port``
    and ``host`` without a scheme mean ``tidings://``. Raises ValueError, one line
    naming the bad part (never the password) and what a URL should look like."""
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise ValueError(f"empty broker URL: a tidings URL looks like {URL_FORM}")
    if "://" not in text:
        text = f"tidings://{text}"  # "localhost:7421"
    scheme, _, rest = text.partition("://")
    cut = re.search(r"[/?#]", rest)
    netloc, after = (rest[:cut.start()], rest[cut.start():]) if cut else (rest, "")
    userinfo, at, hosts = netloc.rpartition("@")
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user, password = unquote(name) or None, (unquote(secret) if colon else None)  # "@host": no user
    shown = f"{scheme}://{userinfo.partition(':')[0]}@{hosts}" if at else text  # never the password
    if scheme not in ("tidings", "tidings+tls"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {shown!r}: a tidings URL looks like {URL_FORM}")
    if after not in ("", "/"):
        raise ValueError(f"malformed broker URL {shown!r} (a path, query or fragment): "
                         f"a tidings URL looks like {URL_FORM}")
    entries = hosts.split(",")
    addresses: list[tuple[str, int]] = []
    for n, entry in enumerate(entries, 1):
        where = f"address {n} of {len(entries)}, {entry!r}" if len(entries) > 1 else repr(entry)
        if len(entries) > 1 and not entry.strip():
            raise ValueError(f"malformed broker URL {shown!r} (address {n} of {len(entries)} is empty): "
                             f"a tidings URL looks like {URL_FORM}")
        try:
            parts = urlsplit(f"//{entry.strip()}")
            port = parts.port
        except ValueError as exc:  # a port that is not a number, an unclosed [IPv6 address
            raise ValueError(f"malformed broker URL {shown!r} ({where}: {exc}): "
                             f"a tidings URL looks like {URL_FORM}") from None
        address = (parts.hostname or "127.0.0.1", port or DEFAULT_PORT)
        if address not in addresses:
            addresses.append(address)
    return BrokerURL(tuple(addresses), scheme == "tidings+tls", user, password)


def parse_url(url: str) -> tuple[str, int, bool]:
    """``tidings://host:port`` -> (host, port, tls) of the URL's first address
    (:func:`parse_urls` gives them all). Raises ValueError as parse_urls does."""
    parsed = parse_urls(url)
    return *parsed.addresses[0], parsed.tls


class Client:
    """A connection to a tidings broker. Create it with :func:`connect`.

    ``state`` is "connected", "disconnected" (reconnecting) or "closed";
    ``on_state_change(state)`` is called on each change with "connected",
    "disconnected", "reconnected" or "closed". ``durable`` holds the queue,
    dead-letter and stream operations (:class:`~tidings.client.admin.Durable`);
    the client forwards them, so ``tc.declare_queue(...)`` works as well.
    """

    def __init__(self, url: str = DEFAULT_URL, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, reconnect: bool = True,
                 reconnect_wait: tuple[float, float] = (0.05, 2.0), max_reconnects: int | None = None,
                 heartbeat: float = 1.5, dead_after: float = 6.0,
                 outage_buffer: int = DEFAULT_OUTAGE_BUFFER, auto_msg_id: bool = False,
                 on_state_change: Callable[[str], Any] | None = None,
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, ca_file: str | None = None,
                 inbox_prefix: str | None = None, tracing: str | None = None) -> None:
        if dead_after <= heartbeat:
            raise ValueError("dead_after must be longer than heartbeat")
        if inbox_prefix is not None:
            try:
                validate_subject(inbox_prefix.rstrip("."))
            except ProtocolError:
                raise ValueError(f"inbox_prefix {inbox_prefix!r} is not a valid subject prefix") from None
        self.inbox_prefix = inbox_prefix
        self.url = url
        self._url = parse_urls(url)  # ValueError here, before anything is dialled
        # The order the brokers are tried in: shuffled once per client, so that the clients of a
        # service spread over its brokers, then round robin from there (see _dial).
        self._order = list(self._url.addresses)
        random.shuffle(self._order)
        self._next = 0  # index in _order of the broker the next dial tries first
        self.address: tuple[str, int] | None = None  # (host, port) of the broker connected to, None between
        self.name = name or f"python-client/{os.getpid()}"
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_wait = reconnect_wait
        self.max_reconnects = max_reconnects
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.outage_buffer = outage_buffer
        self.auto_msg_id = auto_msg_id
        self.on_state_change = on_state_change
        self._auth: dict[str, Any] | None = None
        if token is not None:
            self._auth = {"token": token}
        elif user is not None:
            self._auth = {"user": user, "password": password or ""}
        elif self._url.user is not None:  # tidings://USER:PASSWORD@...: the keywords win
            self._auth = {"user": self._url.user, "password": self._url.password or ""}
        self._ssl_context = ssl_context
        self._ca_file = ca_file
        self.state = "connecting"
        self.reconnects = 0
        self.server_info: dict[str, Any] = {}
        self.last_server_error: TidingsError | None = None
        self._conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self._stream: ByteStream | None = None
        self._tg: TaskGroup | None = None
        # The task that owns the client's task group (see _open): not the caller's task, so
        # connect and close may run in different tasks (a framework's startup and shutdown hooks).
        self._runner: asyncio.Task[None] | None = None  # asyncio holds tasks weakly: keep it
        self._runner_scope: anyio.CancelScope | None = None
        self._runner_done: anyio.Event | None = None
        self._runner_id = 0
        self._conn_scope: anyio.CancelScope | None = None
        self._restoring: list[tuple[Any, Waiter]] | None = None
        self._loss: TidingsError | None = None
        self._closed = False
        self._error: TidingsError | None = None
        self._last_rx = time.monotonic()
        self._connected = anyio.Event()
        # Outbound frames in the order the application issued them. Publishes
        # (and acks) extend the trailing PUB (ACK) frame while it is the last one.
        self._out: list[list[Any]] = []
        self._cur_pub: list[list[Any]] | None = None
        self._cur_ack: tuple[int, list[list[Any]]] | None = None
        self._pub_bytes = 0
        self._wake = anyio.Event()
        self._writer_idle = False
        self._drained: anyio.Event | None = None
        # correlation
        self._rids = itertools.count(1)
        self._seqs = itertools.count(1)
        self._sids = itertools.count(1)
        self._requests: dict[int, Waiter] = {}
        self._confirms: dict[int, Waiter] = {}
        self._unconfirmed: dict[int, list[Any]] = {}
        self._id_prefix = f"{secrets.token_hex(6)}-"
        self._subs: dict[int, Subscription] = {}
        self._consumers: dict[int, QueueConsumer[Any]] = {}
        self._cids = itertools.count(1)
        self._in_flight = 0
        self.max_in_flight = DEFAULT_MAX_IN_FLIGHT
        self.max_in_flight_bytes = DEFAULT_MAX_IN_FLIGHT_BYTES
        self._unconfirmed_bytes = 0  # payload bytes kept for a resend until confirmed
        self._in_flight_space: anyio.Event | None = None
        self._subjects: set[str] = set()
        self._bindings = PatternSet()
        self._bindings_epoch = -1
        self._bindings_building: tuple[int, list[str]] | None = None  # a set whose last chunk is still due
        self._early: list[F.Frame] = []  # frames that arrived while connect() waited for the bindings
        # request/reply
        self._inbox = ""  # chosen at the first request, once the broker has said who we are
        self._inbox_sid = 0
        self._replies: dict[str, Waiter] = {}
        # What the objects this client hands out may ask of it (their ports; they never see the client).
        self._sub_port = SubscriptionPort(self, self._unsubscribe)
        self.upcasters = Upcasters()  # Message.event / Delivery.event lift old event versions with these
        self._consumer_port = ConsumerPort(self._check_open, self._queue_ack, self._settle_now, self.upcasters)
        self.durable = Durable(DurablePort(self.call, self._open_consumer, self._close_consumer))
        self.schemas = Schemas(self.call)  # the schema registry (client/schemas.py)
        # How handlers run in their message's trace context (Worker, App): W3C propagation, or
        # OpenTelemetry spans once instrumented (tracing="otel": imported only then).
        self.tracing: Propagation = PROPAGATION
        if tracing == "otel":
            from tidings.client.otel import instrument

            instrument(self)
        elif tracing is not None:
            raise ValueError(f"tracing must be None (W3C propagation) or 'otel', not {tracing!r}")

    # ----------------------------------------------------------- lifecycle

    def _set_state(self, state: str) -> None:
        self.state = "connected" if state == "reconnected" else state
        if self.on_state_change is not None:
            try:
                self.on_state_change(state)
            except Exception:  # a user callback must not break the connection
                log.exception("on_state_change callback failed")

    async def _open(self) -> Client:
        """Connect, and start the client's tasks in a task of their own; returns
        once connected, raises ConnectError (or the broker's refusal).

        The task group of the reader, writer and supervisor must be entered and
        left in one task. It lives in a runner task this client owns (close()
        cancels it and waits for it to end), not in the caller's task, so the
        application may open the client in one task and close it in another
        (a framework's startup and shutdown hooks), or close it under a timeout."""
        if self._runner_done is not None or self._closed:
            raise RuntimeError("a Client is opened once: call tidings.connect() again for a new connection")
        ready = anyio.Event()
        done = self._runner_done = anyio.Event()
        scope = self._runner_scope = anyio.CancelScope()
        failed: list[BaseException] = []
        name = f"tidings client {self._url}"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - not asyncio: trio (not a test dependency)
            importlib.import_module("trio.lowlevel").spawn_system_task(self._run, ready, failed, name=name)
        else:
            self._runner = loop.create_task(self._run(ready, failed), name=name)
        try:
            await ready.wait()
        except BaseException:
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise
        if failed:
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise failed[0]
        return self

    async def _run(self, ready: anyio.Event, failed: list[BaseException]) -> None:
        """The runner task: owns the task group until close() cancels it or the supervisor gives up."""
        self._runner_id = anyio.get_current_task().id
        assert self._runner_scope is not None
        try:
            with self._runner_scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    try:
                        stream, conn, welcome, initial = await self._dial()
                    except Exception as exc:  # handed to the caller of connect()
                        self._closed = True
                        failed.append(exc)
                        return
                    finally:
                        ready.set()
                    self._attach(stream, conn, welcome, initial)
                    self._set_state("connected")
                    tg.start_soon(self._supervise)
        except Exception as exc:  # a bug in a client task: close the client with it, do not lose it
            log.exception("the tidings client's tasks failed")
            self._shutdown(ConnectionClosedError(f"the client failed: {exc!r}"))
        finally:
            ready.set()
            assert self._runner_done is not None
            self._runner_done.set()

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        ctx = ssl.create_default_context(cafile=self._ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _dial(self) -> tuple[ByteStream, Connection, F.Welcome, _Initial]:
        """Dial the URL's brokers in turn, from ``_order[_next]`` round the list, until
        one answers; it becomes ``address`` and the next dial starts at it. Raises the
        first refusal that is not retriable (bad credentials, ...) at once, else, when
        none answered, ConnectError naming each one's failure (with one broker: its error)."""
        failures: list[tuple[tuple[str, int], TidingsError]] = []
        for step in range(len(self._order)):
            i = (self._next + step) % len(self._order)
            try:
                dialled = await self._dial_one(*self._order[i])
            except TidingsError as exc:
                if not (isinstance(exc, ConnectError) or exc.retriable):
                    raise
                failures.append((self._order[i], exc))
                continue
            self._next, self.address = i, self._order[i]
            return dialled
        if len(failures) == 1:
            raise failures[0][1]
        raise ConnectError(f"cannot connect to any of the {len(failures)} brokers: "
                           + "; ".join(f"{_hostport(a)}: {e}" for a, e in failures))

    async def _dial_one(self, host: str, port: int) -> tuple[ByteStream, Connection, F.Welcome, _Initial]:
        """Connect to one broker, handshake and receive the durable binding patterns (so
        the first publish already knows whether it needs a confirm); raises
        ConnectError (or the broker's refusal)."""
        tls = self._url.tls
        conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        stream: ByteStream | None = None
        try:
            with anyio.fail_after(self.timeout):
                if tls:
                    stream = await anyio.connect_tcp(host, port, tls=True, ssl_context=self._tls_context(),
                                                     tls_hostname=host, tls_standard_compatible=False)
                else:
                    stream = await anyio.connect_tcp(host, port)
                hello = F.Hello(F.PROTOCOL_VERSION, self.name, self._auth, {F.HELLO_CONFIRM_IDS: True})
                await stream.send(conn.send(hello))
                welcome = await self._read_welcome(stream, conn, f"{host}:{port}")
                initial = await self._read_bindings(stream, conn, welcome)
        except builtins.TimeoutError as exc:
            await _aclose(stream)
            if isinstance(exc, TidingsError):
                raise
            raise ConnectError(f"no answer to the tidings handshake from {host}:{port} within {self.timeout:g}s: "
                               "is a tidings broker listening there?") from exc
        except (OSError, ssl.SSLError, anyio.BrokenResourceError) as exc:
            await _aclose(stream)
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            await _aclose(stream)
            raise
        assert stream is not None
        return stream, conn, welcome, initial

    def _attach(self, stream: ByteStream, conn: Connection, welcome: F.Welcome, initial: _Initial) -> None:
        self._stream = stream
        self._conn = conn
        self.server_info = welcome.info
        # A new connection's set replaces the old one whatever its epoch (a restarted broker
        # counts epochs from 0 again).
        epoch, patterns, self._early = initial
        self._bindings_epoch = epoch
        self._bindings = PatternSet(patterns)
        self._bindings_building = None
        self._last_rx = time.monotonic()
        self._connected.set()

    @staticmethod
    async def _read_bindings(stream: ByteStream, conn: Connection, welcome: F.Welcome) -> _Initial:
        """Read frames after WELCOME until the broker's bindings set (epoch at
        least the one WELCOME announced) is complete; other frames that come
        first are returned to be handled once the connection runs."""
        info = welcome.info.get("bindings")
        if not isinstance(info, dict) or type(info.get("epoch")) is not int:
            return -1, [], []  # a broker that announces no bindings
        if isinstance(info.get("patterns"), list):  # a broker that still sends them in WELCOME
            return info["epoch"], [p for p in info["patterns"] if isinstance(p, str)], []
        announced: int = info["epoch"]
        early: list[F.Frame] = []
        building: tuple[int, list[str]] | None = None
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                raise ProtocolViolationError(f"bad frame from the broker: {exc}") from exc
            if ev is NEED_DATA:
                try:
                    data = await stream.receive(READ_CHUNK)
                except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                    raise ConnectError("the broker closed the connection during the handshake") from exc
                conn.receive_data(data)
                continue
            if ev is CLOSED:
                raise ConnectError("the broker closed the connection during the handshake")
            if isinstance(ev, F.Notice) and ev.kind == V.NOTICE_BINDINGS:
                building = _add_chunk(building, ev.info)
                if building is not None and not ev.info.get("more") and building[0] >= announced:
                    return building[0], building[1], early
                if not ev.info.get("more"):
                    building = None
                continue
            early.append(ev)

    @staticmethod
    async def _read_welcome(stream: ByteStream, conn: Connection, where: str) -> F.Welcome:
        """Read the broker's answer to HELLO. A first answer that is not a tidings frame
        (NATS greets with "INFO {...}", whose first four bytes read as a frame length
        of 1.2 GB) raises NotABrokerError quoting what the peer sent."""
        head = b""  # the first bytes received, quoted if they are not a tidings frame
        while True:
            try:
                data = await stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                raise ConnectError("the broker closed the connection during the handshake") from exc
            if len(head) < HANDSHAKE_QUOTE:
                head += data[:HANDSHAKE_QUOTE - len(head)]
            conn.receive_data(data)
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                if head[:1] in TLS_RECORDS:  # a tidings+tls:// broker (or another TLS server) refusing plain text
                    raise NotABrokerError(f"{where} speaks TLS: use a tidings+tls:// URL") from exc
                raise NotABrokerError(f"{where} is not a tidings broker (it sent {_quote(head)})") from exc
            if ev is NEED_DATA:
                continue
            if isinstance(ev, F.Err):
                raise for_code(ev.code, ev.message)
            if isinstance(ev, F.Welcome):
                return ev
            raise NotABrokerError(f"{where} did not answer the tidings handshake (it sent {_quote(head)})")

    async def _supervise(self) -> None:
        """Serve the connection; on loss, reconnect and restore, or give up."""
        while True:
            reason = await self._serve_connection()
            if self._closed:
                return
            if not self.reconnect:
                self._shutdown(reason)
                return
            log.warning("connection to %s lost (%s); reconnecting", _hostport(self.address or ("?", 0)), reason)
            self._connected = anyio.Event()
            self._set_state("disconnected")
            self._lost(reason)
            if not await self._redial():
                return
            self._restoring = self._restore()

    async def _serve_connection(self) -> TidingsError:
        self._loss = None
        scope = self._conn_scope = anyio.CancelScope()
        try:
            with scope:
                async with anyio.create_task_group() as ctg:
                    ctg.start_soon(self._reader)
                    ctg.start_soon(self._writer)
                    ctg.start_soon(self._heartbeat)
                    if self._restoring is not None:
                        waits, self._restoring = self._restoring, None
                        ctg.start_soon(self._finish_restore, waits)
        finally:
            await _aclose(self._stream)  # shielded; also when close() cancels us
        return self._loss or ConnectionClosedError("the connection ended")

    async def _finish_restore(self, waits: list[tuple[Any, Waiter]]) -> None:
        """Wait for the broker to accept the re-registrations, then say "reconnected"."""
        try:
            with anyio.fail_after(self.timeout):
                for what, w in waits:
                    try:
                        await w.wait()
                    except ConnectionClosedError:
                        return  # this connection broke too: the supervisor redials
                    except TidingsError as exc:
                        log.warning("could not restore %r after reconnect: %s", what, exc)
                        if isinstance(what, (Subscription, QueueConsumer)):
                            what._end(exc)
        except builtins.TimeoutError:
            self._lose(ConnectionClosedError("the broker did not accept the restored session in time"))
            return
        self.reconnects += 1
        self._set_state("reconnected")

    def _lose(self, error: TidingsError) -> None:
        """The current connection is unusable: stop its tasks (the supervisor decides what next)."""
        if self._loss is None:
            self._loss = error
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    def _lost(self, reason: TidingsError) -> None:
        """Forget what died with the connection; keep what a reconnect restores."""
        self._next += 1  # the broker that was lost is tried last: the service's others first
        self.address = None
        err = ConnectionClosedError(f"connection lost ({reason}); the request may or may not have run")
        for w in list(self._requests.values()):
            w.fail(err)
        self._requests.clear()
        # Keep only plain publishes (durable ones are resent from _unconfirmed);
        # acks and requests of the old connection are void.
        plain = [m for w in self._out if w[0] == F.Op.PUB for m in w[1] if not m[P_SEQ]]
        self._out = []
        self._cur_pub = None
        self._cur_ack = None
        self._pub_bytes = 0
        for m in plain:
            self._queue_pub(m)
        for cons in self._consumers.values():
            cons._connection_lost()

    async def _redial(self) -> bool:
        lo, hi = self.reconnect_wait
        attempt = 0
        while not self._closed:
            attempt += 1
            if self.max_reconnects is not None and attempt > self.max_reconnects:
                self._shutdown(ConnectionClosedError(f"gave up reconnecting to {self._url} after "
                                                     f"{self.max_reconnects} attempts"))
                return False
            delay = min(hi, lo * 2 ** (attempt - 1))
            await anyio.sleep(delay * random.uniform(0.5, 1.0))  # jitter spreads reconnect storms
            try:
                stream, conn, welcome, initial = await self._dial()
            except ConnectError as exc:
                log.info("reconnect attempt %d to %s failed: %s", attempt, self._url, exc)
                continue
            except TidingsError as exc:
                if exc.retriable:
                    log.info("reconnect attempt %d refused: %s", attempt, exc)
                    continue
                self._shutdown(exc)
                return False
            self._attach(stream, conn, welcome, initial)
            return True
        return False

    def _restore(self) -> list[tuple[Any, Waiter]]:
        """Queue the re-registration of subscriptions and consumers, then the
        unconfirmed durable publishes, then what was published meanwhile;
        returns the answers to wait for (the reader is not running yet)."""
        # Durable publishes made while disconnected are both queued and in
        # _unconfirmed: send them once, from _unconfirmed.
        pending = [[F.Op.PUB, [m for m in w[1] if not m[P_SEQ]]] if w[0] == F.Op.PUB else w for w in self._out]
        pending = [w for w in pending if w[0] != F.Op.PUB or w[1]]
        self._out = []
        self._cur_pub = None
        self._cur_ack = None
        self._pub_bytes = 0
        waits: list[tuple[Any, Waiter]] = []

        def request(wire: list[Any], what: Any) -> None:
            rid = next(self._rids)
            wire[1] = rid
            w = Waiter()
            self._requests[rid] = w
            self._out.append(wire)
            waits.append((what, w))

        if self._inbox_sid:
            request([F.Op.SUB, 0, self._inbox_sid, self._inbox + ".>", None], None)
        for sub in self._subs.values():
            request(_sub_wire(sub.sid, sub.pattern, sub.group, sub.match), sub)
        for cons in list(self._consumers.values()):
            self._consumers.pop(cons.cid, None)
            cons.cid = next(self._cids)  # deliveries of the old registration must never ack new ones
            self._consumers[cons.cid] = cons
            request([F.Op.CONSUME, 0, cons.cid, cons._resume_args()], cons)
        for _seq, m in sorted(self._unconfirmed.items()):
            if m[P_OPTS]:
                m[P_OPTS].pop(F.OPT_NEW, None)  # it may have been stored: let the broker look
            self._queue_pub(m)
        self._cur_pub = None
        self._out.extend(pending)
        self._wake_writer()
        return waits

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat)
            idle = time.monotonic() - self._last_rx
            if idle >= self.dead_after:
                self._lose(ConnectionClosedError(f"no data from the broker for {idle:.1f}s: dead or frozen"))
                return
            if idle >= self.heartbeat:
                self._send([F.Op.PING, 0])

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client is connected (e.g. after a reconnect); raises
        client TimeoutError, or the error the client closed with."""
        try:
            with anyio.fail_after(timeout):
                while not self._connected.is_set():
                    await self._connected.wait()
        except builtins.TimeoutError as exc:
            if isinstance(exc, TidingsError):
                raise
            raise TimeoutError(f"not connected within {timeout}s") from exc
        self._check_open()

    async def close(self) -> None:
        """Send what is pending, then close and wait until the client's tasks
        have ended. Idempotent; may be called from any task (not only the one
        that connected), also under a timeout. Afterwards every call raises
        ConnectionClosedError("the client was closed")."""
        if not self._closed:
            try:
                if self._error is None and self._out and self.state == "connected":
                    with anyio.move_on_after(self.timeout, shield=True):
                        await self._wait_drained()
            finally:
                # Stops the connection's tasks; the supervisor closes the socket
                # (once: a TLS stream must not be closed from two tasks).
                self._shutdown(ConnectionClosedError("the client was closed"))
        if self._runner_scope is not None:
            self._runner_scope.cancel()
        done = self._runner_done
        if done is not None and anyio.get_current_task().id != self._runner_id:
            # The runner closes the socket as it ends; if this caller is cancelled
            # meanwhile (a timeout around close), the runner still finishes on its own.
            await done.wait()

    def _shutdown(self, error: TidingsError) -> None:
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = error
        waiters = list(self._requests.values()) + list(self._confirms.values()) + list(self._replies.values())
        for w in waiters:
            w.fail(error)
        self._requests.clear()
        self._confirms.clear()
        self._unconfirmed.clear()
        self._unconfirmed_bytes = 0
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
        self._connected.set()
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        self._set_state("closed")

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
        stream = self._stream
        assert stream is not None
        try:
            while True:
                if not self._out:
                    if self._drained is not None:
                        self._drained.set()
                        self._drained = None
                    self._writer_idle = True
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                out, self._out = self._out, []
                self._cur_pub = None
                self._cur_ack = None
                pub_bytes, self._pub_bytes = self._pub_bytes, 0
                per_frame = 0  # messages per PUB frame, from their average size; 0: no split
                if pub_bytes > PUB_FRAME_TARGET:
                    n = sum(len(w[1]) for w in out if w[0] == F.Op.PUB)
                    per_frame = max(1, n * PUB_FRAME_TARGET // pub_bytes)
                parts: list[bytes] = []
                for w in out:
                    if w[0] == F.Op.PUB:
                        pubs = w[1]
                        if per_frame and len(pubs) > per_frame:
                            for i in range(0, len(pubs), per_frame):
                                self._encode_pubs(pubs[i:i + per_frame], parts)
                        else:
                            self._encode_pubs(pubs, parts)
                    else:
                        conn.encode_wire(w, parts)
                await stream.send(b"".join(parts))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._lose(ConnectionClosedError(f"connection lost: {exc}"))

    async def _wait_drained(self) -> None:
        """Wait until the writer has handed everything pending to the socket."""
        while self._out and not self._closed:
            if self._drained is None:
                self._drained = anyio.Event()
            ev = self._drained
            self._wake_writer()
            await ev.wait()

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
            data = b""  # first, frames that arrived together with WELCOME
            early, self._early = self._early, []
            for frame in early:
                self._dispatch(frame)
            while True:
                if data:
                    conn.receive_data(data)
                while True:
                    ev = conn.next_event()
                    if ev is NEED_DATA:
                        break
                    if ev is CLOSED:
                        raise anyio.EndOfStream
                    self._dispatch(ev)
                data = await stream.receive(READ_CHUNK)
                self._last_rx = time.monotonic()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            last = self.last_server_error
            error = last or ConnectionClosedError(f"the broker closed the connection ({exc.__class__.__name__})")
        except ProtocolError as exc:
            log.error("protocol violation from the broker: %s", exc)
            error = ProtocolViolationError(str(exc))
        self._lose(error)

    def _dispatch(self, ev: F.Frame) -> None:
        match ev:
            case F.Msg():
                sid = ev.sid
                sub = self._subs.get(sid)
                if sub is not None:
                    sub._push(ev.messages)
                elif sid == self._inbox_sid:
                    self._on_replies(ev.messages)
            case F.Deliver():
                cons = self._consumers.get(ev.cid)
                if cons is not None:
                    cons._push(ev.items)
            case F.Confirm():
                self._on_confirms(ev.items)
            case F.Ok():
                w = self._requests.pop(ev.rid, None)
                if w is not None:
                    w.set(ev.result)
            case F.Err():
                err = for_code(ev.code, ev.message)
                w = self._requests.pop(ev.rid, None) if ev.rid else None
                if w is not None:
                    w.fail(err)
                else:
                    # A connection-level error: the broker closes the connection after
                    # fatal ones (then this becomes the reason); others are notices.
                    log.warning("broker error: %s (code %s)", ev.message, ev.code)
                    self.last_server_error = err
            case F.Ping():
                self._send([F.Op.PONG, ev.rid])
            case F.Pong():
                w = self._requests.pop(ev.rid, None)
                if w is not None:
                    w.set(None)
            case F.Notice():
                self._on_notice(ev.kind, ev.info)
            case _:
                pass  # a client-bound frame type the codec never produces on this side

    def _on_confirms(self, items: list[Any]) -> None:
        confirms = self._confirms
        n = 0
        for seq, code, result in items:
            w = confirms.pop(seq, None)
            if w is not None:
                n += 1
                um = self._unconfirmed.pop(seq, None)
                if um is not None:
                    self._unconfirmed_bytes -= len(um[1])
                if code:
                    w.fail(for_code(code, result if isinstance(result, str) else "publish failed"))
                else:
                    w.set(PublishAck.from_wire(result))
        if n:
            self._in_flight -= n
            sp = self._in_flight_space
            if sp is not None and not self._in_flight_full():
                self._in_flight_space = None
                sp.set()

    def _on_notice(self, kind: str, info: dict[str, Any]) -> None:
        match kind:
            case V.NOTICE_BINDINGS:
                self._apply_bindings(info)
            case V.NOTICE_SLOW_CONSUMER:
                sub = self._subs.get(info.get("sid", -1))
                n = info.get("dropped", 0)
                if sub is not None and isinstance(n, int):
                    sub.dropped_by_broker += n
                log.warning("the broker dropped %s messages for subscription %s: this client is too slow", n,
                            info.get("sid"))
            case V.NOTICE_SHUTDOWN:
                log.info("the broker is shutting down")
            case V.NOTICE_CONSUMER_CLOSED:
                cons = self._consumers.pop(info.get("cid", -1), None)
                if cons is not None:
                    cons._end(None)
            case V.NOTICE_ASSIGNMENT:
                cons = self._consumers.get(info.get("cid", -1))
                if cons is not None:
                    cons.assignment = (info.get("generation", 0), list(info.get("partitions", [])))
            case V.NOTICE_STALE_ACKS:
                cons = self._consumers.get(info.get("cid", -1))
                if cons is not None:
                    cons._stale(int(info.get("count", 0)))
            case _:
                pass  # a kind this client does not know (a newer broker): ignored

    def _apply_bindings(self, info: Any) -> None:
        """One bindings NOTICE: a chunk of a set; the set replaces the one in
        use when its last chunk ("more" false) arrives, unless it is older."""
        if not isinstance(info, dict) or type(info.get("epoch")) is not int \
                or not isinstance(info.get("patterns"), list):
            return
        building = _add_chunk(self._bindings_building, info)
        if building is None or info.get("more"):
            self._bindings_building = building
            return
        self._bindings_building = None
        if building[0] >= self._bindings_epoch:
            self._bindings_epoch = building[0]
            self._bindings = PatternSet(building[1])

    # ------------------------------------------------------------ publish
    # A PUB message is [subject, payload, headers, reply, seq, opts] (frames.P_SUBJECT ..
    # P_OPTS). The per-publish path below indexes it with the literal positions: each use
    # of a module constant is a global look-up (about 14 ns on CPython 3.11, measured),
    # which a publish must not pay; the paths that run once per reconnect use the names.

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
            # str as before; bytearray, memoryview (and str subclasses) copied; TypeError for anything else
            payload = payload.encode() if type(payload) is str else to_bytes(payload)
        if headers is not None:
            _check_headers(headers)
        # Set only while a handler runs in a message's trace (tracing.py): then a publish without a
        # traceparent of its own continues the trace (same trace id, new parent id). One
        # ContextVar.get per publish otherwise. ("traceparent": V.TRACEPARENT as a literal, see above.)
        trace = CURRENT.get()
        if trace is not None and (headers is None or "traceparent" not in headers):
            headers = trace.child_headers(headers)
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
                opts[F.OPT_DELAY] = seconds_to_ms(delay, "delay", 0, MAX_DURATION_MS)
            if at is not None:
                ts = at.timestamp() if hasattr(at, "timestamp") else at
                opts[F.OPT_AT] = seconds_to_ms(ts, "at", 0, MAX_TIMESTAMP_MS)
            if ttl is not None:
                opts[F.OPT_TTL] = max(1, seconds_to_ms(ttl, "ttl", 0, MAX_DURATION_MS))
        return [subject, payload, headers, reply, 0, opts]

    def _wants_confirm(self, m: list[Any], confirm: bool | None) -> bool:
        if confirm is not None:
            return confirm
        return m[5] is not None or bool(self._bindings and self._bindings.match(m[0]))

    def publish_nowait(self, subject: str, payload: Payload = b"", *,
                       headers: dict[str, Any] | None = None, reply: str | None = None,
                       msg_id: str | None = None, key: str | None = None, delay: float | None = None,
                       at: Any = None, ttl: float | None = None, confirm: bool | None = None,
                       json: Any = UNSET, priority: int | None = None) -> Confirmation:
        """Queue a publish without waiting and return a :class:`Confirmation`
        to await later, so one task can keep many confirms in flight.
        Awaiting it gives what :meth:`publish` returns, or raises what
        :meth:`publish` raises (NoRouteError, QueueFullError, ...).

        Raises PublishBufferFullError when ``max_in_flight`` publishes are
        already unconfirmed (await some confirmations first), and
        ConnectionClosedError when the connection is gone.
        """
        if self._closed:
            self._check_open()
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        m = self._message(subject, payload, headers, reply, msg_id, key, delay, at, ttl)
        if priority is not None:
            _set_priority(m, priority)
        if self._outage_bytes_full():
            raise PublishBufferFullError(f"{self._pub_bytes} bytes are buffered while disconnected")
        if not self._wants_confirm(m, confirm):
            self._queue_pub(m)
            return Confirmation(None)
        if self._in_flight_full():
            raise PublishBufferFullError(f"{self._in_flight} publishes ({self._unconfirmed_bytes} bytes) are "
                                         "waiting for confirms")
        return Confirmation(self._queue_confirmed(m))

    def _queue_confirmed(self, m: list[Any]) -> Waiter:
        seq = next(self._seqs)
        m[4] = seq
        if self.auto_msg_id:
            # A fresh id per durable publish makes a resend after a reconnect
            # harmless; "new" spares the broker the look-up on the first send.
            opts = m[5]
            if opts is None:
                m[5] = {F.OPT_MSG_ID: f"{self._id_prefix}{seq}", F.OPT_NEW: 1}
            elif F.OPT_MSG_ID not in opts:
                opts[F.OPT_MSG_ID] = f"{self._id_prefix}{seq}"
                opts[F.OPT_NEW] = 1
        w = Waiter()
        self._confirms[seq] = w
        self._unconfirmed[seq] = m  # resent after a reconnect until confirmed
        self._in_flight += 1
        self._unconfirmed_bytes += len(m[1])
        self._queue_pub(m)
        return w

    async def publish(self, subject: str, payload: Payload = b"", *,
                      headers: dict[str, Any] | None = None, reply: str | None = None,
                      msg_id: str | None = None, key: str | None = None, delay: float | None = None,
                      at: Any = None, ttl: float | None = None, confirm: bool | None = None,
                      json: Any = UNSET, priority: int | None = None) -> PublishAck | None:
        """Publish ``payload`` to ``subject``.

        ``payload`` is bytes, bytearray, memoryview or str (sent as UTF-8);
        anything else raises TypeError. ``json=value`` sends ``value`` (JSON
        types, a pydantic model, dataclasses inside) as JSON instead, with the
        header ``content-type: application/json``.

        When no durable queue or stream is bound to the subject this returns
        None as soon as the message is buffered (the writer sends it with
        others in one frame); :meth:`flush` waits until the broker has it.
        Such a fire-and-forget publish that reaches no subscriber is lost
        silently, as pub/sub is. When the subject is bound to a durable target
        (the broker tells the client which patterns are bound), or
        ``confirm=True``, or a durable option is given, it returns only after
        the broker answered: a :class:`PublishAck` once every bound queue and
        stream committed it, None if only live subscribers took it (no durable
        target); it raises NoRouteError if nothing took it (no queue, stream or
        subscriber: nothing is stored), or the mapped error (e.g.
        QueueFullError, StorageFullError) if it was not stored.

        ``msg_id`` de-duplicates within the broker's window; ``delay``
        (seconds) or ``at`` (datetime or epoch seconds) defer delivery;
        ``ttl`` (seconds) expires the message if not delivered in time;
        ``key`` picks a stream partition; ``priority`` (0..255) orders the
        message in a priority queue (higher first; a queue declared with
        ``max_priority`` clamps it to that; other queues ignore it).
        """
        if self._closed:
            self._check_open()
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        m = self._message(subject, payload, headers, reply, msg_id, key, delay, at, ttl)
        if priority is not None:
            _set_priority(m, priority)
        if self._outage_bytes_full():
            await self._wait_buffer_room()
        if self._wants_confirm(m, confirm):
            while self._in_flight_full() and not self._closed:
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

    def _in_flight_full(self) -> bool:
        """Unconfirmed durable publishes are kept for a resend: bounded in count and bytes."""
        return self._in_flight >= self.max_in_flight or self._unconfirmed_bytes >= self.max_in_flight_bytes

    def _outage_bytes_full(self) -> bool:
        return self.state != "connected" and self._pub_bytes >= self.outage_buffer

    async def _wait_buffer_room(self) -> None:
        """While disconnected with a full outage buffer, wait for the reconnect."""
        while self._outage_bytes_full() and not self._closed:
            await self._connected.wait()
            await anyio.lowlevel.checkpoint()
        self._check_open()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has received and processed everything sent so far
        (a PING/PONG round trip behind all pending frames)."""
        await self._request([F.Op.PING, 0], timeout, rid_index=1)

    async def _request(self, wire: list[Any], timeout: float | None = None, rid_index: int = 1) -> Any:
        self._check_open()
        rid = next(self._rids)
        wire[rid_index] = rid
        w = Waiter()
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

    # ----------------------------------------------------------- consumers

    async def _open_consumer(self, name: str, args: dict[str, Any], kind: type[DeliveryT]) -> QueueConsumer[DeliveryT]:
        """Register consumer ``cid`` here (DELIVERs find it, a reconnect restores
        it), then CONSUME; the durable API's way to open one (DurablePort)."""
        cid = next(self._cids)
        cons = QueueConsumer(self._consumer_port, cid, name, args.get("prefetch") or args.get("window") or 0, kind)
        cons.args = args
        self._consumers[cid] = cons
        try:
            cons.info = await self._request([F.Op.CONSUME, 0, cid, args])
        except BaseException:
            self._consumers.pop(cid, None)
            raise
        return cons

    async def _close_consumer(self, cons: QueueConsumer[Any]) -> None:
        cons._end(None)
        if self._consumers.pop(cons.cid, None) is None or self._closed:
            return
        if self.state != "connected":
            return  # not restored after the reconnect: the broker will never know it
        try:
            await self._request([F.Op.STOP, 0, cons.cid])
        except (ConnectionClosedError, TimeoutError, NotFoundError):
            pass  # the connection went (taking the consumer with it), or it is already gone

    async def _settle_now(self, cid: int, item: list[Any]) -> list[int]:
        """One ACK frame for one item, answered with its code (ConsumerPort.settle_now)."""
        codes: list[int] = await self._request([F.Op.ACK, 0, cid, [item]])
        return codes

    # ------------------------------------- schemas and events (client/schemas.py, client/events.py)

    async def register_schema(self, name: str, schema: Any, *, compatibility: str | None = None) -> int:
        """Register the next version of schema ``name``; returns its number. See :meth:`Schemas.register`."""
        return await self.schemas.register(name, schema, compatibility=compatibility)

    async def check_schema(self, name: str, schema: Any, *, compatibility: str | None = None) -> dict[str, Any]:
        """Would ``schema`` be accepted as the next version of ``name``? See :meth:`Schemas.check`."""
        return await self.schemas.check(name, schema, compatibility=compatibility)

    async def get_schema(self, name: str, version: int | None = None) -> dict[str, Any]:
        return await self.schemas.get(name, version)

    async def list_schemas(self) -> list[dict[str, Any]]:
        return await self.schemas.list()

    async def bind_schema(self, pattern: str, name: str, *, on_invalid: str = "reject",
                          dead_letter_queue: str | None = None) -> dict[str, Any]:
        """Validate publishes to ``pattern`` against schema ``name``. See :meth:`Schemas.bind`."""
        return await self.schemas.bind(pattern, name, on_invalid=on_invalid, dead_letter_queue=dead_letter_queue)

    async def unbind_schema(self, pattern: str) -> dict[str, Any]:
        return await self.schemas.unbind(pattern)

    async def list_schema_bindings(self) -> list[dict[str, Any]]:
        return await self.schemas.bindings()

    def register_upcaster(self, name: str, version: int, fn: Upcaster) -> None:
        """``fn(data)`` lifts version ``version`` of event schema ``name`` to ``version + 1``;
        ``msg.event`` applies the chain (client/events.py)."""
        self.upcasters.register(name, version, fn)

    async def publish_event(self, subject: str, *, type: str, source: str, data: Any, id: str | None = None,
                            time: Any = None, dataschema: str | None = None, ce_subject: str | None = None,
                            content_type: str = V.CT_JSON, schema_version: int | None = None,
                            headers: dict[str, Any] | None = None, **options: Any) -> PublishAck | None:
        """Publish a CloudEvents 1.0 event to ``subject``: the attributes go in ``ce-*``
        headers (``id`` defaults to a UUID4, ``time`` to now; ``ce_subject`` is the
        event's own ``subject`` attribute), ``data`` is encoded as ``content_type``
        (application/json or application/msgpack). ``schema_version`` names the schema
        version to validate against (else the broker uses ``dataschema``'s trailing
        number, else the latest). ``options`` are :meth:`publish`'s (msg_id, key,
        confirm, ...). Raises ValueError if ``data`` cannot be encoded."""
        hdrs = event_headers(type=type, source=source, id=id, time=time, dataschema=dataschema,
                             subject=ce_subject, content_type=content_type, schema_version=schema_version,
                             headers=headers)
        return await self.publish(subject, encode_data(data, content_type), headers=hdrs, **options)

    # ------------------------------------- durable API (forwarded to self.durable)

    async def declare_queue(self, name: str, *, bind: Sequence[str | dict[str, Any]] = (),
                            **settings: Any) -> dict[str, Any]:
        """Create a durable queue; see :meth:`Durable.declare_queue`."""
        return await self.durable.declare_queue(name, bind=bind, **settings)

    async def delete_queue(self, name: str, *, keep_dlq: bool = False) -> dict[str, Any]:
        """Delete a queue (and its DLQ); see :meth:`Durable.delete_queue`."""
        return await self.durable.delete_queue(name, keep_dlq=keep_dlq)

    async def update_queue(self, name: str, **settings: Any) -> dict[str, Any]:
        """Change a queue's settings in place; see :meth:`Durable.update_queue`."""
        return await self.durable.update_queue(name, **settings)

    async def purge_queue(self, name: str) -> int:
        return await self.durable.purge_queue(name)

    async def queue_info(self, name: str) -> dict[str, Any]:
        return await self.durable.queue_info(name)

    async def list_queues(self) -> list[dict[str, Any]]:
        return await self.durable.list_queues()

    async def peek_queue(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """A queue's messages, left in place; see :meth:`Durable.peek_queue`."""
        return await self.durable.peek_queue(queue, limit=limit, offset=offset)

    async def dlq_list(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Peek at a dead-letter queue's messages; see :meth:`Durable.dlq_list`."""
        return await self.durable.dlq_list(queue, limit=limit, offset=offset)

    async def dlq_redrive(self, queue: str, *, count: int | None = None, to: str | None = None) -> int:
        """Move dead-lettered messages back; see :meth:`Durable.dlq_redrive`."""
        return await self.durable.dlq_redrive(queue, count=count, to=to)

    async def dlq_purge(self, queue: str) -> int:
        return await self.durable.dlq_purge(queue)

    def consume(self, queue: str, *, prefetch: int = 100) -> ConsumeContext[Delivery]:
        """``async with tc.consume(queue) as deliveries:``; see :meth:`Durable.consume`."""
        return self.durable.consume(queue, prefetch=prefetch)

    async def declare_stream(self, name: str, *, partitions: int = 1, bind: Sequence[str | dict[str, Any]] = (),
                             **settings: Any) -> dict[str, Any]:
        """Create a stream; see :meth:`Durable.declare_stream`."""
        return await self.durable.declare_stream(name, partitions=partitions, bind=bind, **settings)

    async def delete_stream(self, name: str, *, keep_dlq: bool = False) -> dict[str, Any]:
        """Delete a stream (and its DLQ); see :meth:`Durable.delete_stream`."""
        return await self.durable.delete_stream(name, keep_dlq=keep_dlq)

    async def update_stream(self, name: str, **settings: Any) -> dict[str, Any]:
        """Change a stream's settings in place; see :meth:`Durable.update_stream`."""
        return await self.durable.update_stream(name, **settings)

    async def stream_groups(self, name: str) -> dict[str, dict[str, Any]]:
        """A stream's consumer groups; see :meth:`Durable.stream_groups`."""
        return await self.durable.stream_groups(name)

    async def delete_group(self, stream: str, group: str, *, force: bool = False) -> dict[str, Any]:
        """Delete a consumer group; see :meth:`Durable.delete_group`."""
        return await self.durable.delete_group(stream, group, force=force)

    async def stream_info(self, name: str) -> dict[str, Any]:
        return await self.durable.stream_info(name)

    async def list_streams(self) -> list[dict[str, Any]]:
        return await self.durable.list_streams()

    def stream_consume(self, stream: str, group: str, *, window: int = 100,
                       start: str = "earliest") -> ConsumeContext[StreamMessage]:
        """Join a stream's consumer group; see :meth:`Durable.stream_consume`."""
        return self.durable.stream_consume(stream, group, window=window, start=start)

    def read_stream(self, stream: str, partition: int = 0, start: Any = "earliest", *,
                    follow: bool = False, out_of_range: str = "error") -> AsyncGenerator[StreamMessage, None]:
        """Replay one partition outside any group; see :meth:`Durable.read_stream`."""
        return self.durable.read_stream(stream, partition, start, follow=follow, out_of_range=out_of_range)

    # ---------------------------------------------------------- subscribe

    async def subscribe(self, pattern: str, group: str | None = None, *,
                        max_pending: int = DEFAULT_MAX_PENDING,
                        match: dict[str, Any] | None = None) -> Subscription:
        """Subscribe to ``pattern`` (``*`` one token, ``>`` the rest).

        With ``group``, the subscription joins that queue group: each
        message goes to one member of the group (among those whose filter
        matches). ``match`` is a content filter the broker applies (headers,
        and under ``"data"`` the payload's top-level fields where a schema
        binds the subject; docs/CLIENT.md "Content filters"): only matching
        messages are sent. A bad filter raises InvalidArgumentError naming its
        key and operator. Returns once the broker has registered it, so
        messages published afterwards are received.
        """
        try:
            validate_pattern(pattern)
        except RemoteProtocolError as exc:
            raise InvalidSubjectError(exc.message) from None
        if match is not None:
            try:
                compile_filter(match)
            except FilterError as exc:
                raise InvalidArgumentError(str(exc)) from None
        sid = next(self._sids)
        sub = Subscription(self._sub_port, sid, pattern, group, max_pending, match)
        self._subs[sid] = sub
        try:
            await self._request(_sub_wire(sid, pattern, group, match))
        except BaseException:
            self._subs.pop(sid, None)
            raise
        return sub

    async def _unsubscribe(self, sid: int) -> None:
        if self._subs.pop(sid, None) is None or self._closed or self.state != "connected":
            return  # while disconnected it is simply not restored
        try:
            await self._request([F.Op.UNSUB, 0, sid])
        except (ConnectionClosedError, NotFoundError):
            pass  # the connection went (taking the subscription with it)

    # ------------------------------------------------------ request/reply

    def _default_inbox_prefix(self) -> str:
        """``_INBOX.<user>.`` for the user the broker logged us in as (password,
        token or certificate alike), ``_INBOX.`` without one (no-users mode),
        so a permission ``subscribe = ["_INBOX.<user>.>"]`` fits every user."""
        user = self.server_info.get("user")
        if isinstance(user, str) and user:
            try:
                return f"_INBOX.{validate_subject(user)}."
            except ProtocolError:
                pass  # not usable in a subject (the broker's user names always are): no user part
        return "_INBOX."

    async def _ensure_inbox(self) -> None:
        if self._inbox_sid:
            return
        if not self._inbox:
            prefix = self.inbox_prefix if self.inbox_prefix is not None else self._default_inbox_prefix()
            self._inbox = f"{prefix.rstrip('.')}.{secrets.token_hex(8)}"
        sid = next(self._sids)
        await self._request([F.Op.SUB, 0, sid, self._inbox + ".>", None])
        self._inbox_sid = sid

    def _on_replies(self, msgs: list[list[Any]]) -> None:
        for m in msgs:
            w = self._replies.pop(m[M_SUBJECT], None)
            if w is not None:
                w.set(Message(m[M_SUBJECT], m[M_PAYLOAD], m[M_HEADERS], m[M_REPLY], self))

    async def request(self, subject: str, payload: Payload = b"", *, headers: dict[str, Any] | None = None,
                      timeout: float = 5.0, json: Any = UNSET) -> Message:
        """Publish a request (``payload``, or ``json=value`` as for
        :meth:`publish`) and return the first reply.

        The reply subject is ``<inbox>.<random>`` (the inbox: ``inbox_prefix``,
        default ``_INBOX.<user>``, plus a random token per connection), so
        a user may be granted ``subscribe`` on its own inboxes alone.
        Raises NoRespondersError at once if no subscriber matches
        ``subject``, PermissionDeniedError if the user may not subscribe to
        its inbox, and client TimeoutError if no reply comes in time."""
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        await self._ensure_inbox()
        # Unguessable, not a counter: whoever sees one reply subject cannot aim at the next request's.
        reply = f"{self._inbox}.{secrets.token_hex(REPLY_ID_BYTES)}"
        w = Waiter()
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
        if not msg.payload and msg.headers and msg.headers.get(V.HDR_STATUS) == V.STATUS_NO_RESPONDERS:
            raise NoRespondersError(f"no responders for {subject!r}")
        return msg


def _check_headers(headers: Any) -> None:
    """The broker refuses a whole PUB frame with a bad header; refuse it here,
    for this publish alone."""
    if not isinstance(headers, dict):
        raise InvalidArgumentError("headers must be a dict of str -> str | int | bytes")
    for k, v in headers.items():
        if type(k) is not str or not k:
            raise InvalidArgumentError("header names must be non-empty strings")
        if k[:8].lower() == V.RESERVED_HEADER_PREFIX and k not in V.PUBLISHER_HEADERS:
            raise InvalidArgumentError(f"header {k!r} is reserved: names starting with "
                                       f"{V.RESERVED_HEADER_PREFIX!r} are set by the broker only")
        if type(v) not in (str, int, bytes) or (type(v) is int and not -2**63 <= v < 2**64):
            raise InvalidArgumentError(f"header {k!r} must be a str, an int or bytes, not {type(v).__name__}")


def _quote(head: bytes) -> str:
    """The first bytes a peer sent, printable: ``'INFO {"server_id"...'``."""
    text = head.decode("ascii", "backslashreplace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return repr(shown + ("..." if len(head) >= HANDSHAKE_QUOTE else ""))


async def _aclose(stream: ByteStream | None) -> None:
    if stream is not None:
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except (OSError, anyio.BrokenResourceError):
                pass


class connect:
    """Open a :class:`Client`: ``tc = await connect(url)`` (then ``await tc.close()``,
    from any task), or ``async with connect(url) as tc:`` (closed on exit).

    ``url`` is ``tidings://HOST:PORT`` (default ``tidings://127.0.0.1:7421``)
    or ``tidings+tls://HOST:PORT``, with ``USER:PASSWORD@`` before the host if the
    keywords give no credentials, and several comma-separated ``HOST:PORT`` for
    the brokers of one service (tried in a shuffled order until one answers; on
    loss the client resumes on another: :func:`parse_urls`, docs/CLIENT.md).
    Keyword arguments go to :class:`Client`
    (reconnect policy, heartbeat, credentials, TLS). Raises ConnectError if
    the broker cannot be reached, or the broker's refusal (e.g.
    AuthenticationError).
    """

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        self._client = Client(url, **kwargs)

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._client._open()

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> bool:
        with anyio.CancelScope(shield=True):
            await self._client.close()
        return False


def _sub_wire(sid: int, pattern: str, group: str | None, match: dict[str, Any] | None) -> list[Any]:
    """A SUB frame (rid filled in by the request); the filter element only when there is one,
    so a subscription without one is the frame every broker version reads."""
    if match is None:
        return [F.Op.SUB, 0, sid, pattern, group]
    return [F.Op.SUB, 0, sid, pattern, group, match]


def _set_priority(m: list[Any], priority: int) -> None:
    """Put a publish's priority into its options (InvalidArgumentError if out of range)."""
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise InvalidArgumentError(f"priority must be an integer in 0..{MAX_PRIORITY}")
    if m[5] is None:
        m[5] = {}
    m[5][F.OPT_PRIORITY] = priority
