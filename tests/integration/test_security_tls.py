"""TLS on the broker's listener: `tidings+tls://` with a CA file, client
certificates optional or required (mTLS), plaintext clients refused, and
TLS together with authentication. Certificates come from the `certs`
fixture (openssl CLI; skipped with a reason where it is missing)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import anyio
import pytest
from securitytools import PASSWORDS, WAIT, audit_lines, user, write_config

from tidings import client
from tidings.client import connect
from tidings.client import errors as E


@pytest.fixture(autouse=True)
def _client_tls_without_close_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work around a client bug (reported, client/ is not ours to edit here):
    Client.close() and the client's connection supervisor both aclose() the
    stream; with anyio's default tls_standard_compatible=True each aclose()
    waits to read the peer's close_notify, and the second reader fails with
    BusyResourceError. The broker frames its own messages and does not use
    close_notify (tls.listener: standard_compatible=False), so the client
    should not either; until it passes that itself, tests pass it for it."""
    real = anyio.connect_tcp

    async def connect_tcp(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("tls") or kwargs.get("ssl_context") is not None:
            kwargs.setdefault("tls_standard_compatible", False)
        return await real(*args, **kwargs)

    monkeypatch.setattr(anyio, "connect_tcp", connect_tcp)


def tls_url(b: Any) -> str:
    return f"tidings+tls://127.0.0.1:{b.port}"  # the test server certificate lists IP:127.0.0.1


def client_ctx(certs: Any, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_broker(start_broker: Any, tmp_path: Path, certs: Any, **tls: Any) -> Any:
    cfg = write_config(tmp_path / "tidings.toml",
                       tls={"cert": certs.server, "key": certs.server_key, **tls})
    return start_broker("--config", str(cfg))


async def roundtrip(tc: client.Client) -> None:
    sub = await tc.subscribe("tls.check")
    await tc.publish("tls.check", b"secret payload")
    assert (await sub.next(timeout=WAIT)).payload == b"secret payload"


async def test_tls_with_a_ca_file(start_broker, tmp_path: Path, certs) -> None:
    b = tls_broker(start_broker, tmp_path, certs)
    async with connect(tls_url(b), ca_file=str(certs.ca)) as tc:
        await roundtrip(tc)
        assert (await tc.call("server.info"))["tls"] is True


async def test_plaintext_client_is_refused_by_a_tls_broker(start_broker, tmp_path: Path, certs) -> None:
    b = tls_broker(start_broker, tmp_path, certs)
    with pytest.raises(client.TidingsError):
        async with connect(b.url, reconnect=False, timeout=5):
            pass
    async with connect(tls_url(b), ca_file=str(certs.ca)) as tc:  # and the broker is fine
        await roundtrip(tc)


async def test_client_refuses_a_server_it_cannot_verify(start_broker, tmp_path: Path, certs) -> None:
    b = tls_broker(start_broker, tmp_path, certs)
    with pytest.raises(client.ConnectError):
        async with connect(tls_url(b), ca_file=str(certs.other_ca), reconnect=False, timeout=5):
            pass


async def test_optional_client_certificate(start_broker, tmp_path: Path, certs) -> None:
    b = tls_broker(start_broker, tmp_path, certs, client_ca=certs.ca)
    async with connect(tls_url(b), ssl_context=client_ctx(certs)) as tc:  # none: fine
        await roundtrip(tc)
    async with connect(tls_url(b), ssl_context=client_ctx(certs, cert=certs.client, key=certs.client_key)) as tc:
        await roundtrip(tc)


async def test_required_client_certificate(start_broker, tmp_path: Path, certs) -> None:
    b = tls_broker(start_broker, tmp_path, certs, client_ca=certs.ca, require_client_cert=True)
    async with connect(tls_url(b), ssl_context=client_ctx(certs, cert=certs.client, key=certs.client_key)) as tc:
        await roundtrip(tc)
    for ctx in (client_ctx(certs), client_ctx(certs, cert=certs.rogue_client, key=certs.rogue_client_key)):
        with pytest.raises(client.ConnectError):
            async with connect(tls_url(b), ssl_context=ctx, reconnect=False, timeout=5) as tc:
                # TLS 1.3 clients finish their side before the server checks the certificate:
                # the refusal then arrives as the first read fails
                await tc.flush(timeout=5)
    assert b.alive()
    assert b.terminate() == 0
    assert "Traceback" not in b.stderr()
    assert "TLS handshake with 127.0.0.1" in b.stderr()  # one INFO line per refused handshake


async def test_tls_with_authentication_and_permissions(start_broker, tmp_path: Path, certs) -> None:
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", publish=["tls.>"], subscribe=["tls.>"]),
                       tls={"cert": certs.server, "key": certs.server_key})
    b = start_broker("--config", str(cfg))
    async with connect(tls_url(b), ca_file=str(certs.ca), user="alice", password=PASSWORDS["alice"]) as tc:
        assert tc.server_info["user"] == "alice"
        await roundtrip(tc)
    with pytest.raises(client.TidingsError):
        async with connect(tls_url(b), ca_file=str(certs.ca), user="alice", password="wrong", reconnect=False):
            pass


def cert_user_broker(start_broker: Any, tmp_path: Path, certs: Any, users: dict[str, Any],
                     **tls: Any) -> Any:
    cfg = write_config(tmp_path / "tidings.toml", users=users,
                       tls={"cert": certs.server, "key": certs.server_key, "client_ca": certs.ca, **tls})
    return start_broker("--config", str(cfg))


async def test_a_client_certificate_logs_in_as_the_user_it_names(start_broker, tmp_path: Path, certs) -> None:
    """[tls] client_cert_user = "cn": the test client certificate (CN=alice)
    logs in as alice without a password; credentials sent as well must be
    alice's; a client without a certificate still logs in by password."""
    b = cert_user_broker(start_broker, tmp_path, certs,
                         {**user("alice", publish=["tls.>"], subscribe=["tls.>"]), **user("bob")},
                         client_cert_user="cn")
    alice_cert = client_ctx(certs, cert=certs.client, key=certs.client_key)
    async with connect(tls_url(b), ssl_context=alice_cert) as tc:
        assert tc.server_info["user"] == "alice"
        await roundtrip(tc)  # alice's permissions apply
    async with connect(tls_url(b), ssl_context=alice_cert, user="alice", password=PASSWORDS["alice"]) as tc:
        assert tc.server_info["user"] == "alice"
    with pytest.raises(E.AuthenticationError):  # the certificate binds the connection to alice
        async with connect(tls_url(b), ssl_context=alice_cert, user="bob", password=PASSWORDS["bob"],
                           reconnect=False):
            pass
    with pytest.raises(E.AuthenticationError):  # no certificate, no credentials
        async with connect(tls_url(b), ssl_context=client_ctx(certs), reconnect=False):
            pass
    async with connect(tls_url(b), ssl_context=client_ctx(certs), user="bob", password=PASSWORDS["bob"]) as tc:
        assert tc.server_info["user"] == "bob"
    b.terminate()
    lines = audit_lines(b.data_dir)
    assert {"user": "alice", "method": "certificate"} in [{k: d.get(k) for k in ("user", "method")}
                                                         for d in lines if d["event"] == "auth_ok"]
    assert [d["reason"] for d in lines if d["event"] == "auth_failed"] == ["cert_user_mismatch", "missing"]


async def test_a_certificate_only_user(start_broker, tmp_path: Path, certs) -> None:
    """With client_cert_user set, a user may have no password or token at all."""
    b = cert_user_broker(start_broker, tmp_path, certs,
                         {"alice": {"permissions": {"publish": ["tls.>"], "subscribe": ["tls.>"]}}},
                         client_cert_user="cn", require_client_cert=True)
    async with connect(tls_url(b), ssl_context=client_ctx(certs, cert=certs.client, key=certs.client_key)) as tc:
        assert tc.server_info["user"] == "alice"
        await roundtrip(tc)


async def test_without_client_cert_user_a_certificate_names_no_user(start_broker, tmp_path: Path, certs) -> None:
    """Without client_cert_user, mTLS only authenticates the connection: a
    verified certificate (CN=alice) is no login, the HELLO needs credentials."""
    b = cert_user_broker(start_broker, tmp_path, certs, user("alice", publish=["tls.>"], subscribe=["tls.>"]),
                         require_client_cert=True)
    alice_cert = client_ctx(certs, cert=certs.client, key=certs.client_key)
    with pytest.raises(E.AuthenticationError):
        async with connect(tls_url(b), ssl_context=alice_cert, reconnect=False):
            pass
    async with connect(tls_url(b), ssl_context=alice_cert, user="alice", password=PASSWORDS["alice"]) as tc:
        assert tc.server_info["user"] == "alice"
