"""The `tidings` command as a user runs it (``python -m tidings`` is the same
program): help texts, pub/sub against a running broker, and `serve`
refusing bad configuration with a message that names the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tidings.client import Client, connect

CLI = [sys.executable, "-m", "tidings"]
RUN_TIMEOUT = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any TIDINGS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env=env or clean_env(), stdin=subprocess.DEVNULL)


# ----------------------------------------------------------------------- help

@pytest.mark.parametrize("args, words", [
    (["--help"], ["serve", "pub", "sub"]),
    (["serve", "--help"], ["--config", "--host", "--port", "--allow-open"]),
    (["pub", "--help"], ["subject", "--header", "--count", "--url"]),
    (["sub", "--help"], ["pattern", "--count", "--json", "--group", "--url"]),
])
def test_help_exits_zero_with_text(args: list[str], words: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: tidings")
    for w in words:
        assert w in r.stdout, (w, r.stdout)


# ----------------------------------------------------------------- pub / sub

async def test_cli_pub_publishes_with_headers(broker) -> None:
    async with connect(broker.url) as tc:
        sub = await tc.subscribe("cli.>")
        r = await anyio.to_thread.run_sync(lambda: run_cli(
            "pub", "cli.orders", '{"id": 7}', "-H", "type=OrderCreated", "--header", "v=2",
            "--count", "3", "--url", broker.url))
        assert r.returncode == 0, r.stderr
        for _ in range(3):
            m = await sub.next(timeout=10)
            assert (m.subject, m.payload, m.headers) == ("cli.orders", b'{"id": 7}',
                                                       {"type": "OrderCreated", "v": "2"})


async def _wait_for_subscriptions(tc: Client, n: int) -> None:
    """Until the broker reports ``n`` subscriptions (bounded; one round trip per check)."""
    with anyio.fail_after(RUN_TIMEOUT):
        while (await tc.call("stats"))["subscriptions"] < n:
            await tc.flush()


async def test_cli_sub_count_json(broker) -> None:
    async with connect(broker.url) as tc:
        async with await anyio.open_process(
                [*CLI, "sub", "cli.*", "--count", "3", "--json", "--url", broker.url],
                env=clean_env(), stdin=subprocess.DEVNULL, stderr=None) as proc:
            await _wait_for_subscriptions(tc, 1)
            await tc.publish("cli.a", b"one", headers={"k": "v", "n": 1, "b": b"raw"})
            await tc.publish("cli.b", "twö")
            await tc.publish("cli.not.matching", b"skip")
            await tc.publish("cli.c", b"three")
            await tc.publish("cli.d", b"four: after --count, never printed")
            await tc.flush()
            assert proc.stdout is not None
            out = b""
            with anyio.fail_after(RUN_TIMEOUT):
                async for chunk in proc.stdout:
                    out += chunk
                code = await proc.wait()
            assert code == 0
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(d["subject"], d["payload"]) for d in lines] == [("cli.a", "one"), ("cli.b", "twö"),
                                                             ("cli.c", "three")]
    assert lines[0]["headers"] == {"k": "v", "n": 1, "b": "raw"}
    assert lines[1]["headers"] == {} and lines[1]["reply"] is None


async def test_cli_sub_group_shares_with_another_member(broker) -> None:
    async with connect(broker.url) as tc:
        other = await tc.subscribe("jobs", group="g")
        async with await anyio.open_process(
                [*CLI, "sub", "jobs", "--group", "g", "--count", "1", "--url", broker.url],
                env=clean_env(), stdin=subprocess.DEVNULL, stderr=None) as proc:
            await _wait_for_subscriptions(tc, 2)
            await tc.publish("jobs", b"0")
            await tc.publish("jobs", b"1")
            await tc.flush()
            assert proc.stdout is not None
            with anyio.fail_after(RUN_TIMEOUT):
                out = b"".join([chunk async for chunk in proc.stdout])
                assert await proc.wait() == 0
        got_here = (await other.next(timeout=10)).payload
    printed = out.decode().strip()
    assert printed in ("[jobs] 0", "[jobs] 1")
    assert {printed[-1:].encode(), got_here} == {b"0", b"1"}


def test_cli_pub_without_broker_gives_a_clear_error() -> None:
    r = run_cli("pub", "a", "b", "--url", "tidings://127.0.0.1:1")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "127.0.0.1:1" in r.stderr


# -------------------------------------------------------------------- config

def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `serve` expecting it to refuse to start (a started broker would hit the timeout)."""
    return run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *args, env=env)


