"""The route protocol: what brokers of one cluster say to each other (sans-IO).

Routes use the client port: a broker dials a peer's listening port and opens
with an ordinary HELLO whose options carry ``route`` (docs/PROTOCOL.md,
"Routes"). The handshake proves, both ways, that each side knows the cluster
secret (kept in the shared database) without sending it:

    dialer   -> HELLO   options.route = {id, to, nonce: Nd}
    acceptor -> WELCOME info.route    = {id, nonce: Na, proof: P("acceptor")}
    dialer   -> RAUTH   [100, P("dialer")]
    ...then both sides send RSUB (interest) and RMSG (messages) frames

with ``P(role) = HMAC-SHA256(secret, role | dialer id | acceptor id | Nd | Na)``.
Fresh nonces on both sides make a recorded handshake useless for a replay.
Nothing but RAUTH is accepted before the dialer's proof checked out.

After the handshake a frame is the client protocol's framing (4-byte length +
one msgpack array) with the route operation codes below.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Final

from tidings.protocol.codec import HEADER, HEADER_SIZE, unpack
from tidings.protocol.errors import RemoteProtocolError

#: The HELLO option (client protocol) that makes a connection a route.
HELLO_ROUTE: Final = "route"
#: The client name a dialing broker gives in its HELLO (logs only).
ROUTE_CLIENT_NAME: Final = "tidings-route"
#: Bytes of each side's nonce: 128 bits, so a nonce is never seen twice.
NONCE_BYTES: Final = 16
#: Before the dialer's proof checked out a route accepts frames of at most this size
#: (RAUTH is ~40 bytes): a stranger gets no large allocation.
PRE_AUTH_MAX_FRAME: Final = 4096
#: The largest route frame either side accepts (the client protocol's ceiling).
MAX_FRAME: Final = 64 * 1024 * 1024

# Route operation codes (outside the client protocol's, so a misrouted frame is refused).
RAUTH: Final = 100  # [100, proof]: the dialer's proof (first frame after WELCOME)
RSUB: Final = 101  # [101, [[iid, pattern, group|nil, count], ...]]: interest now (count 0 = gone)
RMSG: Final = 102  # [102, [[subject, payload, headers|nil, reply|nil], ...], {index: [iid, ...]}|nil]
RPING: Final = 103  # [103]: are you there (answered with RPONG)
RPONG: Final = 104  # [104]
ROUTE_OPS: Final = frozenset({RAUTH, RSUB, RMSG, RPING, RPONG})
# Positions inside one RSUB entry.
I_ID, I_PATTERN, I_GROUP, I_COUNT = range(4)


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: str, role: str, dialer: str, acceptor: str, dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role, both broker ids and both nonces, keyed with the cluster secret."""
    msg = b"\0".join((role.encode(), dialer.encode(), acceptor.encode(), dialer_nonce, acceptor_nonce))
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


def proof_ok(expected: bytes, given: Any) -> bool:
    """Whether ``given`` (anything off the wire) is ``expected``, compared in constant time."""
    return type(given) is bytes and hmac.compare_digest(expected, given)


class FrameSplitter:
    """Bytes in, decoded msgpack values out (length-prefixed frames), with a size limit.

    ``feed(data)`` then ``frames()`` lists every complete frame. Raises
    RemoteProtocolError for a frame over ``limit`` or undecodable bytes (the
    route is then closed: it cannot be trusted to be in sync)."""

    __slots__ = ("limit", "_buf")

    def __init__(self, limit: int = PRE_AUTH_MAX_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes, one: bool = False) -> list[Any]:
        """Add ``data`` and return the frames now complete (``one``: at most the first;
        the rest stays buffered for the next call, which may raise the limit first)."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        n = len(buf)
        view = memoryview(buf)
        try:
            while n - pos >= HEADER_SIZE:
                (size,) = HEADER.unpack_from(buf, pos)
                if size > self.limit:
                    raise RemoteProtocolError(f"route frame of {size} bytes exceeds the limit of {self.limit}",
                                              fatal=True)
                end = pos + HEADER_SIZE + size
                if end > n:
                    break
                out.append(unpack(view[pos + HEADER_SIZE:end]))
                pos = end
                if one:
                    break
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
