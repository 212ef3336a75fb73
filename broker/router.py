"""Subject routing: a token trie of subscriptions with a match cache.

A publish looks its subject up once; the answer (plain subscriptions and
queue groups) is cached per subject until the subscription set changes,
so the hot path is one dict lookup. Matching walks the trie, so its cost
follows the subject's depth, not the number of subscriptions.
"""

from __future__ import annotations

from typing import Any, Callable, Final, Generic, Iterable, TypeVar

CACHE_LIMIT: Final = 65_536  # distinct subjects remembered; cleared whole when exceeded (bounded memory)

T = TypeVar("T")


class Group(Generic[T]):
    """Members of one queue group on one pattern; each message goes to one.

    ``filtered`` counts members carrying a content filter (a non-None ``flt``):
    while it is 0 the publish path calls :meth:`pick`, else :meth:`pick_matching`.

    ``remote`` holds the other brokers of a cluster that have members of this group
    (items with a true ``remote`` attribute, broker/cluster/mesh.py): a local member
    is always preferred, and only a group without one picks a remote broker
    (round-robin), which then picks one of its own members."""

    __slots__ = ("name", "members", "next", "filtered", "remote", "rnext")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[T] = []
        self.next = 0
        self.filtered = 0
        self.remote: list[T] = []
        self.rnext = 0

    def pick_remote(self) -> T | None:
        """The next remote broker with members (round-robin), None if there is none."""
        remote = self.remote
        if not remote:
            return None
        i = self.rnext
        if i >= len(remote):
            i = 0
        self.rnext = i + 1
        return remote[i]

    def pick_matching(self, ok: Callable[[Any], bool]) -> T | None:
        """The next member (round-robin) without a filter or whose filter ``ok`` accepts;
        None if no member's filter accepts the message."""
        members = self.members
        n = len(members)
        i = self.next
        for _ in range(n):
            if i >= n:
                i = 0
            m = members[i]
            i += 1
            f = getattr(m, "flt", None)
            if f is None or ok(f):
                self.next = i
                return m
        return self.pick_remote()

    def pick(self) -> T:
        members = self.members
        if not members:
            return self.pick_remote()  # type: ignore[return-value]  # a group is never empty
        i = self.next
        if i >= len(members):
            i = 0
        self.next = i + 1
        return members[i]


class _Node(Generic[T]):
    __slots__ = ("children", "plain", "groups")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.plain: list[T] = []
        self.groups: dict[str, Group[T]] = {}


Match = tuple[list[Any], list[Group[Any]]]
EMPTY: Final[Match] = ([], [])


class Router(Generic[T]):
    """Maps subjects to the items (subscriptions, bindings) whose patterns match.

    Items are registered with ``add(pattern, item, group=None)`` and removed
    with ``remove``. ``match(subject)`` returns ``(plain, groups)``; callers
    must treat both lists as read-only (they are shared by the cache).
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._cache: dict[str, Match] = {}
        self.count = 0

    def add(self, pattern: str, item: T, group: str | None = None) -> None:
        node = self._root
        for tok in pattern.split("."):
            nxt = node.children.get(tok)
            if nxt is None:
                nxt = node.children[tok] = _Node()
            node = nxt
        if group is None:
            node.plain.append(item)
        else:
            g = node.groups.get(group)
            if g is None:
                g = node.groups[group] = Group(group)
            if getattr(item, "remote", False):
                g.remote.append(item)
            else:
                g.members.append(item)
            if getattr(item, "flt", None) is not None:
                g.filtered += 1
        self.count += 1
        self._cache.clear()

    def remove(self, pattern: str, item: T, group: str | None = None) -> bool:
        """Remove one registration; prune empty nodes. Returns False if absent."""
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for tok in pattern.split("."):
            nxt = node.children.get(tok)
            if nxt is None:
                return False
            path.append((node, tok))
            node = nxt
        try:
            if group is None:
                node.plain.remove(item)
            else:
                g = node.groups[group]
                (g.remote if getattr(item, "remote", False) else g.members).remove(item)
                if getattr(item, "flt", None) is not None:
                    g.filtered -= 1
                if not g.members and not g.remote:
                    del node.groups[group]
        except (ValueError, KeyError):
            return False
        self.count -= 1
        self._cache.clear()
        for parent, tok in reversed(path):
            child = parent.children[tok]
            if child.children or child.plain or child.groups:
                break
            del parent.children[tok]
        return True

    def group(self, pattern: str, name: str) -> Group[T] | None:
        """The queue group ``name`` registered on exactly ``pattern``, if any."""
        node = self._root
        for tok in pattern.split("."):
            nxt = node.children.get(tok)
            if nxt is None:
                return None
            node = nxt
        return node.groups.get(name)

    def match(self, subject: str) -> Match:
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        plain: list[T] = []
        groups: list[Group[T]] = []
        self._walk(self._root, subject.split("."), 0, plain, groups)
        result: Match = (plain, groups) if (plain or groups) else EMPTY
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[subject] = result
        return result

    def _walk(self, node: _Node[T], toks: list[str], i: int, plain: list[T], groups: list[Group[T]]) -> None:
        if i == len(toks):
            if node.plain:
                plain.extend(node.plain)
            if node.groups:
                groups.extend(node.groups.values())
            return
        children = node.children
        full = children.get(">")
        if full is not None:
            plain.extend(full.plain)
            groups.extend(full.groups.values())
        nxt = children.get(toks[i])
        if nxt is not None:
            self._walk(nxt, toks, i + 1, plain, groups)
        star = children.get("*")
        if star is not None:
            self._walk(star, toks, i + 1, plain, groups)

    def items(self) -> Iterable[tuple[str, T, str | None]]:
        """Every registration as (pattern, item, group)."""
        stack: list[tuple[_Node[T], list[str]]] = [(self._root, [])]
        while stack:
            node, toks = stack.pop()
            pat = ".".join(toks)
            for it in node.plain:
                yield pat, it, None
            for g in node.groups.values():
                for it in g.members:
                    yield pat, it, g.name
                for it in g.remote:
                    yield pat, it, g.name
            for tok, child in node.children.items():
                stack.append((child, toks + [tok]))
