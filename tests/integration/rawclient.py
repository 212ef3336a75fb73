"""A raw-socket tidings client for integration tests that need to misbehave.

The real client library always reads, always speaks HELLO first and never
sends garbage; these tests need a peer that does not. ``RawClient`` owns a
TCP stream and a sans-IO ``protocol.Connection(Role.CLIENT)``: it can do the
handshake by hand, send frames or arbitrary bytes, stop reading, and read
frames until one matches, always under a time bound (no sleeps).
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import anyio
from anyio.abc import SocketStream

from tidings.protocol import CLOSED, NEED_DATA, Connection, Role, State
from tidings.protocol import frames as F
from tidings.protocol.codec import HEADER, HEADER_SIZE, Decoder, unpack
from tidings.protocol.errors import RemoteProtocolError

READ_CHUNK = 65_536
DEFAULT_WAIT = 10.0


def frame_bytes(body: bytes) -> bytes:
    """Length-prefix arbitrary ``body`` bytes (which need not be valid msgpack)."""
    return struct.pack(">I", len(body)) + body


class EOF(Exception):
    """The broker closed the connection before a matching frame arrived."""


class RawClient:
    """One raw connection. Use ``async with RawClient.open(host, port) as rc``."""

    def __init__(self, stream: SocketStream, max_frame: int = 1024 * 1024) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT, max_frame=max_frame)
        # The sans-IO Connection only decodes server frames once it has sent
        # HELLO (anything else would be a handshake violation). A peer that
        # never says HELLO (garbage, HELLO timeout) still wants to read the
        # broker's ERR, so until HELLO is sent frames are decoded here instead.
        self._pre = _PreHelloReader(max_frame)
        self.frames: list[F.Frame] = []  # every frame read so far, in order
        self.eof = False
        self.welcome: F.Welcome | None = None
        self._rids = 0

    @classmethod
    def open(cls, host: str, port: int, max_frame: int = 1024 * 1024) -> "_Opener":
        return _Opener(host, port, max_frame)

    # ------------------------------------------------------------ sending

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def send(self, frame: F.Frame) -> None:
        await self.stream.send(self.conn.send(frame))

    async def send_wire(self, value: list[Any]) -> None:
        """Send an already-built wire array (no shape checks: may be invalid on purpose)."""
        out: list[bytes] = []
        self.conn.encode_wire(value, out)
        await self.stream.send(b"".join(out))

    def next_rid(self) -> int:
        self._rids += 1
        return self._rids

    async def hello(self, name: str = "rawclient", timeout: float = DEFAULT_WAIT,
                    options: dict | None = None) -> F.Welcome:
        """Do the handshake; return WELCOME (raises AssertionError on ERR).
        The binding set the broker sends right after WELCOME (NOTICEs up to
        the one without "more") is read too and kept in ``bindings``."""
        await self.send(F.Hello(F.PROTOCOL_VERSION, name, None, options or {}))
        ev = await self.read_until(lambda f: isinstance(f, (F.Welcome, F.Err)), timeout)
        assert isinstance(ev, F.Welcome), f"handshake refused: {ev!r}"
        self.welcome = ev
        self.bindings: list[str] = []
        while True:
            n = await self.read_until(lambda f: isinstance(f, F.Notice) and f.kind == "bindings", timeout)
            self.bindings += n.info["patterns"]  # type: ignore[union-attr]
            if not n.info.get("more"):  # type: ignore[union-attr]
                return ev

    async def subscribe(self, pattern: str, sid: int, group: str | None = None,
                        timeout: float = DEFAULT_WAIT) -> None:
        """SUB and wait for its OK."""
        rid = self.next_rid()
        await self.send(F.Sub(rid, sid, pattern, group))
        ev = await self.read_until(lambda f: isinstance(f, (F.Ok, F.Err)) and f.rid == rid, timeout)
        assert isinstance(ev, F.Ok), f"SUB refused: {ev!r}"

    async def ping(self, timeout: float = DEFAULT_WAIT) -> None:
        """PING and wait for the matching PONG: proves the connection still works."""
        rid = self.next_rid()
        await self.send(F.Ping(rid))
        await self.read_until(lambda f: isinstance(f, F.Pong) and f.rid == rid, timeout)

    # ------------------------------------------------------------ reading

    @property
    def _raw_mode(self) -> bool:
        return self.conn.state is State.START

    def _feed(self, data: bytes) -> None:
        if self._raw_mode:
            self._pre.receive_data(data)
        else:
            self.conn.receive_data(data)

    def _decode_buffered(self) -> F.Frame | None:
        """Next buffered frame, or None when more bytes are needed / stream ended."""
        if self._raw_mode:
            return self._pre.next_frame()
        ev = self.conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return None
        return ev  # type: ignore[return-value]

    async def read_frame(self) -> F.Frame:
        """Read the next frame (no time bound here: callers wrap it). Raises EOF
        once the broker has closed the connection and every frame is read."""
        while True:
            if self.eof and not self._raw_mode and self.conn.state is State.CLOSED:
                raise EOF("the broker closed the connection")
            try:
                ev = self._decode_buffered()
            except RemoteProtocolError:
                if not self.eof:
                    raise
                ev = None  # a frame cut short by the close
            if ev is not None:
                self.frames.append(ev)
                return ev
            if self.eof:
                raise EOF("the broker closed the connection")
            try:
                data = await self.stream.receive(READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                data = b""
            self._feed(data)
            if not data:
                self.eof = True

    async def read_until(self, pred: Callable[[F.Frame], bool], timeout: float = DEFAULT_WAIT) -> F.Frame:
        """Read frames until ``pred(frame)``; raise TimeoutError or EOF otherwise."""
        with anyio.fail_after(timeout):
            while True:
                ev = await self.read_frame()
                if pred(ev):
                    return ev

    async def read_until_eof(self, timeout: float = DEFAULT_WAIT) -> list[F.Frame]:
        """Read (and return) every frame until the broker closes the connection."""
        got: list[F.Frame] = []
        with anyio.fail_after(timeout):
            while True:
                try:
                    got.append(await self.read_frame())
                except EOF:
                    return got

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


class _PreHelloReader:
    """Splits server frames out of a byte stream without handshake rules."""

    def __init__(self, max_frame: int) -> None:
        self._buf = b""
        self._max_frame = max_frame
        self._dec = Decoder(F.SERVER_OPS, max_frame)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> F.Frame | None:
        if len(self._buf) < HEADER_SIZE:
            return None
        (n,) = HEADER.unpack_from(self._buf, 0)
        assert n <= self._max_frame, f"broker sent a frame of {n} bytes"
        if len(self._buf) < HEADER_SIZE + n:
            return None
        body, self._buf = self._buf[HEADER_SIZE:HEADER_SIZE + n], self._buf[HEADER_SIZE + n:]
        return self._dec.frame(unpack(body))


class _Opener:
    def __init__(self, host: str, port: int, max_frame: int) -> None:
        self.host, self.port, self.max_frame = host, port, max_frame
        self.rc: RawClient | None = None

    async def __aenter__(self) -> RawClient:
        with anyio.fail_after(DEFAULT_WAIT):
            stream = await anyio.connect_tcp(self.host, self.port)
        self.rc = RawClient(stream, self.max_frame)
        return self.rc

    async def __aexit__(self, *exc: object) -> None:
        assert self.rc is not None
        await self.rc.aclose()
