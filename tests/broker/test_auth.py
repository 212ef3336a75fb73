"""Authentication: hashes, Users.authenticate, throttling, the security
config section and `tidings passwd`. scrypt runs at n=1024 here (fast);
one test checks the shipped default is the strong one."""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import anyio
import pytest

from tidings.broker.security import auth as A
from tidings.broker.security.auth import (
    AuthBusy, AuthFailed, AuthThrottled, SecurityConfigError, Throttle, UserSpec, Users, hash_password,
    load_security, token_hash, verify_password,
)
from tidings.broker.security.permissions import Permissions
from tidings.protocol.errors import ErrorCode

FAST = {"n": 1024, "r": 8, "p": 1}
PW_HASH = hash_password("s3cret", **FAST)  # alice's password, hashed once for the module
TOKEN = "tok-" + "x" * 40
OTHER_TOKEN = "tok-" + "y" * 40


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_users(clock: FakeClock | None = None, **kw: Any) -> Users:
    specs = [
        UserSpec("alice", PW_HASH, (token_hash(TOKEN),), Permissions({"publish": ["a.>"]}), 2),
        UserSpec("bot", None, (token_hash(OTHER_TOKEN),)),
    ]
    return Users(specs, clock=clock or FakeClock(), **kw)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (params, thread id) of every scrypt computation."""
    calls: list[tuple[str, int]] = []
    real = A._Scrypt.compute

    def compute(self: A._Scrypt, secret: bytes) -> bytes:
        calls.append((self.params, threading.get_ident()))
        return real(self, secret)

    monkeypatch.setattr(A._Scrypt, "compute", compute)
    return calls


# ------------------------------------------------------------------ hashes


def test_hash_roundtrip_and_format() -> None:
    h = hash_password("pässword", **FAST)
    assert h.startswith("scrypt$n=1024,r=8,p=1$")
    assert verify_password("pässword", h)
    assert not verify_password("password", h)
    assert hash_password("pässword", **FAST) != h  # fresh salt each time


def test_default_cost_is_strong() -> None:
    """OWASP's current guidance for scrypt: N=2^17, r=8, p=1 (it was 16384)."""
    h = hash_password("x")
    assert h.startswith(f"scrypt$n={A.SCRYPT_N},r=8,p=1$") and A.SCRYPT_N >= 2**17
    assert verify_password("x", h) and not A.needs_upgrade(h)
    assert A.needs_upgrade(hash_password("x", n=16384)) and A.needs_upgrade(PW_HASH)