def test_unknown_key_in_toml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text('max_payload = 65536\nmax_pendng_bytes = 1024\n')
    r = serve(tmp_path, "--config", str(cfg))
    assert r.returncode != 0
    assert "max_pendng_bytes" in r.stderr
    assert "Traceback" not in r.stderr
    assert "listening" not in r.stdout


def test_bad_value_in_toml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text('slow_consumer = "explode"\n')
    r = serve(tmp_path, "--config", str(cfg))
    assert r.returncode != 0
    assert "slow_consumer" in r.stderr


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text('max_payload = \n')
    r = serve(tmp_path, "--config", str(cfg))
    assert r.returncode != 0
    assert str(cfg) in r.stderr


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    r = serve(tmp_path, "--config", str(tmp_path / "nope.toml"))
    assert r.returncode != 0
    assert "nope.toml" in r.stderr


@pytest.mark.parametrize("var, value, named", [
    ("TIDINGS_MAX_CONNECTIONS", "lots", "max_connections"),
    ("TIDINGS_HEARTBEAT", "soon", "heartbeat"),
    ("TIDINGS_ALLOW_OPEN", "maybe", "allow_open"),
    ("TIDINGS_MAX_PAYLOAD", "0", "max_payload"),
    ("TIDINGS_SLOW_CONSUMR", "drop", "slow_consumr"),
])
def test_bad_environment_is_refused(tmp_path: Path, var: str, value: str, named: str) -> None:
    r = serve(tmp_path, env=clean_env(**{var: value}))
    assert r.returncode != 0
    assert named in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_open_host_without_allow_open_is_refused(tmp_path: Path) -> None:
    r = serve(tmp_path, "--host", "0.0.0.0")
    assert r.returncode != 0
    assert "allow" in r.stderr and "0.0.0.0" in r.stderr
    assert "listening" not in r.stdout


def test_config_file_settings_take_effect_and_flags_win(start_broker, tmp_path: Path) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text('server_name = "from-toml"\nmax_payload = 65536\ndurability = "full"\n')
    broker = start_broker("--config", str(cfg), "--durability", "normal",
                          env={"TIDINGS_MAX_PAYLOAD": "131072"})

    async def check() -> dict[str, object]:
        async with connect(broker.url) as tc:
            return {**tc.server_info, **(await tc.call("server.info"))}

    info = anyio.run(check)
    assert info["server_name"] == "from-toml"  # TOML over default
    assert info["max_payload"] == 131072  # env over TOML
    assert info["durability"] == "normal"  # flag over TOML


