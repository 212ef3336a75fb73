"""Authentication against a real broker: passwords and tokens in HELLO, one
error for every kind of bad credential, throttling of a peer that keeps
failing, per-user connection limits, and the audit log of it all."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest
from rawclient import RawClient
from securitytools import PASSWORDS, TOKENS, WAIT, audit_lines, user, write_config

from tidings import client
from tidings.client import connect
from tidings.client import errors as E
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F

ALL = {"publish": [">"], "subscribe": [">"], "consume": [">"], "admin": [">"]}


@pytest.fixture
def auth_broker(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("alice", **ALL),
        **user("svc", password=None, tokens=[TOKENS["svc"]], **ALL),
        **user("carol", max_connections=2, **ALL),
    })
    return start_broker("--config", str(cfg))


async def test_password_login_works_and_welcome_names_the_user(auth_broker) -> None:
    async with connect(auth_broker.url, user="alice", password=PASSWORDS["alice"]) as tc:
        assert tc.server_info["user"] == "alice"
        sub = await tc.subscribe("hello")
        await tc.publish("hello", b"x")
        assert (await sub.next(timeout=WAIT)).payload == b"x"
        info = await tc.call("server.info")
        assert info["auth"] is True


async def test_token_login_works(auth_broker) -> None:
    async with connect(auth_broker.url, token=TOKENS["svc"]) as tc:
        assert tc.server_info["user"] == "svc"
        await tc.flush(timeout=WAIT)


async def refusal(url: str, **creds: str) -> client.TidingsError:
    with pytest.raises(client.TidingsError) as info:
        async with connect(url, reconnect=False, **creds):
            pass
    return info.value


async def test_unknown_user_and_wrong_password_get_the_same_error(auth_broker) -> None:
    unknown = await refusal(auth_broker.url, user="mallory", password="whatever")
    wrong = await refusal(auth_broker.url, user="alice", password="not-her-password")
    bad_token = await refusal(auth_broker.url, token="not-a-token")
    for err in (unknown, wrong, bad_token):
        assert isinstance(err, E.AuthenticationError), err
        assert err.code == ErrorCode.AUTH_FAILED
        assert not err.retriable
    assert str(unknown) == str(wrong) == str(bad_token)


async def test_no_credentials_are_refused_with_a_clear_error(auth_broker) -> None:
    err = await refusal(auth_broker.url)
    assert isinstance(err, E.AuthenticationError)
    assert "authentication required" in str(err)


async def test_refused_hello_is_answered_with_err_then_close(auth_broker) -> None:
    async with RawClient.open(auth_broker.host, auth_broker.port) as rc:
        await rc.send(F.Hello(F.PROTOCOL_VERSION, "raw", {"user": "alice", "password": "nope"}, {}))
        frames = await rc.read_until_eof(timeout=WAIT)
    assert [(type(f), getattr(f, "code", None)) for f in frames] == [(F.Err, ErrorCode.AUTH_FAILED)]


async def test_repeated_failures_from_one_peer_are_throttled(auth_broker) -> None:
    for _ in range(5):  # the default throttle: 5 failures within a minute block the peer
        err = await refusal(auth_broker.url, user="alice", password="guess")
        assert "authentication failed" in str(err)
    # now even the right password is refused, without being checked
    err = await refusal(auth_broker.url, user="alice", password=PASSWORDS["alice"])
    assert isinstance(err, E.AuthenticationError)
    assert "too many failed attempts" in str(err)
    assert auth_broker.alive()


async def test_per_user_connection_limit(auth_broker) -> None:
    async with connect(auth_broker.url, user="carol", password=PASSWORDS["carol"]) as c1:
        async with connect(auth_broker.url, user="carol", password=PASSWORDS["carol"]):
            err = await refusal(auth_broker.url, user="carol", password=PASSWORDS["carol"])
            assert isinstance(err, E.TooManyConnectionsError), err
            assert err.retriable
            assert "carol" in str(err)
            # other users are not affected by carol's cap
            async with connect(auth_broker.url, user="alice", password=PASSWORDS["alice"]) as a:
                await a.flush(timeout=WAIT)
        # one of carol's connections closed: a new one is admitted again (the broker
        # releases the slot when it notices the close, so wait for that via stats)
        with anyio.fail_after(WAIT):
            while (await c1.call("stats"))["connections"] != 1:
                await c1.flush()
        async with connect(auth_broker.url, user="carol", password=PASSWORDS["carol"]) as again:
            await again.flush(timeout=WAIT)


async def test_max_connections_per_user_setting_applies_to_users_without_their_own(start_broker,
                                                                                   tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", **ALL),
                       settings={"max_connections_per_user": 1})
    b = start_broker("--config", str(cfg))
    async with connect(b.url, user="alice", password=PASSWORDS["alice"]):
        err = await refusal(b.url, user="alice", password=PASSWORDS["alice"])
        assert isinstance(err, E.TooManyConnectionsError)


async def test_audit_log_records_logins_without_secrets(auth_broker) -> None:
    async with connect(auth_broker.url, user="alice", password=PASSWORDS["alice"]) as tc:
        await tc.flush(timeout=WAIT)
    async with connect(auth_broker.url, token=TOKENS["svc"]) as tc:
        await tc.flush(timeout=WAIT)
    await refusal(auth_broker.url, user="alice", password="wrong-pw-1")
    await refusal(auth_broker.url, user="nobody", password="wrong-pw-2")
    await refusal(auth_broker.url, token="wrong-token-3")
    assert auth_broker.terminate() == 0  # shutdown flushes and closes the audit log
    raw = (auth_broker.data_dir / "audit.log").read_text()
    for secret in [*PASSWORDS.values(), *TOKENS.values(), "wrong-pw-1", "wrong-pw-2", "wrong-token-3"]:
        assert secret not in raw
    lines = audit_lines(auth_broker.data_dir)
    oks = [(x["user"], x["method"]) for x in lines if x["event"] == "auth_ok"]
    assert oks == [("alice", "password"), ("svc", "token")]
    fails = [(x["user"], x["method"], x["reason"]) for x in lines if x["event"] == "auth_failed"]
    assert fails == [("alice", "password", "bad_password"), ("nobody", "password", "unknown_user"),
                     ("", "token", "bad_token")]
    for x in lines:
        assert set(x) >= {"ts", "event", "user", "peer"}
        assert x["peer"].startswith("127.0.0.1:") or x["event"] == "suppressed"


async def test_audit_log_can_go_to_the_logger(start_broker, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", **ALL), settings={"audit_log": "-"})
    b = start_broker("--config", str(cfg))
    async with connect(b.url, user="alice", password=PASSWORDS["alice"]) as tc:
        await tc.flush(timeout=WAIT)
    assert b.terminate() == 0
    assert not (b.data_dir / "audit.log").exists()
    lines = [line for line in b.stderr().splitlines() if "tidings.audit" in line and '"auth_ok"' in line]
    assert len(lines) == 1 and '"user": "alice"' in lines[0] and PASSWORDS["alice"] not in b.stderr()


async def test_reading_and_destructive_admin_calls_and_group_joins_are_audited(auth_broker, tmp_path: Path) -> None:
    """dlq.list reads dead-lettered payloads, backup copies every message and
    a group join moves a group's partitions and commits its offsets: each is
    audited with its outcome, like the calls that change state. Calls that
    read only counters (queue.info, stats) are not, so dashboards cannot
    drown the log."""
    async with connect(auth_broker.url, user="alice", password=PASSWORDS["alice"]) as tc:
        await tc.declare_queue("jobs", bind=["jobs.>"])
        await tc.dlq_list("jobs")
        await tc.queue_info("jobs")
        await tc.call("stats")
        await tc.call("backup", {"name": "copy.db"}, timeout=WAIT)
        await tc.declare_stream("clicks", bind=["clicks.>"])
        async with tc.stream_consume("clicks", "billing"):
            pass
        with pytest.raises(E.NotFoundError):
            async with tc.stream_consume("nope", "billing"):
                pass
    assert auth_broker.terminate() == 0
    admin = [(x["user"], x["method"], x["target"], x["outcome"]) for x in audit_lines(auth_broker.data_dir)
             if x["event"] == "admin"]
    assert [a[1] for a in admin] == ["queue.declare", "dlq.list", "backup", "stream.declare", "group.join",
                                     "group.join"]
    assert admin[1] == ("alice", "dlq.list", "jobs", "ok")
    assert admin[2] == ("alice", "backup", "copy.db", "ok")
    assert admin[4] == ("alice", "group.join", "clicks/billing", "ok")
    assert admin[5] == ("alice", "group.join", "nope/billing", "NOT_FOUND")


async def test_a_weak_password_hash_is_upgraded_in_the_config_file_at_login(start_broker, tmp_path: Path) -> None:
    """alice's hash (n=1024) keeps working; her first login rewrites it in the
    config file at the current cost (n=2^17), the rest of the file unchanged,
    and the broker starts and logs her in from the rewritten file."""
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", **ALL),
                       settings={"password_upgrade": True})
    before = cfg.read_text()
    old = re.search(r'password = "(scrypt\$n=1024,[^"]+)"', before).group(1)
    b = start_broker("--config", str(cfg))
    assert "weaker than the current scrypt cost for 1 user(s) (alice)" in b.stderr()
    async with connect(b.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as tc:
        await tc.flush(timeout=WAIT)
    after = cfg.read_text()
    new = re.search(r'password = "(scrypt\$[^"]+)"', after).group(1)
    assert new.startswith("scrypt$n=131072,r=8,p=1$") and after == before.replace(old, new)
    assert b.terminate() == 0
    b2 = start_broker("--config", str(cfg))
    async with connect(b2.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as tc:
        assert tc.server_info["user"] == "alice"
    assert "weaker than" not in b2.stderr()
