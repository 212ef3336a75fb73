"""The sans-IO connection: bytes in, frames out; frames in, bytes out.

Both sides use :class:`Connection` with their :class:`Role`. It knows the
handshake rules (the client's HELLO first, the server's WELCOME or ERR as
the answer, nothing else before), the frame-size limits in force (a small
one until the handshake is done, the negotiated one after) and how to
split a byte stream into frames. It never touches a socket.

Usage (either side)::

    conn.receive_data(chunk)          # b"" signals end of stream
    while (ev := conn.next_event()) is not NEED_DATA and ev is not CLOSED:
        handle(ev)
    sock.send(conn.send(frame))
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

from tidings.protocol import frames as F
from tidings.protocol.codec import (
    DEFAULT_MAX_FRAME,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_CEILING,
    COUNT_CONTAINERS_ABOVE,
    PRE_HELLO_MAX_FRAME,
    Decoder,
    Encoder,
    unpack,
    unpack_bounded,
)
from tidings.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

FRAME_OVERHEAD: Final = 64 * 1024  # room for subject, headers and envelope around one max-size payload


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    START = "start"
    HELLO_SENT = "hello-sent"  # client: HELLO out, waiting for WELCOME
    HELLO_RECEIVED = "hello-received"  # server: HELLO in, WELCOME not yet sent
    OPEN = "open"
    CLOSED = "closed"  # a fatal error happened, or the stream ended


class Signal(Enum):
    """What next_event() returns when it has no frame. An enum, so a type
    checker narrows ``ev`` to a frame once both members are ruled out."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Signal.NEED_DATA
"""next_event() needs more bytes before it can produce a frame."""
CLOSED: Final = Signal.CLOSED
"""The peer ended the stream cleanly (between frames)."""


