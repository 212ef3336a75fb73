"""Permissions: covers/overlaps against a brute-force oracle, the allow/deny
rule, the bounded cache, config parsing and the CALL table."""

from __future__ import annotations

import itertools

import pytest

from tidings.broker.security import permissions as P
from tidings.broker.security.permissions import ALLOW_ALL, Need, Permissions, covers, needs_for_call, overlaps, redrive_needs
from tidings.protocol.subjects import matches


def _patterns(max_len: int) -> list[str]:
    out = []
    for n in range(1, max_len + 1):
        for toks in itertools.product("ab*", repeat=n):
            out.append(".".join(toks))
            out.append(".".join(toks[:-1] + (">",)))
    return sorted(set(out))


PATTERNS = _patterns(3)
# Subjects one token longer than any pattern, with a token no pattern names:
# enough to witness every difference between patterns of up to 3 tokens.
SUBJECTS = [".".join(t) for n in range(1, 5) for t in itertools.product("abc", repeat=n)]
MATCHED = {p: frozenset(s for s in SUBJECTS if matches(p, s)) for p in PATTERNS}


def test_covers_agrees_with_brute_force() -> None:
    for a, s in itertools.product(PATTERNS, repeat=2):
        assert covers(a, s) == (MATCHED[s] <= MATCHED[a]), (a, s)


def test_overlaps_agrees_with_brute_force() -> None:
    for p, q in itertools.product(PATTERNS, repeat=2):
        assert overlaps(p, q) == bool(MATCHED[p] & MATCHED[q]), (p, q)
        assert overlaps(p, q) == overlaps(q, p)


@pytest.mark.parametrize("allow, sub, expect", [
    ("orders.>", "orders.eu.*", True),
    ("orders.>", "orders.>", True),
    ("orders.>", "orders", False),
    ("orders.*", "orders.>", False),
    ("orders.*", "orders.eu", True),
    ("orders.eu", "orders.*", False),
    (">", "anything.at.all", True),
    ("*.created", "orders.created", True),
])
def test_covers_examples(allow: str, sub: str, expect: bool) -> None:
    assert covers(allow, sub) is expect


def test_literal_covers_is_matching() -> None:
    for p in PATTERNS:
        for s in SUBJECTS:
            assert covers(p, s) == matches(p, s)


def test_deny_beats_allow_and_default_is_deny() -> None:
    p = Permissions({"publish": ["orders.>"]}, {"publish": ["orders.internal.>"]})
    assert p.allows("publish", "orders.eu.created")
    assert not p.allows("publish", "orders.internal.audit")
    assert not p.allows("publish", "billing.x")  # no allow pattern matches
    assert not p.allows("subscribe", "orders.eu.created")  # nothing allowed for this action
    assert not p.allows("teleport", "orders.eu.created")  # unknown action


def test_subscribe_wildcards_follow_the_documented_rule() -> None:
    p = Permissions({"subscribe": ["orders.>"]}, {"subscribe": ["orders.secret.>"]})
    assert p.allows("subscribe", "orders.eu.*")
    assert p.allows("subscribe", "orders.eu.>")
    assert not p.allows("subscribe", "orders.*.created")  # could match orders.secret.created
    assert not p.allows("subscribe", "orders.>")
    assert not p.allows("subscribe", ">")
    assert not p.allows("subscribe", "*.eu.created")  # not covered: could match billing.eu.created


def test_consume_and_admin_names_use_the_same_rules() -> None:
    p = Permissions({"consume": ["jobs.*"], "admin": ["jobs.>"]}, {"admin": ["jobs.prod.>"]})
    assert p.allows("consume", "jobs.email")
    assert not p.allows("consume", "jobs.email.retry")
    assert p.allows("admin", "jobs.dev.x")
    assert not p.allows("admin", "jobs.prod.x")
    assert not p.allows("admin", P.ALL_NAMES)  # global calls need ">" and no deny


def test_global_admin_needs_full_allow_and_no_deny() -> None:
    assert Permissions({"admin": [">"]}).allows("admin", P.ALL_NAMES)
    assert not Permissions({"admin": [">"]}, {"admin": ["secret"]}).allows("admin", P.ALL_NAMES)
    assert not Permissions({"admin": ["*"]}).allows("admin", P.ALL_NAMES)


def test_cache_is_bounded_and_answers_stay_correct() -> None:
    p = Permissions({"publish": ["a.*"]}, cache_size=8)
    for i in range(100):
        assert p.allows("publish", f"a.{i}")
        assert not p.allows("publish", f"b.{i}")
        assert len(p._cache["publish"]) <= 8
    assert p.allows("publish", "a.1") and not p.allows("publish", "a.1.x")


def test_allow_all() -> None:
    assert ALLOW_ALL.unrestricted
    for action in P.ACTIONS:
        assert ALLOW_ALL.allows(action, "x.y")
        assert ALLOW_ALL.allows(action, ">")
    assert ALLOW_ALL.check_call("queue.delete", {"name": "q"}) is None
    assert ALLOW_ALL._cache == {a: {} for a in P.ACTIONS}  # the shared instance never grows


def test_from_config() -> None:
    p = P.from_config({"publish": ["orders.>"], "publish_deny": ["orders.x"], "admin": []})
    assert p.allows("publish", "orders.y") and not p.allows("publish", "orders.x")
    assert p.describe() == {"allow": {"publish": ["orders.>"]}, "deny": {"publish": ["orders.x"]}}
    assert not P.from_config({}).allows("publish", "a")


