"""Console sign-in: server-side sessions behind an HttpOnly cookie, with a CSRF token each.

    sessions = Sessions()
    session = sessions.create(user)            # after a successful login
    cookie = session.token                     # set as COOKIE (HttpOnly, SameSite=Strict)
    session = sessions.get(cookie)             # None: unknown, expired or signed out
    sessions.end(cookie)

A session is a random token (``secrets.token_urlsafe``, 256 bits) the browser
keeps in a cookie; the server keeps only its SHA-256 digest, with the user,
a per-session CSRF token and two expiries: ``IDLE_SECONDS`` after its last
use and ``MAX_SECONDS`` after sign-in. At most ``MAX_SESSIONS`` live at once:
signing in beyond it ends the session used least recently (a bound on memory
that a user with valid credentials may push, never one that locks sign-in).

With no users configured (loopback-only mode) there is no sign-in: every
request is ANONYMOUS, and the one CSRF token is the broker's own
(``Sessions.open_csrf``), given only to same-origin pages.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Final

from tidings.protocol.errors import ErrorCode

from tidings.broker.http.errors import HttpError
from tidings.broker.security.auth import AuthBusy, AuthError, AuthThrottled

if TYPE_CHECKING:
    from tidings.broker.security.audit import AuditLog
    from tidings.broker.security.auth import User, Users

COOKIE: Final = "tidings_session"
#: A session unused this long ends (a console left open keeps it alive: its live
#: updates count as use).
IDLE_SECONDS: Final = 30 * 60.0
#: A session ends this long after sign-in whatever its use: sign in again once a working day.
MAX_SECONDS: Final = 12 * 3600.0
#: Sessions alive at once; beyond it the least recently used one ends (each costs ~300 bytes).
MAX_SESSIONS: Final = 1024
#: Longest user name or password a sign-in request may carry (a real one is far shorter).
MAX_CREDENTIAL: Final = 1024


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(slots=True)
class Session:
    """One signed-in browser: its user and its CSRF token. ``token`` is set only on
    the object :meth:`Sessions.create` returns (the server keeps its digest)."""

    user: User
    csrf: str
    expires: float
    ends: float
    token: str = field(default="", repr=False)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                                                             self.csrf.encode())


class Sessions:
    """The live console sessions (owned by the event loop thread)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_sessions: int = MAX_SESSIONS,
                 idle: float = IDLE_SECONDS, lifetime: float = MAX_SECONDS) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self.idle = idle
        self.lifetime = lifetime
        self._live: OrderedDict[bytes, Session] = OrderedDict()  # least recently used first
        self.open_csrf = secrets.token_urlsafe(32)  # no-users mode: one token for same-origin pages
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._live)

    def create(self, user: User) -> Session:
        """A new session of ``user`` (ending the least recently used one if at the bound)."""
        now = self.clock()
        self._sweep(now)
        while len(self._live) >= self.max_sessions:
            self._live.popitem(last=False)
            self.evicted += 1
        token = secrets.token_urlsafe(32)
        s = Session(user, secrets.token_urlsafe(32), now + self.idle, now + self.lifetime)
        self._live[_digest(token)] = s
        return Session(s.user, s.csrf, s.expires, s.ends, token)

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie value (its idle expiry moves on), or None."""
        if not token or len(token) > 128:
            return None
        key = _digest(token)
        s = self._live.get(key)
        if s is None:
            return None
        now = self.clock()
        if now >= s.expires or now >= s.ends:
            del self._live[key]
            return None
        s.expires = min(now + self.idle, s.ends)
        self._live.move_to_end(key)
        return s

    def end(self, token: str | None) -> bool:
        """Sign out: forget the session of ``token``; False if there was none."""
        if not token:
            return False
        return self._live.pop(_digest(token), None) is not None

    def _sweep(self, now: float) -> None:
        # least recently used first: stop at the first one still alive by its idle expiry
        while self._live:
            key, s = next(iter(self._live.items()))
            if now < s.expires and now < s.ends:
                break
            del self._live[key]


async def sign_in(users: Users, audit: AuditLog, name: object, password: object, ip: str, peer: str) -> User:
    """Check a console sign-in with the same ``Users.authenticate``, throttle and audit
    as a TCP HELLO with a password. Raises HttpError: AUTH_FAILED (401; unknown user and
    wrong password get the same answer), OVERLOADED (503) when too many logins are hashed."""
    if not isinstance(name, str) or not isinstance(password, str) or not name \
            or len(name) > MAX_CREDENTIAL or len(password) > MAX_CREDENTIAL:
        audit.auth_failed(name[:64] if isinstance(name, str) else None, peer, "password", "malformed")
        raise HttpError(ErrorCode.AUTH_FAILED, "sign-in needs a user name and a password")
    try:
        user = await users.authenticate({"user": name, "password": password}, ip)
    except AuthThrottled as exc:
        audit.auth_throttled(peer, exc.retry_after)
        raise HttpError(ErrorCode.AUTH_FAILED, exc.message,
                        headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
    except AuthBusy as exc:
        raise HttpError(ErrorCode.OVERLOADED, exc.message) from None
    except AuthError as exc:
        audit.auth_failed(exc.user, peer, "password", exc.reason)
        raise HttpError(ErrorCode.AUTH_FAILED, exc.message) from None
    audit.auth_ok(user.name, peer, "console-password")
    return user
