"""Who is calling: bearer token or basic auth against the broker's users
(broker/security/auth.py), with the same throttle and audit as a TCP HELLO.

    auth = HttpAuth(users, audit)         # users None: no-users mode, everyone is ANONYMOUS
    user = await auth.user(request)       # raises HttpError (401, or 503 when busy)

``Authorization: Bearer TOKEN`` is checked as ``{"token": TOKEN}``,
``Authorization: Basic base64(user:password)`` as ``{"user", "password"}``,
exactly what a HELLO carries, so unknown users, wrong passwords and wrong
tokens get the same answer, failures count against the caller's address
and a blocked address is refused before anything is hashed.

HTTP has no connection to log in once: every request carries its
credentials. A password costs an scrypt hash (~50 ms of a CPU by design), so
a successful check is remembered for ``CACHE_SECONDS`` under a salted digest
of the whole header (never the secret itself; at most ``CACHE_SIZE``
entries): a publisher sending a request every few milliseconds pays the hash
once a minute, and its login is audited once a minute, not per request.
Prefer tokens for services (a token check is one SHA-256).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from typing import TYPE_CHECKING, Callable, Final

from tidings.protocol.errors import ErrorCode

from tidings.broker.http.errors import HttpError
from tidings.broker.security.auth import ANONYMOUS, AuthBusy, AuthError, AuthThrottled, User

if TYPE_CHECKING:
    from starlette.requests import Request

    from tidings.broker.security.audit import AuditLog
    from tidings.broker.security.auth import Users

#: Seconds a successful credential check is remembered (users and tokens are fixed while
#: the broker runs; this bounds how often a busy HTTP publisher pays a password hash).
CACHE_SECONDS: Final = 60.0
#: Remembered checks (distinct Authorization headers); cleared when full.
CACHE_SIZE: Final = 1024
#: Longest Authorization header looked at (a token or user:password is far shorter).
MAX_CREDENTIALS: Final = 4096


def peer_of(request: Request) -> tuple[str, str]:
    """(ip, "ip:port") of the caller, for the throttle and audit lines."""
    client = request.client
    if client is None:
        return "?", "?"
    return client.host, f"{client.host}:{client.port}"


class HttpAuth:
    """Authenticates HTTP requests against the broker's users (None: no users, no login)."""

    def __init__(self, users: Users | None, audit: AuditLog, clock: Callable[[], float] = time.monotonic) -> None:
        self.users = users
        self.audit = audit
        self.clock = clock
        self._salt = os.urandom(16)
        self._cache: dict[bytes, tuple[float, User]] = {}

    @property
    def enabled(self) -> bool:
        return self.users is not None

    async def user(self, request: Request) -> User:
        """The authenticated user of ``request`` (ANONYMOUS in no-users mode).

        Raises HttpError: AUTH_FAILED (401) for missing, malformed or wrong
        credentials and for a throttled address, OVERLOADED (503) when too
        many logins are being hashed."""
        users = self.users
        if users is None:
            return ANONYMOUS
        header = request.headers.get("authorization")
        if not header:
            raise HttpError(ErrorCode.AUTH_FAILED, "authentication required: send Authorization: Bearer TOKEN "
                            "or Basic (user:password)")
        if len(header) > MAX_CREDENTIALS:
            raise HttpError(ErrorCode.AUTH_FAILED, "malformed Authorization header")
        key = hashlib.sha256(self._salt + header.encode("utf-8", "surrogateescape")).digest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[key]
        scheme, _, cred = header.strip().partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        ip, peer = peer_of(request)
        if scheme == "bearer" and cred:
            auth, method = {"token": cred}, "token"
        elif scheme == "basic":
            try:
                name, sep, password = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                sep = ""
            if not sep:
                self.audit.auth_failed(None, peer, "password", "malformed")
                raise HttpError(ErrorCode.AUTH_FAILED, "malformed Basic credentials: expected base64(user:password)")
            auth, method = {"user": name, "password": password}, "password"
        else:
            self.audit.auth_failed(None, peer, "none", "malformed")
            raise HttpError(ErrorCode.AUTH_FAILED, "unsupported Authorization scheme: use Bearer or Basic")
        try:
            user = await users.authenticate(auth, ip)
        except AuthThrottled as exc:
            self.audit.auth_throttled(peer, exc.retry_after)
            raise HttpError(ErrorCode.AUTH_FAILED, exc.message,
                            headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
        except AuthBusy as exc:
            raise HttpError(ErrorCode.OVERLOADED, exc.message) from None
        except AuthError as exc:
            self.audit.auth_failed(exc.user, peer, method, exc.reason)
            raise HttpError(ErrorCode.AUTH_FAILED, exc.message) from None
        self.audit.auth_ok(user.name, peer, f"http-{method}")
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (now + CACHE_SECONDS, user)
        return user
