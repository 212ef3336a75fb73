"""Subject rules and wildcard matching, the same on both sides.

A subject is 1..255 characters of dot-separated tokens. A token is
non-empty and contains no whitespace, no ``.``, and neither ``*`` nor ``>``
(those are wildcards, allowed only in patterns). A pattern may use ``*``
as a whole token (exactly one token) and ``>`` as the last token (one or
more trailing tokens).

Patterns written for other brokers (MQTT's ``+`` and ``#``, AMQP's ``#``,
``/`` between levels) are refused with :data:`WILDCARD_HINT` instead of
silently matching nothing: in a subject those characters are plain text.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

from tidings.protocol.errors import ErrorCode, RemoteProtocolError

MAX_SUBJECT_LENGTH: Final = 255  # long enough for any real naming scheme, short enough to index cheaply
MAX_TOKENS: Final = 32  # bounds trie depth and matching work per publish

_TOKEN = re.compile(r"[^\s.*>]+")
# Tokens and separators other brokers use as wildcards; a pattern holding one is a mistake.
_FOREIGN_WILDCARDS: Final = frozenset({"#", "+"})
WILDCARD_HINT: Final = "tidings uses '.' between tokens, '*' for one token and '>' for the rest"


def _check_common(subject: object, what: str) -> list[str]:
    if type(subject) is not str:
        raise RemoteProtocolError(f"{what} must be a string", ErrorCode.INVALID_SUBJECT)
    if not subject or len(subject) > MAX_SUBJECT_LENGTH:
        raise RemoteProtocolError(
            f"{what} must be 1..{MAX_SUBJECT_LENGTH} characters", ErrorCode.INVALID_SUBJECT
        )
    tokens = subject.split(".")
    if len(tokens) > MAX_TOKENS:
        raise RemoteProtocolError(f"{what} has more than {MAX_TOKENS} tokens", ErrorCode.INVALID_SUBJECT)
    return tokens


def validate_subject(subject: object) -> str:
    """Return ``subject`` if it is a valid publish subject, else raise
    :class:`RemoteProtocolError` with code INVALID_SUBJECT."""
    tokens = _check_common(subject, "subject")
    for tok in tokens:
        if not _TOKEN.fullmatch(tok):
            raise RemoteProtocolError(f"invalid subject {subject!r}", ErrorCode.INVALID_SUBJECT)
    return subject  # type: ignore[return-value]


def validate_pattern(pattern: object, *, stored: bool = False) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise.

    ``stored``: a pattern accepted earlier (a binding recovered from the store,
    or announced by the broker), checked without the other-brokers' wildcard
    rule, which came later: data an older version accepted still loads."""
    tokens = _check_common(pattern, "pattern")
    if not stored and ("/" in pattern or not _FOREIGN_WILDCARDS.isdisjoint(tokens)):  # type: ignore[operator]
        raise RemoteProtocolError(f"invalid pattern {pattern!r}: {WILDCARD_HINT}", ErrorCode.INVALID_SUBJECT)
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if tok == "*" or (tok == ">" and i == last):
            continue
        if not _TOKEN.fullmatch(tok):
            hint = f": {WILDCARD_HINT}" if "*" in tok or ">" in tok else ""
            raise RemoteProtocolError(f"invalid pattern {pattern!r}{hint}", ErrorCode.INVALID_SUBJECT)
    return pattern  # type: ignore[return-value]


def is_valid_subject(subject: object) -> bool:
    try:
        validate_subject(subject)
    except RemoteProtocolError:
        return False
    return True


def matches(pattern: str, subject: str) -> bool:
    """True if the (valid) ``subject`` matches the (valid) ``pattern``."""
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(stoks) > i
        if i >= len(stoks):
            return False
        if p != "*" and p != stoks[i]:
            return False
    return len(ptoks) == len(stoks)


# A node of the pattern trie: token -> child node; the key "" marks a pattern's end.
_Node: TypeAlias = dict[str, "_Node"]


class PatternSet:
    """A set of patterns answering "does any pattern match this subject?".

    A token trie, so a lookup costs the subject's depth, not the number of
    patterns. Used by the client to know which subjects are bound to
    durable targets, and by tests; the broker's router is richer.
    """

    __slots__ = ("_root", "_patterns")

    def __init__(self, patterns: list[str] | tuple[str, ...] = ()) -> None:
        self._root: _Node = {}
        self._patterns: set[str] = set()
        for p in patterns:
            self.add(p)

    def add(self, pattern: str) -> None:
        validate_pattern(pattern, stored=True)
        if pattern in self._patterns:
            return
        self._patterns.add(pattern)
        node = self._root
        for tok in pattern.split("."):
            node = node.setdefault(tok, {})
        node[""] = {}  # end marker: "" is never a valid token

    def __contains__(self, pattern: object) -> bool:
        return pattern in self._patterns

    def __len__(self) -> int:
        return len(self._patterns)

    def patterns(self) -> list[str]:
        return sorted(self._patterns)

    def match(self, subject: str) -> bool:
        return self._match(self._root, subject.split("."), 0)

    def _match(self, node: _Node, toks: list[str], i: int) -> bool:
        if i == len(toks):
            return "" in node
        full = node.get(">")
        if full is not None and "" in full:
            return True
        nxt = node.get(toks[i])
        if nxt is not None and self._match(nxt, toks, i + 1):
            return True
        star = node.get("*")
        return star is not None and self._match(star, toks, i + 1)