async def test_a_weaker_hash_is_upgraded_at_login(caplog: pytest.LogCaptureFixture) -> None:
    """An old hash keeps working; at the first successful login it is replaced
    (through the upgrade callback, in a worker thread) by one at the current
    cost, and later logins use the new one. A failed upgrade keeps the old
    hash, logs a warning and is not retried on every login."""
    saved: list[tuple[str, str, int]] = []

    def upgrade(old: str, new: str) -> None:
        saved.append((old, new, threading.get_ident()))

    users = make_users(upgrade=upgrade)
    assert users.weak_hashes() == ["alice"]
    with pytest.raises(AuthFailed):
        await users.authenticate({"user": "alice", "password": "wrong"}, "10.0.0.1")
    assert saved == []  # only a successful login knows the password
    assert (await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.1")).name == "alice"
    [(old, new, tid)] = saved
    assert old == PW_HASH and new.startswith(f"scrypt$n={A.SCRYPT_N},r=8,p=1$") and tid != threading.get_ident()
    assert verify_password("s3cret", new) and users.weak_hashes() == []
    assert (await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.1")).name == "alice"
    assert len(saved) == 1

    def broken(old: str, new: str) -> None:
        raise PermissionError(13, "Permission denied")

    users = make_users(upgrade=broken)
    for _ in range(2):
        assert (await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.1")).name == "alice"
    assert users.weak_hashes() == ["alice"]
    assert len([r for r in caplog.records if "could not upgrade" in r.getMessage()]) == 1


def test_replace_in_file(tmp_path: Any) -> None:
    cfg = tmp_path / "tidings.toml"
    cfg.write_text(f'port = 1\n[users.alice]\npassword = "{PW_HASH}"\n')
    os.chmod(cfg, 0o640)
    link = tmp_path / "link.toml"
    link.symlink_to(cfg)
    A.replace_in_file(str(link), PW_HASH, "scrypt$new")
    assert link.is_symlink() and cfg.read_text() == 'port = 1\n[users.alice]\npassword = "scrypt$new"\n'
    assert cfg.stat().st_mode & 0o777 == 0o640
    with pytest.raises(ValueError):
        A.replace_in_file(str(cfg), PW_HASH, "x")  # no longer there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.toml", "tidings.toml"]


@pytest.mark.parametrize("encoded", [
    "", "scrypt", "bcrypt$n=1024,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
    "scrypt$n=1024,r=8,p=1$$", "scrypt$n=1000,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
    "scrypt$n=1048576,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",  # 1 GiB of memory
    "scrypt$r=8,n=1024,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
    "scrypt$n=1024,r=8,p=1$not*base64$AAAAAAAAAAAAAAAAAAAAAA==",
    "scrypt$n=1024,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==",  # salt too short
    PW_HASH + "$extra", PW_HASH.replace("scrypt", "SCRYPT"), None, 42, b"scrypt$",
])
def test_garbled_hashes_verify_false_and_never_raise(encoded: Any) -> None:
    assert verify_password("s3cret", encoded) is False
    assert not A.is_password_hash(encoded)


def test_verify_rejects_odd_passwords_without_raising() -> None:
    assert verify_password(None, PW_HASH) is False
    assert verify_password(b"s3cret", PW_HASH) is False
    assert verify_password("x" * (A.MAX_SECRET_BYTES + 1), PW_HASH) is False
    assert verify_password("\udcff", PW_HASH) is False  # lone surrogate: encodable, just wrong


def test_hash_password_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        hash_password("")
    with pytest.raises(ValueError):
        hash_password("x", n=1000)


def test_token_hash() -> None:
    h = token_hash("abc")
    assert h == "sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert A.is_token_hash(h) and not A.is_token_hash("sha256$abc") and not A.is_token_hash("abc")
    assert len(A.new_token()) >= 43 and A.new_token() != A.new_token()


# ------------------------------------------------------------ authenticate


async def test_password_and_token_login() -> None:
    users = make_users()
    u = await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.1")
    assert u.name == "alice" and u.max_connections == 2 and u.permissions.allows("publish", "a.b")
    assert (await users.authenticate({"token": TOKEN}, "10.0.0.1")).name == "alice"
    assert (await users.authenticate({"token": OTHER_TOKEN, "user": "bot"}, "10.0.0.1")).name == "bot"


@pytest.mark.parametrize("creds, reason", [
    ({"user": "alice", "password": "wrong"}, "bad_password"),
    ({"user": "nobody", "password": "s3cret"}, "unknown_user"),
    ({"user": "bot", "password": "s3cret"}, "no_password"),
    ({"token": "nope"}, "bad_token"),
    ({"token": TOKEN, "user": "bot"}, "token_user_mismatch"),
])
async def test_refusals_look_the_same_on_the_wire(creds: dict, reason: str) -> None:
    users = make_users()
    with pytest.raises(AuthFailed) as ei:
        await users.authenticate(creds, "10.0.0.1")
    assert ei.value.message == A.FAILED == "authentication failed"
    assert ei.value.code == ErrorCode.AUTH_FAILED
    assert ei.value.reason == reason  # for the audit log only
    assert "s3cret" not in str(ei.value) and TOKEN not in str(ei.value)


@pytest.mark.parametrize("creds", [
    None, [], "alice", {"user": "alice"}, {"password": "s3cret"}, {"user": 1, "password": "s3cret"},
    {"user": "alice", "password": b"s3cret"}, {"user": "alice", "password": "s3cret", "extra": 1},
    {"token": TOKEN, "password": "s3cret"}, {"token": ""}, {"token": 5},
])
async def test_malformed_auth_is_refused(creds: Any) -> None:
    with pytest.raises(AuthFailed) as ei:
        await make_users().authenticate(creds, "10.0.0.1")
    assert ei.value.reason in ("missing", "malformed")


async def test_unknown_user_costs_one_hash_with_real_parameters(scrypt_calls: list) -> None:
    users = make_users()
    for name in ("alice", "nobody", "bot"):
        with pytest.raises(AuthFailed):
            await users.authenticate({"user": name, "password": "guess"}, "10.0.0.1")
    assert [params for params, _ in scrypt_calls] == ["n=1024,r=8,p=1"] * 3
    assert all(tid != threading.get_ident() for _, tid in scrypt_calls)  # off the event loop thread


async def test_hashing_concurrency_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    lock = threading.Lock()
    active = [0, 0]  # now, max
    two_running = anyio.Event()

    def compute(self: A._Scrypt, secret: bytes) -> bytes:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
            if active[0] == 2:
                anyio.from_thread.run_sync(two_running.set)
        release.wait(10)
        with lock:
            active[0] -= 1
        return b"\0" * len(self.digest)

    monkeypatch.setattr(A._Scrypt, "compute", compute)
    users = make_users(hash_concurrency=2)
    results: list[str] = []

    async def login(i: int) -> None:
        try:
            await users.authenticate({"user": "alice", "password": f"p{i}"}, f"10.0.0.{i}")
        except AuthFailed:
            results.append("failed")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(login, i)
            await two_running.wait()
            while users._limiter.statistics().tasks_waiting < 3:
                await anyio.sleep(0)  # yield until the other three reach the limiter
            assert active == [2, 2]
            release.set()
    assert results == ["failed"] * 5 and active[1] == 2


async def test_hash_backlog_refuses_with_retriable_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    entered = anyio.Event()

    def compute(self: A._Scrypt, secret: bytes) -> bytes:
        anyio.from_thread.run_sync(entered.set)
        release.wait(10)
        return b"\0" * len(self.digest)

    monkeypatch.setattr(A._Scrypt, "compute", compute)
    users = make_users(hash_backlog=1)
    with anyio.fail_after(10):
        async def first() -> None:
            with pytest.raises(AuthFailed):
                await users.authenticate({"user": "alice", "password": "x"}, "10.0.0.1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await entered.wait()
            with pytest.raises(AuthBusy) as ei:
                await users.authenticate({"user": "alice", "password": "y"}, "10.0.0.2")
            assert ei.value.code == ErrorCode.OVERLOADED
            # token logins need no hashing thread and still work
            assert (await users.authenticate({"token": TOKEN}, "10.0.0.2")).name == "alice"
            release.set()
    assert users.throttle.blocked_for("10.0.0.2") == 0 and len(users.throttle) == 1  # busy is not a failure


# -------------------------------------------------------------- throttling


async def test_throttling_blocks_then_backs_off_longer(scrypt_calls: list) -> None:
    clock = FakeClock()
    users = make_users(clock)
    bad = {"user": "alice", "password": "wrong"}
    good = {"user": "alice", "password": "s3cret"}
    for _ in range(5):
        with pytest.raises(AuthFailed):
            await users.authenticate(bad, "10.0.0.9")
    hashed = len(scrypt_calls)
    with pytest.raises(AuthThrottled) as ei:
        await users.authenticate(good, "10.0.0.9")  # even the right password is refused now
    assert ei.value.message == "too many failed attempts; retry later"
    assert ei.value.code == ErrorCode.AUTH_FAILED and ei.value.retry_after == 10.0
    assert len(scrypt_calls) == hashed  # a blocked peer costs no hashing
    assert (await users.authenticate(good, "10.0.0.10")).name == "alice"  # other peers are unaffected
    clock.now += 10.0
    assert (await users.authenticate(good, "10.0.0.9")).name == "alice"
    for _ in range(5):
        with pytest.raises(AuthFailed):
            await users.authenticate(bad, "10.0.0.9")
    with pytest.raises(AuthThrottled) as ei:
        await users.authenticate(good, "10.0.0.9")
    assert ei.value.retry_after == 20.0  # the second block is twice as long


async def test_concurrent_guesses_are_counted_when_they_start(scrypt_calls: list) -> None:
    """64 wrong guesses at once from one address: only max_failures (5) are
    checked, the block starts, and the other 59 are refused unchecked. (They
    were all checked before: failures were counted only as checks ended.)"""
    users = make_users(FakeClock())
    outcomes: list[str] = []

    async def guess(i: int) -> None:
        try:
            await users.authenticate({"user": "alice", "password": f"guess-{i}"}, "10.0.0.66")
        except AuthThrottled:
            outcomes.append("throttled")
        except AuthFailed:
            outcomes.append("failed")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(guess, i)
    assert outcomes.count("failed") == 5 and outcomes.count("throttled") == 59
    assert len(scrypt_calls) == 5
    assert users._attempts == {} and users._attempt_ended == {} and users._waiting == 0


async def test_a_burst_of_good_logins_from_one_address_all_succeed(scrypt_calls: list) -> None:
    """Counting attempts as they start must not block a connection pool that
    logs in all at once: the extra logins wait their turn, none is refused."""
    users = make_users(FakeClock())
    names: list[str] = []

    async def login() -> None:
        names.append((await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.7")).name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(login)
    assert names == ["alice"] * 20 and users.throttle.blocked_for("10.0.0.7") == 0


def test_throttle_window_and_cap() -> None:
    clock = FakeClock()
    t = Throttle(max_failures=3, window=60, backoff=5, max_backoff=12, clock=clock)
    for _ in range(2):
        t.failure("p")
    clock.now += 61  # those two left the window
    t.failure("p")
    assert t.blocked_for("p") == 0
    t.failure("p")
    t.failure("p")
    assert t.blocked_for("p") == 5
    for expected in (10, 12, 12):  # doubles, capped at max_backoff
        clock.now += 20
        for _ in range(3):
            t.failure("p")
        assert t.blocked_for("p") == expected
    clock.now += 12 + 60 + 1  # quiet for max_backoff + window: forgotten
    assert t.blocked_for("p") == 0 and len(t) == 0


def test_throttle_memory_is_bounded() -> None:
    t = Throttle(max_tracked=3, clock=FakeClock())
    for ip in ("1.1.1.1", "2.2.2.2", "3.3.3.3", "1.1.1.1", "4.4.4.4"):
        t.failure(ip)
    assert len(t) == 3
    assert set(t._peers) == {"1.1.1.1", "3.3.3.3", "4.4.4.4"}  # 2.2.2.2 failed least recently


@pytest.mark.parametrize("ip, key", [
    ("10.1.2.3", "10.1.2.3"),
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:1", "2001:db8::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("not-an-ip", "not-an-ip"),
])
def test_peer_key(ip: str, key: str) -> None:
    assert A.peer_key(ip) == key


# ----------------------------------------------------------- connections


def test_per_user_connection_cap() -> None:
    users = make_users()
    alice = users.get("alice")
    bot = users.get("bot")
    assert alice is not None and bot is not None
    assert users.try_acquire(alice) and users.try_acquire(alice)
    assert not users.try_acquire(alice)  # max_connections = 2
    users.release(alice)
    assert users.try_acquire(alice)
    assert all(users.try_acquire(bot) for _ in range(50))  # no cap
    assert users.open_connections("alice") == 2
    users.release(alice)
    users.release(alice)
    assert users.open_connections("alice") == 0 and "alice" not in users._open


def test_anonymous_and_auth_method() -> None:
    assert A.ANONYMOUS.permissions.allows("admin", ">")
    assert A.auth_method({"token": "x"}) == "token"
    assert A.auth_method({"user": "u", "password": "p"}) == "password"
    assert A.auth_method(None) == "none"


# ------------------------------------------------------------------ config


def test_load_security_full(certs: Any) -> None:
    doc = {
        "port": 1, "auth": True,
        "users": {
            "alice": {"password": PW_HASH, "tokens": [token_hash(TOKEN)], "max_connections": 3,
                      "permissions": {"publish": ["orders.>"], "publish_deny": ["orders.x"], "admin": [">"]}},
            "svc": {"tokens": [token_hash(OTHER_TOKEN)]},
        },
        "tls": {"cert": "server.pem", "key": "server.key", "client_ca": str(certs.ca),
                "require_client_cert": True},
    }
    rest, sec_part = A.split_security(doc)
    assert rest == {"port": 1} and set(sec_part) == {"auth", "users", "tls"}
    sec = load_security(sec_part, base_dir=str(certs.dir))
    assert sec.auth_enabled and set(sec.users) == {"alice", "svc"}
    assert sec.users["alice"].max_connections == 3
    assert not sec.users["svc"].permissions.allows("publish", "a")  # no table: nothing allowed
    assert sec.tls is not None and sec.tls.cert == str(certs.server) and sec.tls.require_client_cert
    users = sec.build_users(clock=FakeClock())
    assert users is not None and len(users) == 2


async def test_security_users_log_in() -> None:
    sec = load_security({"users": {"alice": {"password": PW_HASH, "permissions": {"subscribe": [">"]}}}})
    users = sec.build_users()
    assert users is not None
    u = await users.authenticate({"user": "alice", "password": "s3cret"}, "127.0.0.1")
    assert u.permissions.allows("subscribe", "x.>")


def test_no_users_mode() -> None:
    assert not load_security({}).auth_enabled
    assert not load_security({"auth": False}).auth_enabled
    assert load_security({}).build_users() is None


def _bad_cases(certs: Any) -> list[tuple[dict, str]]:
    ok = {"password": PW_HASH}
    garbage = certs.dir / "garbage.pem"
    garbage.write_text("not a certificate\n")
    tls_ok = {"cert": str(certs.server), "key": str(certs.server_key), "client_ca": str(certs.ca)}
    return [
        ({"user": {}}, "unknown security setting"),
        ({"auth": "yes"}, "auth must be true or false"),
        ({"auth": True}, "no users are configured"),
        ({"users": {}}, "no users are configured"),
        ({"auth": False, "users": {"a": ok}}, "auth = false but"),
        ({"users": []}, "users must be a table"),
        ({"users": {"bad name": ok}}, "invalid user name"),
        ({"users": {"a": "pw"}}, "users.a must be a table"),
        ({"users": {"a": {**ok, "pasword": "x"}}}, "unknown setting(s) in [users.a]: pasword"),
        ({"users": {"a": {}}}, "neither a password nor a token"),
        ({"users": {"a": {"tokens": []}}}, "neither a password nor a token"),
        ({"users": {"a": {"password": "hunter2"}}}, "users.a.password is not a password hash"),
        ({"users": {"a": {"tokens": ["plain-token"]}}}, r"users.a.tokens[0] is not a token hash"),
        ({"users": {"a": {"tokens": "sha256$x"}}}, "must be a list of token hashes"),
        ({"users": {"a": {"tokens": [token_hash("t")]}, "b": {"tokens": [token_hash("t")]}}},
         "also configured for user 'a'"),
        ({"users": {"a": {"tokens": [token_hash("t"), token_hash("t")]}}}, "repeats an earlier token"),
        ({"users": {"a": {**ok, "max_connections": 0}}}, "max_connections must be a positive integer"),
        ({"users": {"a": {**ok, "max_connections": True}}}, "max_connections must be a positive integer"),
        ({"users": {"a": {**ok, "permissions": {"pubish": ["x"]}}}},
         "users.a.permissions: unknown permission"),
        ({"users": {"a": {**ok, "permissions": {"publish": ["a.>.b"]}}}}, "invalid pattern"),
        ({"users": {"a": {**ok, "permissions": ["publish"]}}}, "permissions must be a table"),
        ({"tls": {"key": str(certs.server_key)}}, "tls.key is set but tls.cert is not"),
        ({"tls": {}}, "[tls] needs cert"),
        ({"tls": {"cert": str(certs.server), "ciphers": "x"}}, "unknown setting(s) in [tls]: ciphers"),
        ({"tls": {"cert": str(certs.dir / "missing.pem"), "key": str(certs.server_key)}},
         "tls.cert: cannot read"),
        ({"tls": {"cert": str(certs.server), "key": str(certs.dir)}}, "tls.key: cannot read"),
        ({"tls": {"cert": str(certs.server), "key": str(certs.server_key), "require_client_cert": True}},
         "needs tls.client_ca"),
        ({"tls": {"cert": str(certs.server), "key": str(certs.server_key), "require_client_cert": 1}},
         "require_client_cert must be true or false"),
        ({"tls": {"cert": str(garbage), "key": str(certs.server_key)}}, "tls: cannot load"),
        ({"tls": {"cert": str(certs.server), "key": str(certs.client_key)}}, "tls: cannot load"),  # mismatch
        ({"tls": {"cert": str(certs.server)}}, "tls: cannot load"),  # no key anywhere
        ({"tls": {**tls_ok, "client_cert_user": "subject"}}, "client_cert_user must be one of cn, san:dns"),
        ({"tls": {"cert": str(certs.server), "key": str(certs.server_key), "client_cert_user": "cn"}},
         "client_cert_user needs tls.client_ca"),
        ({"tls": {**tls_ok, "client_cert_user": "cn"}}, "no users are configured"),
        ({"users": {"a": {}}, "tls": tls_ok}, "neither a password nor a token"),
    ]


def test_load_security_fails_closed(certs: Any) -> None:
    for data, fragment in _bad_cases(certs):
        with pytest.raises(SecurityConfigError) as ei:
            load_security(data)
        assert fragment in str(ei.value), (data, str(ei.value))
        assert "hunter2" not in str(ei.value)  # a pasted plaintext password is never echoed


def test_tls_cert_holding_its_key(certs: Any, tmp_path: Any) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(certs.server.read_bytes() + certs.server_key.read_bytes())
    sec = load_security({"tls": {"cert": str(both)}})
    assert sec.tls is not None and sec.tls.key is None and not sec.auth_enabled


# ------------------------------------------------------- client certificates

CERT = {  # getpeercert() form
    "subject": ((("organizationName", "Example"),), (("commonName", "alice"),)),
    "subjectAltName": (("DNS", "alice.clients.example"), ("email", "bot"), ("email", "bot"),
                       ("URI", "spiffe://example/alice")),
}


def test_cert_names() -> None:
    from tidings.broker.security.tls import cert_names
    assert cert_names(CERT, "cn") == ("alice",)
    assert cert_names(CERT, "san:dns") == ("alice.clients.example",)
    assert cert_names(CERT, "san:email") == ("bot",)
    assert cert_names(CERT, "san:uri") == ("spiffe://example/alice",)
    assert cert_names(None, "cn") == () and cert_names({}, "san:dns") == ()
    assert cert_names({"subject": ((("commonName", "a"),), (("commonName", "b"),))}, "cn") == ("a", "b")


async def test_a_certificate_naming_a_user_logs_in_as_it() -> None:
    users = make_users()
    assert (await users.authenticate(None, "10.0.0.1", ("alice",))).name == "alice"  # no password needed
    assert (await users.authenticate({}, "10.0.0.1", ("nobody", "bot"))).name == "bot"  # unknown names skipped
    # credentials too: checked, and they must be the certificate's user
    ok = await users.authenticate({"user": "alice", "password": "s3cret"}, "10.0.0.1", ("alice",))
    assert ok.name == "alice"
    for creds, reason in (({"token": OTHER_TOKEN}, "cert_user_mismatch"),
                          ({"user": "alice", "password": "wrong"}, "bad_password")):
        with pytest.raises(AuthFailed) as ei:
            await users.authenticate(creds, "10.0.0.2", ("alice",))
        assert ei.value.reason == reason and ei.value.message == A.FAILED
    with pytest.raises(AuthFailed) as ei:  # names two users: which one?
        await users.authenticate(None, "10.0.0.1", ("alice", "bot"))
    assert ei.value.reason == "cert_ambiguous"
    with pytest.raises(AuthFailed) as ei:  # names no user: the certificate only authenticated the connection
        await users.authenticate(None, "10.0.0.1", ("mallory",))
    assert ei.value.reason == "missing"
    assert (await users.authenticate({"token": OTHER_TOKEN}, "10.0.0.1", ("mallory",))).name == "bot"


def test_certificate_only_users(certs: Any) -> None:
    tls_cfg = {"cert": str(certs.server), "key": str(certs.server_key), "client_ca": str(certs.ca),
               "client_cert_user": "san:email"}
    sec = load_security({"users": {"alice@example.test": {"permissions": {"publish": ["a"]}}}, "tls": tls_cfg})
    assert sec.tls is not None and sec.tls.client_cert_user == "san:email"
    assert sec.users["alice@example.test"].password_hash is None


# ---------------------------------------------------------- tidings passwd


def test_passwd_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\r\nignored\n"))
    assert A.passwd_main(["--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    assert A.is_password_hash(line) and verify_password("correct horse", line)


def test_passwd_refuses_empty(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert A.passwd_main(["--stdin"]) == 1
    assert capsys.readouterr().out == ""


def test_passwd_prompt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr(A.getpass, "getpass", lambda prompt="": next(answers))
    assert A.passwd_main([]) == 1  # the two entries differ
    assert "differ" in capsys.readouterr().err
    answers = iter(["same", "same"])
    monkeypatch.setattr(A, "hash_password", lambda pw: hash_password(pw, **FAST))
    assert A.passwd_main([]) == 0
    assert verify_password("same", capsys.readouterr().out.strip())


def test_passwd_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert A.passwd_main(["--token"]) == 0
    token, digest = capsys.readouterr().out.split()
    assert digest == token_hash(token) and len(token) >= 43
    sec = load_security({"users": {"svc": {"tokens": [digest]}}})
    assert sec.users["svc"].token_hashes == (digest,)


def test_config_files_are_not_created(tmp_path: Any) -> None:
    before = set(os.listdir(tmp_path))
    load_security({"users": {"a": {"password": PW_HASH}}}, base_dir=str(tmp_path))
    assert set(os.listdir(tmp_path)) == before
