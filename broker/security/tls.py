"""TLS contexts for the broker's listener and for clients (TLS 1.2 minimum).

The broker wraps its TCP listener with :func:`listener` (anyio's
TLSListener: the handshake runs in the connection's own task, bounded by
``handshake_timeout``, so a peer that never finishes it holds nothing for
long). The connection actor's HELLO timeout starts after the handshake.

Client certificates: with ``client_ca`` set, a certificate a client presents
is verified against it (CERT_OPTIONAL); with ``require_client_cert`` too, a
client without a valid one is refused during the handshake (CERT_REQUIRED).
What a verified certificate means is decided by ``[tls] client_cert_user``
(broker/security/auth.py): unset, it only authenticates the connection; set to one
of :data:`CERT_USER_SOURCES`, the names :func:`cert_names` reads from that
field of the certificate may log the client in as the user of that name.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, Final

from anyio import aclose_forcefully
from anyio.abc import AnyByteStream, Listener, SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSListener

log = logging.getLogger(__name__)

MIN_VERSION: Final = ssl.TLSVersion.TLSv1_2  # 1.0/1.1 are deprecated (RFC 8996)
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds a connecting peer gets to finish the TLS handshake
# Where a client certificate's user name may come from: the subject's CN, or a subjectAltName of one type.
CERT_USER_SOURCES: Final = {"cn": None, "san:dns": "DNS", "san:email": "email", "san:uri": "URI"}


def server_context(certfile: str, keyfile: str | None = None, client_ca: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server-side context: TLS >= 1.2, OpenSSL's default ciphers, no
    compression or renegotiation, client certificates per the module doc.

    ``keyfile`` None: the key is in ``certfile``. Raises ValueError if
    ``require_client_cert`` has no ``client_ca``; OSError/ssl.SSLError if a
    file cannot be read or loaded (e.g. key does not match certificate).
    """
    if require_client_cert and not client_ca:
        raise ValueError("require_client_cert needs client_ca to verify client certificates")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(certfile, keyfile)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context: TLS >= 1.2, the server's certificate always
    verified (against ``cafile``, or the system store if None), its name
    checked unless ``check_hostname`` is False (e.g. connecting by an
    address the certificate does not list). ``certfile``/``keyfile``: a
    client certificate to present. Raises ValueError for a key without a
    certificate; OSError/ssl.SSLError for unreadable or unloadable files.
    """
    if keyfile and not certfile:
        raise ValueError("a client key needs its certificate (certfile)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED  # explicit: no hostname check must still mean a verified certificate
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class BrokerTLSListener(TLSListener):
    """anyio's TLSListener, but a failed handshake is one INFO line, not a
    traceback: port scanners and plaintext clients are routine."""

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: AnyByteStream) -> None:
        if not isinstance(exc, Exception):  # cancellation & co.: anyio's own handling re-raises them
            await TLSListener.handle_handshake_error(exc, stream)
            return
        addr = stream.extra(SocketAttribute.remote_address, None)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        await aclose_forcefully(stream)
        log.info("TLS handshake with %s failed: %s", peer, _short(exc))


def _short(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        exc = cause
    reason = getattr(exc, "reason", None)
    return str(reason or exc or type(exc).__name__)


def listener(tcp_listener: Listener[Any], context: ssl.SSLContext,
             handshake_timeout: float = HANDSHAKE_TIMEOUT) -> TLSListener:
    """Wrap ``tcp_listener`` so every accepted stream is TLS.

    ``standard_compatible=False``: the protocol frames its own messages, so
    a peer closing without close_notify cannot truncate one undetected.
    """
    return BrokerTLSListener(tcp_listener, context, standard_compatible=False,
                             handshake_timeout=handshake_timeout)


def peer_certificate(stream: Any) -> dict[str, Any] | None:
    """The verified client certificate of a TLS stream (``getpeercert()``
    form), or None: no TLS, no certificate, or not verified."""
    cert = stream.extra(TLSAttribute.peer_certificate, None)
    return cert or None


def cert_names(cert: dict[str, Any] | None, source: str) -> tuple[str, ...]:
    """The distinct names of ``source`` (a key of :data:`CERT_USER_SOURCES`)
    in a verified certificate (``getpeercert()`` form), in certificate order;
    () for no certificate or no such field."""
    if not cert:
        return ()
    out: list[str] = []
    if source == "cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and isinstance(value, str):
                    out.append(value)
    else:
        kind = CERT_USER_SOURCES[source]
        for key, value in cert.get("subjectAltName", ()):
            if key == kind and isinstance(value, str):
                out.append(value)
    return tuple(dict.fromkeys(out))
