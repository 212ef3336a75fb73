"""TLS: real handshakes over loopback between broker.tls contexts, with and
without client certificates, and refusal of TLS 1.1. Certificates come from
the `certs` fixture (openssl CLI; skipped with a reason if it is missing)."""

from __future__ import annotations

import logging
import ssl
import warnings
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from tidings.broker.security import tls

FAILED_HANDSHAKE = (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)


async def exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *,
                   tls_hostname: str = "localhost", handshake_timeout: float = 5.0) -> str:
    """Serve one TLS connection on 127.0.0.1; the client sends b"ping" and
    returns what the server answers: "pong <client cert CN or -> <version>"."""

    async def handle(stream: TLSStream) -> None:
        async with stream:
            await stream.receive()
            cert = tls.peer_certificate(stream)
            cn = dict(x[0] for x in cert["subject"])["commonName"] if cert else "-"
            await stream.send(f"pong {cn} {stream.extra(TLSAttribute.tls_version)}".encode())

    async def talk(port: int) -> str:
        with anyio.fail_after(5):
            client = await anyio.connect_tcp("127.0.0.1", port, ssl_context=client_ctx,
                                             tls_hostname=tls_hostname, tls_standard_compatible=False)
            async with client:
                await client.send(b"ping")
                return (await client.receive()).decode()

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(SocketAttribute.local_port)
    outcome: list[Any] = []
    async with tls.listener(tcp, server_ctx, handshake_timeout=handshake_timeout) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            try:  # the client's error is raised below, outside the task group (no ExceptionGroup)
                outcome.append(await talk(port))
            except Exception as exc:
                outcome.append(exc)
            tg.cancel_scope.cancel()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def server(certs: Any, **kw: Any) -> ssl.SSLContext:
    return tls.server_context(str(certs.server), str(certs.server_key), **kw)


def client(certs: Any, cafile: Any = "ca", cert: str | None = None, **kw: Any) -> ssl.SSLContext:
    ca = {"ca": str(certs.ca), "other": str(certs.other_ca), None: None}[cafile]
    if cert == "alice":
        return tls.client_context(ca, str(certs.client), str(certs.client_key), **kw)
    if cert == "mallory":
        return tls.client_context(ca, str(certs.rogue_client), str(certs.rogue_client_key), **kw)
    return tls.client_context(ca, **kw)


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tidings.broker.security.tls" and "TLS handshake" in r.getMessage()]


async def test_server_auth_only(certs: Any) -> None:
    reply = await exchange(server(certs), client(certs))
    assert reply == "pong - TLSv1.3"
    assert (await exchange(server(certs), client(certs), tls_hostname="127.0.0.1")).startswith("pong -")


async def test_client_checks_the_server(certs: Any) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await exchange(server(certs), client(certs), tls_hostname="example.com")
    assert (await exchange(server(certs), client(certs, check_hostname=False),
                           tls_hostname="example.com")).startswith("pong -")
    # turning off hostname checks does not turn off verification
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await exchange(server(certs), client(certs, cafile="other", check_hostname=False))
    with pytest.raises(ssl.SSLCertVerificationError):
        await exchange(server(certs), client(certs, cafile=None))  # system store: our CA is not in it


async def test_required_client_certificate(certs: Any, caplog: pytest.LogCaptureFixture) -> None:
    ctx = server(certs, client_ca=str(certs.ca), require_client_cert=True)
    assert await exchange(ctx, client(certs, cert="alice")) == "pong alice TLSv1.3"
    caplog.set_level(logging.INFO, logger="tidings.broker.security.tls")
    with pytest.raises(FAILED_HANDSHAKE):
        await exchange(ctx, client(certs))  # no certificate
    with pytest.raises(FAILED_HANDSHAKE):
        await exchange(ctx, client(certs, cert="mallory"))  # signed by a CA the server does not trust
    failures = handshake_failures(caplog)
    assert len(failures) == 2 and all(r.exc_info is None for r in failures)  # one line each, no traceback
    assert "with 127.0.0.1:" in failures[0].getMessage()


async def test_optional_client_certificate(certs: Any) -> None:
    ctx = server(certs, client_ca=str(certs.ca))
    assert (await exchange(ctx, client(certs))).startswith("pong -")
    assert (await exchange(ctx, client(certs, cert="alice"))).startswith("pong alice")
    with pytest.raises(FAILED_HANDSHAKE):
        await exchange(ctx, client(certs, cert="mallory"))  # presented but invalid: refused


def tls11_client(certs: Any) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1/1_1 are deprecated
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL speak 1.1 at all
    return ctx


async def test_tls_1_1_client_is_refused(certs: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Control: the same client completes a TLS 1.1 handshake with a server that
    # allows it, so the refusal below is the server's minimum version at work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax = server(certs)
        lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        control = await exchange(lax, tls11_client(certs))
    except FAILED_HANDSHAKE as exc:
        pytest.skip(f"this OpenSSL build cannot do TLS 1.1 at all ({exc!r}): nothing to refuse")
    assert control.endswith("TLSv1.1")
    caplog.set_level(logging.INFO, logger="tidings.broker.security.tls")
    with pytest.raises(FAILED_HANDSHAKE):
        await exchange(server(certs), tls11_client(certs))
    assert "UNSUPPORTED_PROTOCOL" in handshake_failures(caplog)[-1].getMessage()


async def test_handshake_timeout_and_plaintext_peers(certs: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tidings.broker.security.tls")

    async def never_called(stream: Any) -> None:
        raise AssertionError("no TLS stream should reach the handler")

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(SocketAttribute.local_port)
    async with tls.listener(tcp, server(certs), handshake_timeout=0.2) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, never_called)
            with anyio.fail_after(5):
                async with await anyio.connect_tcp("127.0.0.1", port) as silent:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await silent.receive()  # the server gives up on the handshake and closes
                async with await anyio.connect_tcp("127.0.0.1", port) as plain:
                    await plain.send(b"\x00\x00\x00\x05HELLO")  # a plaintext client
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        while await plain.receive():
                            pass
            tg.cancel_scope.cancel()
    messages = [r.getMessage() for r in handshake_failures(caplog)]
    assert len(messages) == 2 and "timed out" in messages[0]


def test_contexts_refuse_old_versions_and_bad_arguments(certs: Any) -> None:
    assert server(certs).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client(certs).minimum_version == ssl.TLSVersion.TLSv1_2
    assert server(certs).verify_mode == ssl.CERT_NONE
    assert server(certs, client_ca=str(certs.ca)).verify_mode == ssl.CERT_OPTIONAL
    assert client(certs, check_hostname=False).verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="client_ca"):
        tls.server_context(str(certs.server), str(certs.server_key), require_client_cert=True)
    with pytest.raises(ValueError, match="certfile"):
        tls.client_context(str(certs.ca), keyfile=str(certs.client_key))
    with pytest.raises(ssl.SSLError):
        tls.server_context(str(certs.server), str(certs.client_key))  # key of another certificate


async def test_peer_certificate_of_plain_stream() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    with send, receive:
        assert tls.peer_certificate(send) is None