def test_serve_ignores_the_cli_url_variable(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_URL": "tidings://127.0.0.1:7421"})
    assert broker.alive()


def test_serve_does_not_import_the_client_library() -> None:
    """`tidings serve` builds the whole command line and the broker, and none of that needs the
    client library: not importing it saves every broker start (a test suite starts hundreds)
    a tenth of a second or so."""
    code = ("import sys\n"
            "from tidings.cli.main import build_parser\n"
            "build_parser().parse_args(['serve'])\n"
            "import tidings.broker.app\n"
            "print(sorted(m for m in sys.modules if m == 'tidings.client' or m.startswith('tidings.client.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -------------------------------------------------------------- the package

def test_cli_modules_share_common_and_import_no_private_names() -> None:
    """Every command module takes its plumbing from tidings.cli.common by public
    name: no module imports another's private (underscore) name, renames a module
    on import, or writes its own default URL (the client's DEFAULT_URL is the one)."""
    import ast

    import tidings.cli

    found: list[str] = []
    for path in sorted(Path(tidings.cli.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tidings"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
                found += [f"{path.name}: {a.name} as {a.asname}" for a in node.names if a.asname]
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name} as {a.asname}" for a in node.names
                          if a.name.startswith("tidings") and a.asname]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "tidings://" in node.value:
                found.append(f"{path.name}:{node.lineno}: a URL of its own {node.value!r}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [f"{path.name}:{node.lineno}: defines DEFAULT_URL" for t in targets
                          if isinstance(t, ast.Name) and t.id == "DEFAULT_URL"]
    assert found == []


async def test_pub_and_sub_authenticate_like_the_admin_commands(start_broker, tmp_path: Path) -> None:
    """pub and sub take --user/--password (or TIDINGS_USER/TIDINGS_PASSWORD) like every
    command that talks to a broker; a refusal is one line on stderr and exit status 1."""
    from securitytools import PASSWORDS, user, write_config

    conf = write_config(tmp_path / "tidings.toml",
                        users={**user("admin", publish=[">"], subscribe=[">"], admin=[">"]),
                               **user("alice", publish=["cli.>"], subscribe=["cli.>"])})
    b = start_broker("--config", str(conf))
    alice = clean_env(TIDINGS_USER="alice", TIDINGS_PASSWORD=PASSWORDS["alice"])
    async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as tc:
        sub = await tc.subscribe("cli.>")
        await tc.flush()
        r = await anyio.to_thread.run_sync(lambda: run_cli("pub", "cli.auth", "by env", "--url", b.url, env=alice))
        assert r.returncode == 0, r.stderr
        r = await anyio.to_thread.run_sync(lambda: run_cli(
            "pub", "cli.auth", "by flags", "--url", b.url, "--user", "alice", "--password", PASSWORDS["alice"]))
        assert r.returncode == 0, r.stderr
        assert [(await sub.next(timeout=10)).payload for _ in range(2)] == [b"by env", b"by flags"]

        async with await anyio.open_process(
                [*CLI, "sub", "cli.>", "--count", "1", "--url", b.url],
                env=alice, stdin=subprocess.DEVNULL, stderr=None) as proc:
            await _wait_for_subscriptions(tc, 2)
            await tc.publish("cli.x", b"to alice")
            await tc.flush()
            assert proc.stdout is not None
            with anyio.fail_after(RUN_TIMEOUT):
                out = b"".join([chunk async for chunk in proc.stdout])
                assert await proc.wait() == 0
        assert out.decode().strip() == "[cli.x] to alice"

    for args, env in ((["pub", "cli.x", "y"], clean_env()),  # no credentials
                      (["pub", "cli.x", "y", "--user", "alice", "--password", "wrong"], clean_env()),
                      (["sub", "other.>"], alice)):  # not alice's subjects
        r = await anyio.to_thread.run_sync(lambda a=args, e=env: run_cli(*a, "--url", b.url, env=e))
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("tidings: ") and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_commands_verify_a_tls_broker_with_the_ca_file(start_broker, tmp_path: Path, certs) -> None:
    """--ca-file, or TIDINGS_CA_FILE, names the CA that verifies a tidings+tls:// broker;
    without it the system's CAs do not know the test CA and the command fails in one line."""
    from securitytools import write_config

    conf = write_config(tmp_path / "tidings.toml", tls={"cert": certs.server, "key": certs.server_key})
    b = start_broker("--config", str(conf))
    url = f"tidings+tls://127.0.0.1:{b.port}"  # the test server certificate lists IP:127.0.0.1
    r = run_cli("pub", "tls.x", "y", "--url", url, "--ca-file", str(certs.ca))
    assert r.returncode == 0, r.stderr
    r = run_cli("queues", "declare", "tlsq", "--bind", "tls.>", "--url", url,
                env=clean_env(TIDINGS_CA_FILE=str(certs.ca)))
    assert r.returncode == 0, r.stderr
    r = run_cli("queues", "--url", url, "--json", "--ca-file", str(certs.ca))
    assert r.returncode == 0, r.stderr
    assert "tlsq" in [q["name"] for q in json.loads(r.stdout)]
    r = run_cli("queues", "--url", url, "--timeout", "5")
    assert r.returncode == 1 and r.stderr.startswith("tidings: ") and "Traceback" not in r.stderr, r.stderr
