"""Authentication: password and token hashes, users, failure throttling,
the security section of the config file, and ``tidings passwd``.

Config shape (TOML; the sections below are read by :func:`load_security`,
everything else by broker/config.py; :func:`split_security` separates them)::

    auth = true                      # optional: a [users] table already turns auth on;
                                     # "auth = true" without users is an error, and so is
                                     # "auth = false" with users (ambiguous: we fail closed)
    password_upgrade = true          # default: rewrite weaker password hashes in this file at login

    [users.alice]
    password = "scrypt$n=131072,r=8,p=1$<salt b64>$<hash b64>"   # from `tidings passwd`
    tokens = ["sha256$<64 hex>"]      # from `tidings passwd --token`; password and/or tokens
    max_connections = 10              # optional per-user cap (the global max_connections still applies)

    [users.alice.permissions]         # optional; missing = nothing is allowed
    publish = ["orders.>"]            # allow lists: <action> = [patterns]
    publish_deny = ["orders.internal.>"]
    subscribe = ["orders.>", "_INBOX.alice.>"]
    subscribe_deny = []
    consume = ["orders-eu", "jobs.*"] # queue/stream names, same pattern rules
    admin = []                        # declare/delete/purge/redrive/...; [">"] for stats and lists

    [tls]
    cert = "server.pem"               # relative paths are relative to the config file
    key = "server.key"                # may be omitted if cert holds the key too
    client_ca = "clients-ca.pem"      # optional: verify client certificates against it
    require_client_cert = false       # true: refuse clients without a certificate (needs client_ca)
    client_cert_user = "cn"           # optional: log a verified certificate in as the user it names:
                                      # "cn", "san:dns", "san:email" or "san:uri" (needs client_ca, users)

Password hashes: scrypt at :data:`SCRYPT_N`, :data:`SCRYPT_R`, :data:`SCRYPT_P`
(OWASP's current guidance, 128 MiB and a few hundred ms per hash). Hashes made
with weaker parameters keep working; on such a user's next successful
password login the broker re-hashes the password at the current parameters
and replaces the old hash in the config file it was started with (the exact
hash string, in place: written to a temporary file and renamed), unless
``password_upgrade = false`` or the file cannot be rewritten (then it logs a
warning and keeps the old hash). Verifications run in worker threads, at most
:data:`HASH_CONCURRENCY` at once (memory: 128 MiB each).

Client certificates (``client_cert_user`` set): a verified certificate
whose names (of that field) include exactly one configured user logs the
client in as that user, without a password. If the HELLO carries
credentials as well, they are checked as usual and must be that same
user's (else AUTH_FAILED, reason ``cert_user_mismatch``): a certificate
binds the connection to its user. Names of two configured users is
AUTH_FAILED (``cert_ambiguous``). A certificate that names no configured
user only authenticated the connection: the HELLO needs credentials as
without one. Without ``client_cert_user`` certificates never name a user.

Actions, names and the allow/deny rule are defined in broker/security/permissions.py.
With no users the broker runs in no-users mode: every connection is
:data:`ANONYMOUS` with :data:`permissions.ALLOW_ALL`.

Wire: HELLO's ``auth`` map is ``{"user": str, "password": str}`` or
``{"token": str}`` (optionally with ``"user"``, which must then name the
token's owner). Every refusal is AUTH_FAILED and the same message for an
unknown user, a wrong password and a wrong token; the reason is kept for
the audit log only (:attr:`AuthFailed.reason`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import getpass
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Final, Iterable, Mapping, Sequence

import anyio

from tidings.protocol.errors import ErrorCode

from tidings.broker.security import permissions as perms
from tidings.broker.security import tls
from tidings.broker.security.permissions import Permissions

log = logging.getLogger(__name__)

# scrypt cost: OWASP Password Storage Cheat Sheet (2023+): N=2^17, r=8, p=1, i.e. 128 MiB of memory and
# ~0.3 s per hash on the 2-core reference machine. Older hashes (n=16384) are upgraded at login.
SCRYPT_N: Final = 2**17
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MAX_SCRYPT_MEMORY: Final = 128 * 1024 * 1024  # 128*n*r of the current cost; refuse hash strings needing more
SCRYPT_SLACK: Final = 4 * 1024 * 1024  # OpenSSL needs a little over 128*n*r (plus 128*r*p: at most 2 MiB)
MAX_SECRET_BYTES: Final = 1024  # longer passwords/tokens are refused before any hashing
# Threads hashing at once: a login flood can take neither every core nor more than 2 x 128 MiB of memory.
HASH_CONCURRENCY: Final = 2
HASH_BACKLOG: Final = 64  # logins waiting for a hashing thread; beyond it HELLO is refused (retriable)

USER_NAME: Final = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
_TOKEN_HASH: Final = re.compile(r"sha256\$[0-9a-f]{64}")
_SCRYPT_PARAMS: Final = re.compile(r"n=([0-9]{1,8}),r=([0-9]{1,3}),p=([0-9]{1,3})")

FAILED: Final = "authentication failed"
THROTTLED: Final = "too many failed attempts; retry later"


# ------------------------------------------------------------------ errors


class SecurityConfigError(Exception):
    """The users/permissions/TLS settings are invalid; the broker must not start."""


class AuthError(Exception):
    """A HELLO's credentials were not accepted. ``code`` and ``message`` go on the wire."""

    code: ErrorCode = ErrorCode.AUTH_FAILED

    def __init__(self, message: str, reason: str, user: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason  # for the audit log only, never sent to the client
        self.user = user  # the name the client claimed, if any (audit only)


class AuthFailed(AuthError):
    """Unknown user, wrong password or token, missing or malformed credentials."""


class AuthThrottled(AuthFailed):
    """The peer failed too often recently; refused without checking credentials."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(THROTTLED, "throttled")
        self.retry_after = retry_after


class AuthBusy(AuthError):
    """Too many logins are already waiting for a hashing thread (retriable)."""

    code = ErrorCode.OVERLOADED


# ----------------------------------------------------------------- hashing


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @property
    def params(self) -> str:
        return f"n={self.n},r={self.r},p={self.p}"

    def compute(self, secret: bytes) -> bytes:
        return hashlib.scrypt(secret, salt=self.salt, n=self.n, r=self.r, p=self.p,
                              maxmem=MAX_SCRYPT_MEMORY + SCRYPT_SLACK, dklen=len(self.digest))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _params_ok(n: int, r: int, p: int) -> bool:
    # n a power of two > 1 (scrypt's rule); the memory bound keeps a garbled string from costing gigabytes
    return n >= 2 and not n & (n - 1) and 1 <= r <= 64 and 1 <= p <= 16 and 128 * n * r <= MAX_SCRYPT_MEMORY


def _parse_hash(encoded: object) -> _Scrypt | None:
    """Parse ``scrypt$n=..,r=..,p=..$salt$hash``; None if garbled or out of bounds."""
    if type(encoded) is not str or len(encoded) > 512:
        return None
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        return None
    m = _SCRYPT_PARAMS.fullmatch(parts[1])
    if m is None:
        return None
    n, r, p = (int(x) for x in m.groups())
    if not _params_ok(n, r, p):
        return None
    try:
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        return None
    return _Scrypt(n, r, p, salt, digest)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return a self-describing scrypt hash of ``password`` (UTF-8, not normalised).

    Raises ValueError for an empty or over-long password or bad parameters.
    Lower ``n`` only in tests; the default is the strength we ship.
    """
    secret = password.encode("utf-8")
    if not secret or len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a password must be 1..{MAX_SECRET_BYTES} bytes")
    if not _params_ok(n, r, p):
        raise ValueError(f"unsupported scrypt parameters n={n},r={r},p={p}")
    spec = _Scrypt(n, r, p, os.urandom(SALT_BYTES), b"\0" * HASH_BYTES)
    return f"scrypt${spec.params}${_b64(spec.salt)}${_b64(spec.compute(secret))}"


def needs_upgrade(encoded: object) -> bool:
    """True if ``encoded`` is a valid hash made with less memory or work than the current parameters."""
    spec = _parse_hash(encoded)
    return spec is not None and (spec.n * spec.r < SCRYPT_N * SCRYPT_R or spec.n * spec.r * spec.p
                                 < SCRYPT_N * SCRYPT_R * SCRYPT_P)


def replace_in_file(path: str, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` in the text file ``path`` with
    ``new``, atomically (a temporary file beside it, same mode, fsynced,
    renamed over it; a symlink's target is the file rewritten). Raises
    ValueError unless ``old`` occurs exactly once, OSError if the file or its
    directory cannot be written."""
    real = os.path.realpath(path)
    with open(real, encoding="utf-8") as fh:
        text = fh.read()
        mode = os.fstat(fh.fileno()).st_mode & 0o7777
    if text.count(old) != 1:
        raise ValueError(f"the old hash is not in {real} exactly once (edited since start-up?)")
    tmp = f"{real}.tidings-{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text.replace(old, new))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_password_hash(encoded: object) -> bool:
    """True if ``encoded`` is a well-formed hash this module can verify."""
    return _parse_hash(encoded) is not None


def verify_password(password: object, encoded: object) -> bool:
    """True iff ``password`` hashes to ``encoded``. Never raises: a garbled
    hash, a non-string or an over-long password is simply False. Blocking
    (tens of ms): from the event loop use :func:`verify_async`."""
    spec = _parse_hash(encoded)
    if spec is None or type(password) is not str:
        return False
    secret = password.encode("utf-8", "surrogatepass")
    if len(secret) > MAX_SECRET_BYTES:
        return False
    try:
        return hmac.compare_digest(spec.compute(secret), spec.digest)
    except (ValueError, MemoryError):
        return False


async def verify_async(password: object, encoded: object, limiter: anyio.CapacityLimiter) -> bool:
    """:func:`verify_password` in a worker thread, at most ``limiter`` at once.

    Cancellation waits for a running hash to finish (tens of ms) rather than
    abandoning the thread, so the limiter really bounds the CPU spent.
    """
    return await anyio.to_thread.run_sync(verify_password, password, encoded, limiter=limiter)


def _dummy_hash(params: str) -> str:
    """A hash no password matches (random digest), for timing-equal refusals."""
    return f"scrypt${params}${_b64(os.urandom(SALT_BYTES))}${_b64(os.urandom(HASH_BYTES))}"


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """``sha256$<hex>`` of a token. A fast hash suffices because tokens are
    random 256-bit values (:func:`new_token`), not guessable passwords."""
    return "sha256$" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def is_token_hash(value: object) -> bool:
    return type(value) is str and _TOKEN_HASH.fullmatch(value) is not None


# --------------------------------------------------------------- throttling


def peer_key(ip: str) -> str:
    """The throttling key of a peer address: the IPv4 address, or the /64 of
    an IPv6 address (one host usually owns a whole /64). Unparsable: as is."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Record:
    __slots__ = ("failures", "blocked_until", "strikes", "last_failure")

    def __init__(self) -> None:
        self.failures: list[float] = []
        self.blocked_until = 0.0
        self.strikes = 0
        self.last_failure = 0.0


class Throttle:
    """Refuses peers that failed ``max_failures`` times within ``window``
    seconds, for ``backoff`` seconds, doubling per block up to ``max_backoff``.

    This class counts finished attempts; :meth:`Users.authenticate` also
    bounds the attempts of one peer *running* at once to :meth:`remaining`,
    so concurrent guesses cannot all be checked before the block begins.

    A success does not reset anything (else one valid account would let an
    attacker reset the count between guesses at another); failures simply
    leave the window, and a peer quiet for ``max_backoff + window`` is
    forgotten. At most ``max_tracked`` peers are tracked; the one whose last
    failure is oldest is evicted first. Not thread-safe: the loop owns it.
    """

    def __init__(self, *, max_failures: int = 5, window: float = 60.0, backoff: float = 10.0,
                 max_backoff: float = 900.0, max_tracked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_tracked = max_tracked
        self.clock = clock
        self._peers: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def blocked_for(self, key: str) -> float:
        """Seconds ``key`` stays refused (0.0: it may try now)."""
        rec = self._peers.get(key)
        if rec is None:
            return 0.0
        now = self.clock()
        if now - rec.last_failure > self.max_backoff + self.window:
            del self._peers[key]
            return 0.0
        return max(0.0, rec.blocked_until - now)

    def remaining(self, key: str) -> int:
        """Failures ``key`` may still have in the current window before a block starts."""
        rec = self._peers.get(key)
        if rec is None:
            return self.max_failures
        cutoff = self.clock() - self.window
        return self.max_failures - sum(1 for t in rec.failures if t > cutoff)

    def failure(self, key: str) -> None:
        """Count a failed attempt by ``key``; may start a block."""
        now = self.clock()
        rec = self._peers.get(key)
        if rec is None:
            while len(self._peers) >= self.max_tracked:
                self._peers.popitem(last=False)
            rec = self._peers[key] = _Record()
        else:
            self._peers.move_to_end(key)
        rec.last_failure = now
        cutoff = now - self.window
        rec.failures = [t for t in rec.failures if t > cutoff]
        rec.failures.append(now)
        if len(rec.failures) >= self.max_failures:
            rec.strikes += 1
            rec.blocked_until = now + min(self.max_backoff, self.backoff * 2 ** min(rec.strikes - 1, 30))
            rec.failures.clear()


# -------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated identity, as the connection actor keeps it (no secrets)."""

    name: str
    permissions: Permissions
    max_connections: int | None = None


ANONYMOUS: Final = User("", perms.ALLOW_ALL)  # every connection in no-users mode


@dataclass(frozen=True, slots=True)
class UserSpec:
    """One configured user: hashes only, never a plaintext secret."""

    name: str
    password_hash: str | None = None
    token_hashes: tuple[str, ...] = ()
    permissions: Permissions = field(default_factory=Permissions)
    max_connections: int | None = None


class Users:
    """The configured users, the failure throttle and per-user connection counts.

    Owned by the broker (event loop thread). :meth:`authenticate` is the
    whole HELLO check; :meth:`try_acquire`/:meth:`release` count open
    connections against ``max_connections``.
    """

    def __init__(self, specs: Iterable[UserSpec], *, throttle: Throttle | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 hash_concurrency: int = HASH_CONCURRENCY, hash_backlog: int = HASH_BACKLOG,
                 upgrade: Callable[[str, str], None] | None = None) -> None:
        """``upgrade(old_hash, new_hash)``: persist an upgraded password hash
        (blocking, called in a worker thread; raises OSError or ValueError if
        it cannot). None: weaker hashes are used as they are."""
        self._specs: dict[str, UserSpec] = {}
        self._users: dict[str, User] = {}
        self._tokens: list[tuple[str, str]] = []  # (token hash, user name)
        for s in specs:
            self._specs[s.name] = s
            self._users[s.name] = User(s.name, s.permissions, s.max_connections)
            self._tokens.extend((h, s.name) for h in s.token_hashes)
        # Unknown users are checked against a hash with the most common
        # parameters, so they cost what a real user costs.
        common = Counter(p.params for p in (_parse_hash(s.password_hash) for s in self._specs.values()) if p)
        params = common.most_common(1)[0][0] if common else f"n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
        self._dummy = _dummy_hash(params)
        self.throttle = throttle if throttle is not None else Throttle(clock=clock)
        self._limiter = anyio.CapacityLimiter(hash_concurrency)
        self._backlog = hash_backlog
        self._hashing = 0
        self._attempts: dict[str, int] = {}  # peer key -> its logins being checked now
        self._attempt_ended: dict[str, anyio.Event] = {}  # peer key -> set when one of them ends
        self._waiting = 0  # logins waiting for their peer's turn (bounded by hash_backlog too)
        self._open: dict[str, int] = {}
        self._upgrade = upgrade
        self._upgrade_skip: set[str] = set()  # users being upgraded now, or whose upgrade failed

    @classmethod
    def from_config(cls, table: Mapping[str, Any], **kw: Any) -> Users:
        """Build from a ``[users]`` table; raises SecurityConfigError."""
        return cls(_parse_users(table).values(), **kw)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    async def authenticate(self, auth: Any, peer_ip: str, cert_names: Sequence[str] = ()) -> User:
        """Check a HELLO's ``auth`` map from ``peer_ip``; return the User.

        ``cert_names``: the names a verified client certificate gives (empty
        without one, or without ``client_cert_user``); see the module doc.
        Raises AuthThrottled (peer blocked: credentials not even looked at),
        AuthFailed (every other refusal; counted against the peer) or
        AuthBusy (too many logins hashing already; not counted, retriable).
        """
        cert_users = [n for n in cert_names if n in self._specs]
        if len(cert_users) > 1:
            raise AuthFailed(FAILED, "cert_ambiguous", cert_users[0][:64])
        if cert_users and (auth is None or auth == {}):
            return self._users[cert_users[0]]  # a CA-verified certificate: nothing to guess, nothing to throttle
        user = await self._authenticate(auth, peer_ip)
        if cert_users and user.name != cert_users[0]:
            self.throttle.failure(peer_key(peer_ip))  # counted like a wrong password: no oracle for guesses
            raise AuthFailed(FAILED, "cert_user_mismatch", user.name)
        return user

    async def _authenticate(self, auth: Any, peer_ip: str) -> User:
        key = peer_key(peer_ip)
        await self._start_attempt(key)
        try:
            return await self._check(auth)
        except AuthFailed:
            self.throttle.failure(key)
            raise
        finally:
            self._end_attempt(key)

    async def _start_attempt(self, key: str) -> None:
        """Wait until ``key`` may run one more check: attempts are counted when
        they start, so at most ``throttle.remaining(key)`` of a peer's attempts
        run at once (all of them could fail). The rest wait for one to end,
        then see the block it may have started. A burst of *good* logins (a
        pool connecting at start-up) just runs a few at a time."""
        throttle = self.throttle
        while True:
            wait = throttle.blocked_for(key)
            if wait > 0:
                raise AuthThrottled(wait)
            running = self._attempts.get(key, 0)
            if running < max(1, throttle.remaining(key)):
                self._attempts[key] = running + 1
                return
            if self._waiting >= self._backlog:
                raise AuthBusy("server busy authenticating; retry later", "busy")
            ended = self._attempt_ended.get(key)
            if ended is None:
                ended = self._attempt_ended[key] = anyio.Event()
            self._waiting += 1
            try:
                await ended.wait()
            finally:
                self._waiting -= 1

    def _end_attempt(self, key: str) -> None:
        n = self._attempts.pop(key) - 1
        if n:
            self._attempts[key] = n
        ended = self._attempt_ended.pop(key, None)
        if ended is not None:
            ended.set()

    async def _check(self, auth: Any) -> User:
        if auth is None:
            raise AuthFailed("authentication required: HELLO must carry {user, password} or {token}",
                             "missing")
        if not isinstance(auth, Mapping) or not set(auth) <= {"user", "password", "token"}:
            raise AuthFailed("malformed auth: expected {user, password} or {token}", "malformed")
        name = auth.get("user")
        if name is not None and (type(name) is not str or len(name) > 256):
            raise AuthFailed("malformed auth: user must be a string", "malformed")
        claimed = name[:64] if name else None
        if "token" in auth:
            if "password" in auth:
                raise AuthFailed("malformed auth: expected {user, password} or {token}", "malformed", claimed)
            return self._check_token(auth["token"], name, claimed)
        if name is None or "password" not in auth:
            raise AuthFailed("malformed auth: expected {user, password} or {token}", "malformed", claimed)
        password = auth["password"]
        if type(password) is not str or len(password) > MAX_SECRET_BYTES:
            raise AuthFailed("malformed auth: password must be a string", "malformed", claimed)
        spec = self._specs.get(name)
        encoded = spec.password_hash if spec is not None and spec.password_hash else self._dummy
        if self._hashing >= self._backlog:
            raise AuthBusy("server busy authenticating; retry later", "busy", claimed)
        self._hashing += 1
        try:
            ok = await verify_async(password, encoded, self._limiter)
        finally:
            self._hashing -= 1
        if spec is None:
            raise AuthFailed(FAILED, "unknown_user", claimed)
        if not ok:
            raise AuthFailed(FAILED, "bad_password" if spec.password_hash else "no_password", claimed)
        if self._upgrade is not None and name not in self._upgrade_skip and needs_upgrade(encoded):
            await self._upgrade_hash(spec, password)
        return self._users[name]

    def weak_hashes(self) -> list[str]:
        """Names of the users whose password hash is weaker than the current parameters."""
        return [n for n, s in self._specs.items() if s.password_hash and needs_upgrade(s.password_hash)]

    async def _upgrade_hash(self, spec: UserSpec, password: str) -> None:
        """Re-hash ``password`` at the current cost and persist it (in a
        hashing thread: same limiter, same memory bound). Once per user per
        run: a failure is logged and the old hash kept."""
        old = spec.password_hash
        assert old is not None
        self._upgrade_skip.add(spec.name)
        upgrade = self._upgrade
        assert upgrade is not None

        def work() -> str:
            new = hash_password(password)
            upgrade(old, new)
            return new

        try:
            new = await anyio.to_thread.run_sync(work, limiter=self._limiter)
        except (OSError, ValueError) as exc:
            log.warning("could not upgrade the password hash of user %r to n=%d,r=%d,p=%d: %s; "
                        "regenerate it with `tidings passwd`", spec.name, SCRYPT_N, SCRYPT_R, SCRYPT_P, exc)
            return
        if self._specs.get(spec.name) is spec:
            self._specs[spec.name] = replace(spec, password_hash=new)
            self._upgrade_skip.discard(spec.name)
        log.info("upgraded the password hash of user %r to n=%d,r=%d,p=%d", spec.name, SCRYPT_N, SCRYPT_R, SCRYPT_P)

    def _check_token(self, token: object, name: str | None, claimed: str | None) -> User:
        if type(token) is not str or not token or len(token) > MAX_SECRET_BYTES:
            raise AuthFailed("malformed auth: token must be a non-empty string", "malformed", claimed)
        digest = token_hash(token)
        owner: str | None = None
        for h, user in self._tokens:  # no early exit: the time does not depend on which entry matched
            if hmac.compare_digest(h, digest):
                owner = user
        if owner is None:
            raise AuthFailed(FAILED, "bad_token", claimed)
        if name is not None and name != owner:
            raise AuthFailed(FAILED, "token_user_mismatch", claimed)
        return self._users[owner]

    # ------------------------------------------------------- connections

    def try_acquire(self, user: User) -> bool:
        """Count one more open connection of ``user``; False if at its cap."""
        n = self._open.get(user.name, 0)
        if user.max_connections is not None and n >= user.max_connections:
            return False
        self._open[user.name] = n + 1
        return True

    def release(self, user: User) -> None:
        """Undo one successful :meth:`try_acquire` (call exactly once per connection)."""
        n = self._open.get(user.name, 0) - 1
        if n > 0:
            self._open[user.name] = n
        else:
            self._open.pop(user.name, None)

    def open_connections(self, name: str) -> int:
        return self._open.get(name, 0)


def auth_method(auth: Mapping[str, Any] | None) -> str:
    """"token", "password" or "none": how a HELLO tried to log in (for audit)."""
    if not isinstance(auth, Mapping):
        return "none"
    return "token" if "token" in auth else "password" if "password" in auth else "none"


# ------------------------------------------------------------------- config

SECURITY_KEYS: Final = frozenset({"auth", "users", "tls", "password_upgrade"})
_USER_KEYS: Final = frozenset({"password", "tokens", "max_connections", "permissions"})
_TLS_KEYS: Final = frozenset({"cert", "key", "client_ca", "require_client_cert", "client_cert_user"})


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: str
    key: str | None = None
    client_ca: str | None = None
    require_client_cert: bool = False
    client_cert_user: str | None = None  # a key of tls.CERT_USER_SOURCES, or None: certificates name no user

    def server_context(self) -> ssl.SSLContext:
        return tls.server_context(self.cert, self.key, self.client_ca, self.require_client_cert)


@dataclass(frozen=True, slots=True)
class Security:
    """The validated security settings. ``users`` empty = no-users mode."""

    users: Mapping[str, UserSpec] = field(default_factory=lambda: MappingProxyType({}))
    tls: TlsSettings | None = None
    password_upgrade: bool = True  # rewrite weaker hashes in ``source`` at login
    source: str | None = None  # the config file the users came from (None: not from a file)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.users)

    def build_users(self, **kw: Any) -> Users | None:
        """A fresh :class:`Users` for a running broker, or None in no-users mode."""
        return Users(self.users.values(), **kw) if self.users else None

    def hash_upgrader(self) -> Callable[[str, str], None] | None:
        """What :class:`Users` calls to persist an upgraded hash: a rewrite of
        the config file; None if upgrades are off or there is no file."""
        source = self.source
        if not self.password_upgrade or source is None:
            return None
        return lambda old, new: replace_in_file(source, old, new)


def split_security(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a parsed TOML document into (general settings, security sections)."""
    rest = {k: v for k, v in doc.items() if k not in SECURITY_KEYS}
    sec = {k: v for k, v in doc.items() if k in SECURITY_KEYS}
    return rest, sec


def load_security(data: Mapping[str, Any], *, base_dir: str | None = None, source: str | None = None) -> Security:
    """Validate the ``auth``/``users``/``tls`` sections and return Security.

    Fails closed: raises SecurityConfigError for unknown keys, auth turned
    on without users (or off with users), a user with neither password nor
    token, unknown permission actions or bad patterns, malformed hashes,
    duplicate tokens, a TLS key without a cert, unreadable files and
    certificates OpenSSL will not load. Error messages never quote a
    configured secret (a "hash" may be a pasted plaintext password).
    Relative TLS paths are resolved against ``base_dir`` (the config file's
    directory). ``source``: the config file (kept for password upgrades).
    Reads the TLS files; no other side effects.
    """
    unknown = sorted(set(data) - SECURITY_KEYS)
    if unknown:
        raise SecurityConfigError(f"unknown security setting(s): {', '.join(unknown)}")
    auth = data.get("auth")
    if auth is not None and type(auth) is not bool:
        raise SecurityConfigError("auth must be true or false")
    users_table = data.get("users")
    if users_table is not None and not isinstance(users_table, Mapping):
        raise SecurityConfigError("users must be a table of [users.NAME] tables")
    if auth is False and users_table:
        raise SecurityConfigError("auth = false but [users] defines users: remove one of them")
    tls = _parse_tls(data["tls"], base_dir) if "tls" in data else None
    by_cert = tls is not None and tls.client_cert_user is not None
    users: dict[str, UserSpec] = {}
    if auth is True or users_table is not None:
        if not users_table:
            raise SecurityConfigError("authentication is enabled but no users are configured: "
                                      "add a [users.NAME] table (see `tidings passwd`)")
        users = _parse_users(users_table, certificate_only=by_cert)
    if by_cert and not users:
        raise SecurityConfigError("tls.client_cert_user maps client certificates to users, "
                                  "but no users are configured")
    upgrade = data.get("password_upgrade", True)
    if type(upgrade) is not bool:
        raise SecurityConfigError("password_upgrade must be true or false")
    return Security(MappingProxyType(users), tls, upgrade, source)


def _parse_users(table: Mapping[str, Any], *, certificate_only: bool = False) -> dict[str, UserSpec]:
    """``certificate_only``: a user may have neither password nor token (it
    logs in by client certificate alone; ``[tls] client_cert_user`` is set)."""
    users: dict[str, UserSpec] = {}
    token_owner: dict[str, str] = {}
    for name, entry in table.items():
        if not USER_NAME.fullmatch(name):
            raise SecurityConfigError(f"invalid user name {name[:64]!r}: 1..64 of letters, digits and _.@+-")
        where = f"users.{name}"
        if not isinstance(entry, Mapping):
            raise SecurityConfigError(f"{where} must be a table")
        unknown = sorted(set(entry) - _USER_KEYS)
        if unknown:
            raise SecurityConfigError(f"unknown setting(s) in [{where}]: {', '.join(unknown)}")
        password = entry.get("password")
        if password is not None and not is_password_hash(password):
            raise SecurityConfigError(f"{where}.password is not a password hash (expected 'scrypt$n=...'; "
                                      "create one with `tidings passwd`)")
        tokens = entry.get("tokens", [])
        if not isinstance(tokens, list):
            raise SecurityConfigError(f"{where}.tokens must be a list of token hashes")
        for i, t in enumerate(tokens):
            if not is_token_hash(t):
                raise SecurityConfigError(
                    f"{where}.tokens[{i}] is not a token hash (expected 'sha256$<64 hex>'; "
                    "create one with `tidings passwd --token`)")
            if tokens.index(t) != i:
                raise SecurityConfigError(f"{where}.tokens[{i}] repeats an earlier token hash")
            other = token_owner.setdefault(t, name)
            if other != name:
                raise SecurityConfigError(f"{where}.tokens[{i}] is also configured for user {other!r}: "
                                          "a token must identify exactly one user")
        if password is None and not tokens and not certificate_only:
            raise SecurityConfigError(f"user {name!r} has neither a password nor a token: "
                                      "nobody could log in as it (nor by certificate: tls.client_cert_user "
                                      "is not set)")
        maxc = entry.get("max_connections")
        if maxc is not None and (type(maxc) is not int or maxc < 1):
            raise SecurityConfigError(f"{where}.max_connections must be a positive integer")
        ptable = entry.get("permissions", {})
        if not isinstance(ptable, Mapping):
            raise SecurityConfigError(f"{where}.permissions must be a table")
        try:
            p = perms.from_config(ptable)
        except ValueError as exc:
            raise SecurityConfigError(f"{where}.permissions: {exc}") from None
        users[name] = UserSpec(name, password, tuple(tokens), p, maxc)
    return users


def _readable(path: Any, what: str, base_dir: str | None) -> str:
    if type(path) is not str or not path:
        raise SecurityConfigError(f"{what} must be a file path")
    full = os.path.join(base_dir, os.path.expanduser(path)) if base_dir else os.path.expanduser(path)
    try:
        with open(full, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise SecurityConfigError(f"{what}: cannot read {full}: {exc.strerror or exc}") from None
    return full


def _parse_tls(table: Any, base_dir: str | None) -> TlsSettings:
    if not isinstance(table, Mapping):
        raise SecurityConfigError("tls must be a table")
    unknown = sorted(set(table) - _TLS_KEYS)
    if unknown:
        raise SecurityConfigError(f"unknown setting(s) in [tls]: {', '.join(unknown)}")
    if "cert" not in table:
        if "key" in table:
            raise SecurityConfigError("tls.key is set but tls.cert is not: a key needs its certificate")
        raise SecurityConfigError("[tls] needs cert (and key, unless the cert file holds it)")
    require = table.get("require_client_cert", False)
    if type(require) is not bool:
        raise SecurityConfigError("tls.require_client_cert must be true or false")
    if require and "client_ca" not in table:
        raise SecurityConfigError("tls.require_client_cert needs tls.client_ca to verify client certificates")
    cert_user = table.get("client_cert_user")
    if cert_user is not None:
        if cert_user not in tls.CERT_USER_SOURCES:
            raise SecurityConfigError(f"tls.client_cert_user must be one of {', '.join(tls.CERT_USER_SOURCES)}")
        if "client_ca" not in table:
            raise SecurityConfigError("tls.client_cert_user needs tls.client_ca to verify client certificates")
    settings = TlsSettings(
        client_cert_user=cert_user,
        cert=_readable(table["cert"], "tls.cert", base_dir),
        key=_readable(table["key"], "tls.key", base_dir) if "key" in table else None,
        client_ca=_readable(table["client_ca"], "tls.client_ca", base_dir) if "client_ca" in table else None,
        require_client_cert=require,
    )
    try:
        settings.server_context()  # fails now, not at the first client: key mismatch, not PEM, ...
    except (ssl.SSLError, ValueError) as exc:
        raise SecurityConfigError(f"tls: cannot load certificate/key/CA: {exc}") from None
    return settings


# ------------------------------------------------------------ tidings passwd


def passwd_main(argv: Sequence[str] | None = None) -> int:
    """``tidings passwd``: print a password hash, or a new token and its hash.

    Password: prompted twice (no echo), or one line from stdin with
    ``--stdin``; the hash goes to stdout alone. ``--token``: stdout gets two
    lines, the token (give it to the client) and its hash (for the config).
    Returns the exit code: 0 done, 1 refused input.
    """
    ap = argparse.ArgumentParser(
        prog="tidings passwd",
        description="Hash a password (or make a token) for the [users] config section.")
    ap.add_argument("--stdin", action="store_true",
                    help="read the password as one line from stdin (for scripts)")
    ap.add_argument("--token", action="store_true",
                    help="generate a random token instead; print it and its hash")
    args = ap.parse_args(argv)
    if args.token:
        if args.stdin:
            ap.error("--token generates the secret; it reads nothing from stdin")
        token = new_token()
        print(token)
        print(token_hash(token))
        print('give the first line to the client; put the second in the config: tokens = ["sha256$..."]',
              file=sys.stderr)
        return 0
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            print("tidings passwd: the passwords differ", file=sys.stderr)
            return 1
    try:
        encoded = hash_password(password)
    except ValueError as exc:
        print(f"tidings passwd: {exc}", file=sys.stderr)
        return 1
    print(encoded)
    return 0
