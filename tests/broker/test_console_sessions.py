"""broker/http/console/sessions.py: server-side sessions, their expiries and their bound."""

from __future__ import annotations

from tidings.broker.http.console.sessions import Sessions, _digest
from tidings.broker.security.auth import ANONYMOUS, User
from tidings.broker.security.permissions import Permissions


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ALICE = User("alice", Permissions({"consume": ["a.>"]}))


def test_a_session_is_a_random_token_kept_only_as_its_digest() -> None:
    s = Sessions()
    a, b = s.create(ALICE), s.create(ALICE)
    assert a.token != b.token and a.csrf != b.csrf and len(a.token) >= 43
    assert a.token not in repr(s._live) and _digest(a.token) in s._live
    got = s.get(a.token)
    assert got is not None and got.user is ALICE and got.csrf_ok(a.csrf)
    assert not got.csrf_ok(b.csrf) and not got.csrf_ok(None) and not got.csrf_ok("")
    assert s.get("made-up") is None and s.get(None) is None and s.get("x" * 1000) is None
    assert s.end(a.token) and s.get(a.token) is None and not s.end(a.token)


def test_idle_and_absolute_expiry() -> None:
    clock = Clock()
    s = Sessions(clock=clock, idle=10.0, lifetime=25.0)
    a = s.create(ALICE)
    for _ in range(2):  # used within the idle time: it stays alive...
        clock.now += 9.0
        assert s.get(a.token) is not None
    clock.now += 9.0  # ...but not past its lifetime (27 s > 25 s)
    assert s.get(a.token) is None
    b = s.create(ALICE)
    clock.now += 10.5  # unused past the idle time
    assert s.get(b.token) is None


def test_the_number_of_sessions_is_bounded_least_recently_used_first() -> None:
    s = Sessions(max_sessions=3)
    first, second, third = (s.create(ANONYMOUS) for _ in range(3))
    assert s.get(first.token) is not None  # used: now the most recent
    fourth = s.create(ALICE)
    assert len(s) == 3 and s.evicted == 1
    assert s.get(second.token) is None
    assert all(s.get(x.token) is not None for x in (first, third, fourth))