class Connection:
    """One end of a tidings connection.

    ``max_frame`` is the largest frame this side accepts after the
    handshake; it is announced to the peer (server: in WELCOME; client: in
    HELLO options, optional). Frames from the peer larger than the limit in
    force raise a fatal :class:`RemoteProtocolError` before the body is
    buffered. Frames we send larger than the peer's limit raise
    :class:`LocalProtocolError`.
    """

    __slots__ = ("role", "state", "max_frame", "peer_max_frame", "max_payload", "_limit",
                 "_buf", "_pos", "_pending", "_pending_len", "_need", "_eof", "_enc",
                 "_dec", "_out_ops", "frames_in", "_bounded_above")

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_payload: int | None = None) -> None:
        if not PRE_HELLO_MAX_FRAME <= max_frame <= MAX_FRAME_CEILING:
            raise ValueError(f"max_frame must be in [{PRE_HELLO_MAX_FRAME}, {MAX_FRAME_CEILING}]")
        self.role = role
        self.state = State.START
        self.max_frame = max_frame
        self.max_payload = max_payload if max_payload is not None else max(max_frame - FRAME_OVERHEAD, 1024)
        self.peer_max_frame = PRE_HELLO_MAX_FRAME
        self._limit = PRE_HELLO_MAX_FRAME
        self._buf = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = HEADER_SIZE
        self._eof = False
        self._enc = Encoder()
        accept = F.CLIENT_OPS if role is Role.SERVER else F.SERVER_OPS
        self._dec = Decoder(accept, self.max_payload)
        self._out_ops = F.SERVER_OPS if role is Role.SERVER else F.CLIENT_OPS
        self.frames_in = 0
        # Frames longer than this are decoded with unpack_bounded. A server bounds its first frame
        # (HELLO, from a stranger) and then every frame over COUNT_CONTAINERS_ABOVE; a client
        # trusts its broker (its MSG/DELIVER batches are the subscriber's hot path).
        self._bounded_above = -1 if role is Role.SERVER else MAX_FRAME_CEILING

    # ------------------------------------------------------------ receiving

    @property
    def inbound_limit(self) -> int:
        """The largest frame accepted from the peer right now."""
        return self._limit

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into frames."""
        return len(self._buf) - self._pos + self._pending_len

    @property
    def has_partial_frame(self) -> bool:
        return self.buffered > 0

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed."""
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        if self._pos == len(self._buf) and not self._pending:
            self._buf = bytes(data)
            self._pos = 0
        else:
            self._pending.append(bytes(data))
            self._pending_len += len(data)

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _gather(self, need: int) -> bool:
        """Make ``need`` bytes contiguous at _pos if we have them."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        if have + self._pending_len < need:
            return False
        self._pending.insert(0, self._buf[self._pos:])
        self._buf = b"".join(self._pending)
        self._pos = 0
        self._pending.clear()
        self._pending_len = 0
        return True

    def next_event(self) -> F.Frame | Signal:
        """Return the next frame, NEED_DATA, or CLOSED.

        Raises :class:`RemoteProtocolError`. When its ``fatal`` is False the
        offending frame was consumed and the stream is still in sync (answer
        with ERR and carry on); when True the connection is CLOSED.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed", fatal=True)
        if self.role is Role.SERVER and self.state is State.HELLO_RECEIVED:
            raise LocalProtocolError("answer HELLO before reading further frames")
        if not self._gather(HEADER_SIZE):
            return self._end_or_need()
        (n,) = HEADER.unpack_from(self._buf, self._pos)
        if n > self._limit:
            self.state = State.CLOSED
            raise RemoteProtocolError(
                f"frame of {n} bytes exceeds the limit of {self._limit}",
                ErrorCode.FRAME_TOO_LARGE, fatal=True)
        if not self._gather(HEADER_SIZE + n):
            return self._end_or_need()
        start = self._pos + HEADER_SIZE
        self._pos = start + n
        self.frames_in += 1
        if n == 0:
            self._handshake_guard(None)
            raise RemoteProtocolError("empty frame")
        try:
            # undecodable bytes go through the handshake guard too: before HELLO they are fatal
            if n > self._bounded_above:
                value = unpack_bounded(memoryview(self._buf)[start:start + n],
                                       pre_hello=self.state is State.START)
            else:
                value = unpack(memoryview(self._buf)[start:start + n])
            frame = self._dec.frame(value)
        except RemoteProtocolError:
            self._handshake_guard(None)
            raise
        self._handshake_guard(frame)
        return frame

    def _end_or_need(self) -> Signal:
        if not self._eof:
            return NEED_DATA
        if self.buffered:
            self.state = State.CLOSED
            raise RemoteProtocolError("stream ended inside a frame", fatal=True)
        self.state = State.CLOSED
        return CLOSED

    def _handshake_guard(self, frame: F.Frame | None) -> None:
        """Enforce the handshake order on an incoming frame (None: a bad one)."""
        st = self.state
        if st is State.OPEN:
            if type(frame) is F.Hello or type(frame) is F.Welcome:
                # non-fatal: the stream is in sync, the peer is merely confused
                raise RemoteProtocolError(f"{frame.OP.name} is only valid to open the connection",
                                          ErrorCode.BAD_STATE)
            return
        if self.role is Role.SERVER:
            if st is State.START:
                if type(frame) is not F.Hello:
                    self.state = State.CLOSED
                    raise RemoteProtocolError("the first frame must be HELLO", ErrorCode.BAD_STATE, fatal=True)
                if frame.version != F.PROTOCOL_VERSION:
                    self.state = State.CLOSED
                    raise RemoteProtocolError(
                        f"protocol version {frame.version} is not supported (server speaks {F.PROTOCOL_VERSION})",
                        ErrorCode.UNSUPPORTED_VERSION, fatal=True)
                peer = frame.options.get("max_frame")
                if peer is not None:
                    if type(peer) is not int or not PRE_HELLO_MAX_FRAME <= peer <= MAX_FRAME_CEILING:
                        self.state = State.CLOSED
                        raise RemoteProtocolError("HELLO option max_frame is out of range",
                                                  ErrorCode.INVALID_ARGUMENT, fatal=True)
                    self.peer_max_frame = peer
                else:
                    self.peer_max_frame = self.max_frame
                self._bounded_above = COUNT_CONTAINERS_ABOVE
                self.state = State.HELLO_RECEIVED
            return
        # client
        if st is State.HELLO_SENT:
            if type(frame) is F.Welcome:
                if frame.version != F.PROTOCOL_VERSION:
                    self.state = State.CLOSED
                    raise RemoteProtocolError(f"server speaks protocol version {frame.version}",
                                              ErrorCode.UNSUPPORTED_VERSION, fatal=True)
                mf = frame.info.get("max_frame")
                if type(mf) is not int or not PRE_HELLO_MAX_FRAME <= mf <= MAX_FRAME_CEILING:
                    self.state = State.CLOSED
                    raise RemoteProtocolError("WELCOME max_frame is missing or out of range", fatal=True)
                mp = frame.info.get("max_payload")
                self.peer_max_frame = mf
                if type(mp) is int and 0 < mp < mf:
                    self.max_payload = mp
                self._limit = self.max_frame
                self.state = State.OPEN
                return
            if type(frame) is F.Err:
                return  # the handshake was refused; the caller closes
        self.state = State.CLOSED
        raise RemoteProtocolError("the server must answer HELLO with WELCOME or ERR first",
                                  ErrorCode.BAD_STATE, fatal=True)

    # -------------------------------------------------------------- sending

    def send(self, frame: F.Frame) -> bytes:
        """Encode one frame, enforcing the handshake order and the peer's limit."""
        out: list[bytes] = []
        self.send_parts(frame, out)
        return b"".join(out)

    def send_parts(self, frame: F.Frame, out: list[bytes]) -> int:
        """Like :meth:`send` but appends header and body to ``out`` (so many
        frames can go out in one write); returns the bytes added."""
        op = frame.OP
        if op not in self._out_ops:
            raise LocalProtocolError(f"a {self.role.value} may not send {op.name}")
        st = self.state
        if st is not State.OPEN:
            self._before_open(frame)
        elif op is F.Op.HELLO or op is F.Op.WELCOME:
            raise LocalProtocolError(f"{op.name} was already sent; it only opens the connection")
        return self.encode_wire(frame.to_wire(), out)

    def encode_wire(self, value: list[Any], out: list[bytes]) -> int:
        """Append an already-built wire array (hot paths skip the dataclass);
        only valid once the connection is OPEN."""
        n = self._enc.encode_parts(value, out)
        if n - HEADER_SIZE > self.peer_max_frame:
            del out[-2:]
            raise LocalProtocolError(f"frame of {n} bytes exceeds the peer's limit {self.peer_max_frame}")
        return n

    def _before_open(self, frame: F.Frame) -> None:
        st = self.state
        if type(frame) is F.Err:
            # an error may always be reported, also after a fatal one closed the
            # connection: "ERR, then close" is how fatal errors are answered
            return
        if st is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if self.role is Role.CLIENT:
            if st is State.START and type(frame) is F.Hello:
                # announce our inbound limit; unannounced, the server would assume its own
                frame.options.setdefault("max_frame", self.max_frame)
                self.state = State.HELLO_SENT
                return
            raise LocalProtocolError("the client sends HELLO first and waits for WELCOME")
        if st is State.HELLO_RECEIVED and type(frame) is F.Welcome:
            info = frame.info
            info.setdefault("max_frame", self.max_frame)
            info.setdefault("max_payload", self.max_payload)
            self._limit = self.max_frame
            self.state = State.OPEN
            return
        raise LocalProtocolError("the server answers HELLO with WELCOME or ERR before anything else")

    def close(self) -> None:
        self.state = State.CLOSED