@pytest.mark.parametrize("table, fragment", [
    ({"publsh": ["a"]}, "unknown permission key 'publsh'"),
    ({"publish_allow": ["a"]}, "unknown permission key 'publish_allow'"),
    ({"publish": "orders.>"}, "must be a list"),
    ({"publish": [1]}, "must be a list"),
    ({"subscribe": ["orders.>.x"]}, "invalid pattern"),
    ({"consume_deny": ["a..b"]}, "invalid pattern"),
])
def test_from_config_rejects(table: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.").replace("*", r"\*")):
        P.from_config(table)


def test_needs_for_call_table() -> None:
    assert needs_for_call("server.info", {}) == []
    assert needs_for_call("stats", {}) == [Need("admin", ">")]
    assert needs_for_call("queue.list", {}) == [Need("admin", ">")]
    assert needs_for_call("brand.new.call", {"name": "q"}) == [Need("admin", ">")]  # fail closed
    assert needs_for_call("queue.purge", {"name": "jobs"}) == [Need("admin", "jobs")]
    assert needs_for_call("queue.purge", {"name": 7}) == []  # invalid: the handler rejects it
    assert needs_for_call("dlq.redrive", {"name": "jobs.dlq", "to": "other"}) == [
        Need("admin", "jobs.dlq"), Need("admin", "other")]
    assert needs_for_call("queue.declare", {"name": "jobs", "bind": ["jobs.>", "x.*"]}) == [
        Need("admin", "jobs"), Need("admin", "jobs.dlq"),
        Need("subscribe", "jobs.>"), Need("subscribe", "x.*")]
    assert needs_for_call("queue.declare", {"name": "jobs", "dead_letter": "dead"}) == [
        Need("admin", "jobs"), Need("admin", "dead")]
    # "ev.dlq" gets its own DLQ "ev.dlq.dlq": creating it needs admin on that name (no squatting)
    assert needs_for_call("stream.declare", {"name": "ev.dlq"}) == [
        Need("admin", "ev.dlq"), Need("admin", "ev.dlq.dlq")]
    assert needs_for_call("queue.declare", {"name": "x.dlq"}) == [
        Need("admin", "x.dlq"), Need("admin", "x.dlq.dlq")]
    assert needs_for_call("queue.declare", {"name": "x.dlq", "is_dlq": True}) == [Need("admin", "x.dlq")]
    # dlq.list returns payloads: consume, not admin
    assert needs_for_call("dlq.list", {"name": "jobs.dlq"}) == [Need("consume", "jobs.dlq")]
    assert needs_for_call("queue.peek", {"name": "jobs"}) == [Need("consume", "jobs")]


def test_redrive_needs_admin_and_publish_on_each_destination() -> None:
    assert redrive_needs([("jobs", ("jobs.>",)), ("bare", ())]) == [
        Need("admin", "jobs"), Need("publish", "jobs.>"), Need("admin", "bare")]
    p = Permissions({"admin": ["jobs", "jobs.dlq"], "publish": ["jobs.eu.>"]})
    assert p.first_unmet(redrive_needs([("jobs", ("jobs.>",))])) == Need("publish", "jobs.>")
    assert p.first_unmet(redrive_needs([("jobs", ("jobs.eu.*",))])) is None


@pytest.mark.parametrize("stream, group, allowed", [
    ("events", "workers", True),  # events/workers
    ("events", "billing", False),  # the plain name "events" reads the stream, joins no group
    ("orders.eu", "billing", True),  # a trailing ">" covers the groups of the streams it covers
    ("orders.secret", "g", False),  # a plain deny covers every group of its stream
    ("logs", "a", True), ("logs", "a.b", False),  # logs/*: one token
    ("logs", "bad", False),  # deny logs/bad
    ("events", "w/x", False),  # group names hold no "/"
])
def test_group_permissions(stream: str, group: str, allowed: bool) -> None:
    p = P.from_config({"consume": ["events", "events/workers", "orders.>", "logs/*"],
                       "consume_deny": ["orders.secret", "logs/bad"]})
    assert p.allows_group(stream, group) is allowed
    assert p.allows_group(stream, group) is allowed  # cached answer
    # group patterns name groups only
    assert p.allows("consume", "events") and not p.allows("consume", "events/workers")
    assert P.ALLOW_ALL.allows_group(stream, group)


def test_group_pattern_parts_are_validated() -> None:
    with pytest.raises(ValueError, match="invalid pattern"):
        P.from_config({"consume": ["events/a..b"]})


def test_check_call_reports_first_unmet_need() -> None:
    p = Permissions({"admin": ["jobs", "jobs.dlq"], "subscribe": ["jobs.>"]})
    assert p.check_call("queue.declare", {"name": "jobs", "bind": ["jobs.>"]}) is None
    # an admin of "jobs" may not bind it to subjects it cannot read
    assert p.check_call("queue.declare", {"name": "jobs", "bind": ["payments.>"]}) == Need("subscribe",
                                                                                          "payments.>")
    assert p.check_call("queue.purge", {"name": "other"}) == Need("admin", "other")
    assert p.check_call("stats", {}) == Need("admin", ">")
    assert p.check_call("server.info", {}) is None


def test_a_filtered_bind_entry_needs_subscribe_on_its_subject() -> None:
    # a {subject, match} entry binds its subject as a plain pattern does: no way around the check
    assert needs_for_call("queue.declare", {"name": "q", "bind": [
        "a.>", {"subject": "secret.>", "match": {"region": ["eu"]}}]}) == [
        Need("admin", "q"), Need("admin", "q.dlq"), Need("subscribe", "a.>"), Need("subscribe", "secret.>")]
    assert Need("subscribe", "x.y") in needs_for_call("stream.declare", {"name": "s", "bind": [{"subject": "x.y"}]})
