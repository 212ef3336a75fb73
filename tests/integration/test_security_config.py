"""Security settings fail closed: `tidings serve` refuses to start, with exit
status 2 and a message naming the problem, for every security section it
does not fully understand; with no users it listens on loopback only unless
told it may run open. Also `tidings passwd` (client/cli/passwd.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from securitytools import PASSWORDS, WAIT, user, write_config

from tidings.broker.security.auth import is_token_hash, token_hash, verify_password
from tidings.cli.main import main
from tidings.client import connect

CLI = [sys.executable, "-m", "tidings"]
RUN_TIMEOUT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(extra)
    return env


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `serve` expecting a refusal (a broker that starts would hit the timeout)."""
    return subprocess.run([*CLI, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, env=clean_env(), check=False,
                          stdin=subprocess.DEVNULL)


def refused(tmp_path: Path, text: str, *words: str) -> str:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text(text)
    r = serve(tmp_path, "--config", str(cfg))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "listening" not in r.stdout
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


GOOD_HASH = user("x", password="pw")["x"]["password"]


@pytest.mark.parametrize("text, words", [
    ("auth = true\n", ["no users"]),
    ("auth = false\n[users.a]\npassword = \"HASH\"\n", ["auth = false"]),
    ("[users.a]\n", ["neither a password nor a token"]),
    ("[users.a]\npassword = \"hunter2\"\n", ["users.a.password", "tidings passwd"]),
    ("[users.a]\npassword = \"HASH\"\npasword = \"x\"\n", ["pasword"]),
    ("[users.a]\npassword = \"HASH\"\n[users.a.permissions]\npublsh = [\">\"]\n", ["publsh"]),
    ("[users.a]\npassword = \"HASH\"\n[users.a.permissions]\npublish = [\"a..b\"]\n",
     ["users.a.permissions"]),
    ("[users.a]\ntokens = [\"plaintext-token\"]\n", ["tokens[0]"]),
    ("[users.\"bad name!\"]\npassword = \"HASH\"\n", ["invalid user name"]),
    ("[tls]\nkey = \"server.key\"\n", ["tls.key"]),
    ("[tls]\ncert = \"/nonexistent/server.pem\"\n", ["tls.cert", "/nonexistent/server.pem"]),
    ("[tls]\ncrt = \"server.pem\"\n", ["crt"]),
    ("[security]\nx = 1\n", ["security"]),
])
def test_bad_security_config_is_refused(tmp_path: Path, text: str, words: list[str]) -> None:
    err = refused(tmp_path, text.replace("HASH", GOOD_HASH), *words)
    assert "hunter2" not in err  # a pasted plaintext password is never echoed


def test_tls_requiring_client_certs_without_a_ca_is_refused(tmp_path: Path, certs) -> None:
    refused(tmp_path, f'[tls]\ncert = "{certs.server}"\nkey = "{certs.server_key}"\nrequire_client_cert = true\n',
            "client_ca")


def test_tls_key_that_does_not_match_is_refused(tmp_path: Path, certs) -> None:
    refused(tmp_path, f'[tls]\ncert = "{certs.server}"\nkey = "{certs.client_key}"\n', "tls")


def test_unwritable_audit_log_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, 'audit_log = "/nonexistent/dir/audit.log"\n', "audit log", "/nonexistent/dir/audit.log")


# ------------------------------------------------------------- loopback only

def test_no_users_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    r = serve(tmp_path, "--host", "0.0.0.0")
    assert r.returncode == 2
    assert "0.0.0.0" in r.stderr and "allow_open" in r.stderr and "users" in r.stderr
    assert "listening" not in r.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost"])
def test_loopback_hosts_need_nothing(start_broker, host: str) -> None:
    b = start_broker("--host", host)
    assert b.alive()


def test_allow_open_binds_anywhere(start_broker) -> None:
    # Binds all interfaces; the test itself only ever connects over loopback.
    b = start_broker("--host", "0.0.0.0", "--allow-open")
    assert b.alive()


def test_with_users_a_non_loopback_host_is_allowed(start_broker, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", publish=[">"], subscribe=[">"]))
    b = start_broker("--config", str(cfg), "--host", "0.0.0.0")
    assert b.alive()

    async def check() -> None:
        async with connect(f"tidings://127.0.0.1:{b.port}", user="alice", password=PASSWORDS["alice"]) as tc:
            await tc.flush(timeout=WAIT)

    anyio.run(check)
    assert b.terminate() == 0
    assert "in clear" in b.stderr()  # auth without TLS on the network is warned about


# --------------------------------------------------------------------- passwd

def run_passwd(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str,
               stdin: str = "") -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["passwd", *argv])
    return code, capsys.readouterr().out


def test_passwd_stdin_prints_a_hash_the_broker_accepts(monkeypatch, capsys, tmp_path: Path) -> None:
    code, out = run_passwd(monkeypatch, capsys, "--stdin", stdin="correct horse\n")
    assert code == 0
    encoded = out.strip()
    assert encoded.startswith("scrypt$") and "correct horse" not in encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("wrong horse", encoded)


def test_passwd_token_prints_token_and_hash(monkeypatch, capsys) -> None:
    code, out = run_passwd(monkeypatch, capsys, "--token")
    assert code == 0
    token, digest = out.split()
    assert is_token_hash(digest) and token_hash(token) == digest


def test_passwd_refuses_an_empty_password(monkeypatch, capsys) -> None:
    code, out = run_passwd(monkeypatch, capsys, "--stdin", stdin="\n")
    assert code == 1 and out == ""
