"""Subject and pattern rules, wildcard matching and PatternSet: the same on
broker and client, so both agree on what a subscription receives."""

from __future__ import annotations

import itertools

import pytest

from tidings.protocol import ErrorCode, RemoteProtocolError
from tidings.protocol.subjects import (
    MAX_SUBJECT_LENGTH,
    MAX_TOKENS,
    PatternSet,
    is_valid_subject,
    matches,
    validate_pattern,
    validate_subject,
)

VALID_SUBJECTS = [
    "a", "orders", "orders.eu.created", "a.b.c.d.e", "_INBOX.abc123.7", "x-y_z.1.2", "ÜNICODE.ñ.日本",
    "with:colon", "a$b", "a/b", "0", "a.0.b", "#", "a.#", "a" * MAX_SUBJECT_LENGTH,
    ".".join(["t"] * MAX_TOKENS), "a+b", "a,b", "a\x00b",
]

INVALID_SUBJECTS = [
    "", ".", "a.", ".a", "a..b", "a...b", " ", "a b", "a\tb", "a\nb", "a.b ", " a.b", "a.\u00a0.b",
    "a\u2003b", "*", ">", "a.*", "a.>", "*.a", "a.*.b", "a*", "a>b", "a.b*c", "x>", "a" * (MAX_SUBJECT_LENGTH + 1),
    ".".join(["t"] * (MAX_TOKENS + 1)), None, 5, b"a.b", ["a"], {"a": 1}, 1.5, True,
]

# Subjects that are valid, but as patterns look like other brokers' wildcards or separators.
FOREIGN_PATTERNS = ["#", "a.#", "a/b", "+", "a.+.c", "orders/#", "sensors/+/temp", "a.#.b"]

VALID_PATTERNS = [s for s in VALID_SUBJECTS if s not in FOREIGN_PATTERNS] + [
    "*", ">", "a.*", "a.>", "*.b", "*.*", "*.>", "a.*.c", "a.*.>", "*.*.*", "_INBOX.abc.>",
    ".".join(["*"] * MAX_TOKENS), ".".join(["a"] * (MAX_TOKENS - 1) + [">"]),
]

INVALID_PATTERNS = [
    "", ".", "a.", ".a", "a..b", "a b", "a.\tb", ">.a", "a.>.b", ">.>", "a.>.>", ">>", "**", "a*", "*a",
    "a.b*", "a.>b", "a.*b", "a>", " *", "* ", "a" * (MAX_SUBJECT_LENGTH + 1),
    ".".join(["*"] * (MAX_TOKENS + 1)), None, 7, b"a", ["a"],
]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert is_valid_subject(subject)


@pytest.mark.parametrize("subject", INVALID_SUBJECTS, ids=repr)
def test_invalid_subjects(subject: object) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        validate_subject(subject)
    assert ei.value.code == ErrorCode.INVALID_SUBJECT
    assert not ei.value.fatal
    assert not is_valid_subject(subject)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", INVALID_PATTERNS, ids=repr)
def test_invalid_patterns(pattern: object) -> None:
    with pytest.raises(RemoteProtocolError) as ei:
        validate_pattern(pattern)
    assert ei.value.code == ErrorCode.INVALID_SUBJECT


@pytest.mark.parametrize("pattern", FOREIGN_PATTERNS)
def test_other_brokers_wildcards_are_refused_with_a_hint(pattern: str) -> None:
    """MQTT's + and #, AMQP's #, / between levels would silently match nothing (in a subject
    they are plain text): the error says how tidings writes a pattern."""
    with pytest.raises(RemoteProtocolError) as ei:
        validate_pattern(pattern)
    assert ei.value.code == ErrorCode.INVALID_SUBJECT
    assert "'*' for one token and '>' for the rest" in ei.value.message
    assert validate_pattern(pattern, stored=True) == pattern  # a binding an older broker stored still loads
    assert pattern in PatternSet([pattern])  # and the broker may announce it to a client


@pytest.mark.parametrize("pattern", ["a*", "a.b*", "a.>b", ">.a"])
def test_misplaced_wildcards_carry_the_hint(pattern: str) -> None:
    with pytest.raises(RemoteProtocolError, match="'>' for the rest"):
        validate_pattern(pattern)


def test_length_limit_counts_characters_of_the_whole_subject() -> None:
    assert MAX_SUBJECT_LENGTH == 255 and MAX_TOKENS == 32
    ok = ".".join(["abcdefg"] * 32)  # 32 tokens, 255 characters
    assert len(ok) == 255
    validate_subject(ok)
    with pytest.raises(RemoteProtocolError):
        validate_subject(ok + "x")


MATCH_CASES: list[tuple[str, str, bool]] = [
    # literal
    ("a", "a", True),
    ("a", "b", False),
    ("a.b", "a.b", True),
    ("a.b", "a", False),
    ("a", "a.b", False),
    ("a.b", "a.b.c", False),
    ("orders.eu.created", "orders.eu.created", True),
    ("orders.eu.created", "orders.eu.updated", False),
    # * is exactly one token
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.b.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("*.*", "a.b.c", False),
    # > is one or more trailing tokens
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "b.c", False),
    ("a.b.>", "a.b", False),
    ("a.b.>", "a.b.c", True),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c", True),
    ("_INBOX.xyz.>", "_INBOX.xyz.1", True),
    ("_INBOX.xyz.>", "_INBOX.xyz", False),
    ("_INBOX.xyz.>", "_INBOX.xyzz.1", False),
    # tokens are compared whole, not as prefixes
    ("ab", "abc", False),
    ("a.b", "a.bc", False),
    ("abc.*", "ab.c", False),
]


@pytest.mark.parametrize("pattern,subject,expected", MATCH_CASES)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    validate_pattern(pattern)
    validate_subject(subject)
    assert matches(pattern, subject) is expected
    assert PatternSet([pattern]).match(subject) is expected


def test_a_subject_matches_itself() -> None:
    for s in VALID_SUBJECTS:
        assert matches(s, s)
        assert PatternSet([s]).match(s)


def _reference_match(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(x == "*" or x == y for x, y in zip(p[:-1], s))
    return len(p) == len(s) and all(x == "*" or x == y for x, y in zip(p, s))


def test_matches_agrees_with_a_reference_over_all_small_cases() -> None:
    # every pattern of up to 3 tokens from {a, b, *, >} against every subject of up to 4 tokens from {a, b}
    toks = ["a", "b", "*", ">"]
    patterns = [".".join(t) for n in range(1, 4) for t in itertools.product(toks, repeat=n)]
    patterns = [p for p in patterns if ">" not in p.split(".")[:-1]]
    subjects = [".".join(t) for n in range(1, 5) for t in itertools.product(["a", "b"], repeat=n)]
    for p in patterns:
        validate_pattern(p)
        ps = PatternSet([p])
        for s in subjects:
            expected = _reference_match(p, s)
            assert matches(p, s) is expected, (p, s)
            assert ps.match(s) is expected, (p, s)


def test_pattern_set_is_any_match() -> None:
    ps = PatternSet(["orders.*.created", "jobs.>", "exact.subject"])
    assert len(ps) == 3
    assert ps.match("orders.eu.created")
    assert ps.match("jobs.email")
    assert ps.match("jobs.email.high")
    assert ps.match("exact.subject")
    assert not ps.match("orders.eu.updated")
    assert not ps.match("jobs")
    assert not ps.match("exact")
    assert not ps.match("exact.subject.more")
    assert not ps.match("other")


def test_pattern_set_overlapping_patterns_backtrack() -> None:
    # a literal branch that dead-ends must not hide a wildcard branch that matches
    ps = PatternSet(["a.b.c", "a.*.d", "*.b.e", "a.b.>"])
    assert ps.match("a.x.d")
    assert ps.match("a.b.d")
    assert ps.match("z.b.e")
    assert ps.match("a.b.e")
    assert ps.match("a.b.z.y")
    assert not ps.match("a.x.c")
    assert not ps.match("a.b")


def test_pattern_set_add_contains_patterns() -> None:
    ps = PatternSet()
    assert len(ps) == 0 and not ps.match("a")
    ps.add("b.>")
    ps.add("a.*")
    ps.add("a.*")  # idempotent
    assert len(ps) == 2
    assert "a.*" in ps and "b.>" in ps and "a.b" not in ps
    assert ps.patterns() == ["a.*", "b.>"]
    with pytest.raises(RemoteProtocolError):
        ps.add("a..b")
    assert len(ps) == 2


def test_pattern_set_agrees_with_matches_for_sets() -> None:
    toks = ["a", "b", "*", ">"]
    patterns = [".".join(t) for n in range(1, 3) for t in itertools.product(toks, repeat=n)]
    patterns = [p for p in patterns if ">" not in p.split(".")[:-1]]
    subjects = [".".join(t) for n in range(1, 4) for t in itertools.product(["a", "b", "c"], repeat=n)]
    for group in itertools.combinations(patterns, 3):
        ps = PatternSet(list(group))
        for s in subjects:
            assert ps.match(s) is any(matches(p, s) for p in group), (group, s)
