"""Who may do what: per-user allow and deny patterns for four actions.

Actions and the names they are checked against:

* ``publish``   -- the subject of each published message (a literal subject).
* ``subscribe`` -- the subscription pattern of a SUB (may contain ``*``/``>``).
  A request's reply subject is just a subject: the requester needs
  ``subscribe`` on its inbox, the responder ``publish`` on it.
* ``consume``   -- the queue or stream name of a CONSUME; ack/nack/commit of a
  consumer are covered by the check made when it was created (the dispatcher
  may re-check with the same name; the answer is cached and costs ~0.1 µs).
  Joining a stream's consumer group (and so committing its offsets) is
  checked as ``STREAM/GROUP`` (:meth:`Permissions.allows_group`): a consume
  pattern holding a ``/`` is a group pattern ``S/G`` (S a stream pattern, G a
  group pattern, split at the last ``/``; group names hold no ``/``) and
  names groups only. A pattern without ``/`` names queues and streams; as an
  allow pattern it covers the groups of the streams it covers only when it
  ends in ``>`` (everything below its prefix, groups included: ``>`` still
  means everything); as a deny pattern it covers every group of every
  stream it covers (deny stays the broader one). ``consume = ["orders"]``
  reads stream ``orders`` but joins none of its groups; ``orders/billing``
  joins one group, ``orders/>`` any.
* Schemas (``schema.*`` calls) are objects too: registering, checking or reading a
  schema needs ``admin`` on its name; binding one to a subject pattern needs
  ``admin`` on the schema, ``publish`` on the pattern (a binding decides what may
  be published there) and ``admin`` on its dead-letter queue; unbinding needs
  ``publish`` on the pattern; listing schemas or bindings needs admin on ``>``.
* ``admin``     -- the object name of a declare/delete/purge/info/dlq/trim call
  (not ``dlq.list``, which returns payloads and so needs ``consume``; a
  redrive also needs rights on its destinations, :func:`redrive_needs`).
  Calls that name no single object (``stats``, ``queue.list``,
  ``stream.list``) are checked as admin over the pattern ``>`` ("every
  name"), so by the wildcard rule below they need ``admin = [">"]`` and no
  admin deny at all. See :func:`needs_for_call` for the whole table.

Queue and stream names are dot-separated tokens like subjects, so one
pattern language serves all four actions (protocol.subjects: ``*`` is
exactly one token, ``>`` one or more trailing tokens).

The rule: a name is allowed iff some allow pattern *covers* it and no deny
pattern *overlaps* it. For a literal name "covers" and "overlaps" are both
plain matching, so this is the usual "deny beats allow, default deny". For
a wildcard name (a SUB pattern, or ``>`` for global admin calls) it means:
every subject the pattern can match must be allowed, and none may be denied.
Example: allow ``orders.>``, deny ``orders.secret.>``: SUB ``orders.eu.*``
is allowed; SUB ``orders.*.created`` and SUB ``orders.>`` are refused,
because they could match ``orders.secret.created``. (NATS instead accepts
such a subscription and filters each delivery; refusing up front keeps the
delivery hot path free of permission checks.)

Binding is subscribing: ``queue.declare``/``stream.declare`` with ``bind``
patterns also need ``subscribe`` on each bound pattern, otherwise an admin
of ``jobs.>`` could declare a queue bound to ``payments.>`` and read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Iterable, Mapping

from tidings.protocol.errors import RemoteProtocolError
from tidings.protocol.subjects import validate_pattern

ACTIONS: Final = ("publish", "subscribe", "consume", "admin")
ALL_NAMES: Final = ">"  # the name global admin calls are checked against: covered only by ">"
CACHE_SIZE: Final = 4096  # answers kept per action; a flood of distinct subjects just recomputes


def covers(allow: str, pattern: str) -> bool:
    """True if every subject matched by ``pattern`` is matched by ``allow``.

    Both are valid patterns (a literal subject is a pattern with no
    wildcards). ``covers(p, s)`` equals ``matches(p, s)`` for a literal ``s``.
    """
    a = allow.split(".")
    s = pattern.split(".")
    ns = len(s)
    for i, tok in enumerate(a):
        if tok == ">":
            return ns > i  # ">" takes one or more tokens; s has at least one left
        if i >= ns:
            return False
        st = s[i]
        if st == ">":
            return False  # s may run longer than allow's fixed length
        if tok != "*" and tok != st:
            return False  # a literal is covered only by itself ("*" in s is wider)
    return len(a) == ns


def overlaps(p: str, q: str) -> bool:
    """True if some subject is matched by both patterns ``p`` and ``q``."""
    a = p.split(".")
    b = q.split(".")
    na, nb = len(a), len(b)
    for i in range(max(na, nb)):
        ta = a[i] if i < na else None
        tb = b[i] if i < nb else None
        if ta == ">":
            return tb is not None
        if tb == ">":
            return ta is not None
        if ta is None or tb is None:
            return False
        if ta != "*" and tb != "*" and ta != tb:
            return False
    return True


def _names(action: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The patterns of ``action`` that name objects (not stream groups)."""
    return tuple(p for p in patterns if action != "consume" or "/" not in p)


def _has_wildcard(name: str) -> bool:
    return "*" in name or ">" in name


class Permissions:
    """Immutable allow/deny pattern lists for the four actions, with a
    bounded answer cache (the only mutable part; owned by the loop thread).

    ``allows(action, name)`` answers for a literal name or a wildcard
    pattern by the module's rule. Unknown actions are never allowed.
    ``unrestricted`` is True only for :data:`ALLOW_ALL`, so a hot loop may
    skip the call entirely.
    """

    __slots__ = ("_allow", "_deny", "_names_allow", "_names_deny", "_groups_allow", "_groups_deny",
                 "_cache", "_group_cache", "_cache_size", "unrestricted")

    def __init__(self, allow: Mapping[str, Iterable[str]] | None = None,
                 deny: Mapping[str, Iterable[str]] | None = None, *,
                 cache_size: int = CACHE_SIZE, _unrestricted: bool = False) -> None:
        """Raise ValueError for an unknown action or an invalid pattern."""
        self._allow = self._patterns(allow or {}, "allow")
        self._deny = self._patterns(deny or {}, "deny")
        # consume patterns with a "/" name stream groups only; the rest name objects
        self._names_allow = {a: _names(a, ps) for a, ps in self._allow.items()}
        self._names_deny = {a: _names(a, ps) for a, ps in self._deny.items()}
        self._groups_allow = tuple(p.rsplit("/", 1) for p in self._allow["consume"] if "/" in p)
        self._groups_deny = tuple(p.rsplit("/", 1) for p in self._deny["consume"] if "/" in p)
        self._cache: dict[str, dict[str, bool]] = {a: {} for a in ACTIONS}
        self._group_cache: dict[str, bool] = {}
        self._cache_size = cache_size
        self.unrestricted = _unrestricted

    @staticmethod
    def _patterns(table: Mapping[str, Iterable[str]], what: str) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {a: () for a in ACTIONS}
        for action, patterns in table.items():
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r} in {what} list (known: {', '.join(ACTIONS)})")
            if isinstance(patterns, str):
                raise ValueError(f"{what} patterns for {action!r} must be a list of strings, not a string")
            checked = []
            for p in patterns:
                try:
                    if action == "consume" and isinstance(p, str) and "/" in p:
                        stream, group = p.rsplit("/", 1)  # a group pattern STREAM/GROUP
                        validate_pattern(stream)
                        validate_pattern(group)
                        checked.append(p)
                    else:
                        checked.append(validate_pattern(p))
                except RemoteProtocolError as exc:
                    raise ValueError(f"{what} pattern for {action!r}: {exc.message}") from None
            out[action] = tuple(dict.fromkeys(checked))
        return out

    def allows(self, action: str, name: str) -> bool:
        """True if ``action`` on ``name`` (subject, pattern or object name) is allowed."""
        cache = self._cache.get(action)
        if cache is None:
            return False
        hit = cache.get(name)
        if hit is not None:
            return hit
        answer = self._decide(action, name)
        if len(cache) >= self._cache_size:
            cache.clear()  # simple and O(1) amortised; eviction order does not matter for correctness
        cache[name] = answer
        return answer

    def _decide(self, action: str, name: str) -> bool:
        allow, deny = self._names_allow[action], self._names_deny[action]
        if _has_wildcard(name):
            return (any(covers(p, name) for p in allow)
                    and not any(overlaps(p, name) for p in deny))
        # a literal name: covers() and overlaps() both reduce to matching, so deny uses covers()
        return (any(covers(p, name) for p in allow)
                and not any(covers(p, name) for p in deny))

    def allows_group(self, stream: str, group: str) -> bool:
        """True if this user may join consumer group ``group`` of ``stream``
        (both literal names) and so commit that group's offsets."""
        cache = self._group_cache
        key = f"{stream}/{group}"  # unambiguous: group names hold no "/" (checked before joining)
        hit = cache.get(key)
        if hit is not None:
            return hit
        answer = "/" not in group and (
            (any(covers(s, stream) and covers(g, group) for s, g in self._groups_allow)
             or any(p.endswith(">") and covers(p, stream) for p in self._names_allow["consume"]))
            and not any(covers(s, stream) and covers(g, group) for s, g in self._groups_deny)
            and not any(covers(p, stream) for p in self._names_deny["consume"]))
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[key] = answer
        return answer

    def check_call(self, method: str, args: Mapping[str, Any]) -> Need | None:
        """Return the first unmet :class:`Need` of a CALL, or None if allowed."""
        return self.first_unmet(needs_for_call(method, args))

    def first_unmet(self, needs: Iterable[Need]) -> Need | None:
        """Return the first of ``needs`` this user lacks, or None."""
        if self.unrestricted:
            return None
        for need in needs:
            if not self.allows(need.action, need.name):
                return need
        return None

    def describe(self) -> dict[str, dict[str, list[str]]]:
        """The pattern lists, for `stats`/debugging (no secrets in here)."""
        return {"allow": {a: list(p) for a, p in self._allow.items() if p},
                "deny": {a: list(p) for a, p in self._deny.items() if p}}


class _AllowAll(Permissions):
    __slots__ = ()

    def allows(self, action: str, name: str) -> bool:
        return True

    def allows_group(self, stream: str, group: str) -> bool:
        return True


ALLOW_ALL: Final[Permissions] = _AllowAll(_unrestricted=True)  # no-users mode; immutable (never caches)


def from_config(table: Mapping[str, Any]) -> Permissions:
    """Build Permissions from a user's ``[users.NAME.permissions]`` table.

    Keys are ``<action>`` (allow) and ``<action>_deny``; each value is a
    list of patterns. Raises ValueError naming the bad key or pattern.
    """
    allow: dict[str, list[str]] = {}
    deny: dict[str, list[str]] = {}
    for key, value in table.items():
        action, _, suffix = key.partition("_")
        if action not in ACTIONS or suffix not in ("", "deny"):
            known = ", ".join(f"{a}, {a}_deny" for a in ACTIONS)
            raise ValueError(f"unknown permission key {key!r} (known: {known})")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"permission {key!r} must be a list of pattern strings")
        (deny if suffix else allow)[action] = value
    return Permissions(allow, deny)


# ------------------------------------------------------------- admin calls


@dataclass(frozen=True, slots=True)
class Need:
    """One permission a request needs: ``action`` on ``name`` (maybe a pattern)."""

    action: str
    name: str


OPEN_CALLS: Final = frozenset({"server.info"})  # harmless (name, version, pid): any authenticated user
GLOBAL_CALLS: Final = frozenset({"stats", "queue.list", "stream.list",  # reveal every object: admin on ">"
                                  "schema.list", "schema.bindings"})
OBJECT_CALLS: Final[dict[str, tuple[str, ...]]] = {  # method -> argument keys naming objects
    "queue.declare": ("name",),
    "queue.delete": ("name",),
    "queue.purge": ("name",),
    "queue.info": ("name",),
    "queue.peek": ("name",),
    "dlq.list": ("name",),
    "dlq.count": ("name",),
    "dlq.purge": ("name",),
    "dlq.redrive": ("name", "to"),
    "stream.declare": ("name",),
    "stream.delete": ("name",),
    "stream.info": ("name",),
    "stream.trim": ("name",),
    "schema.register": ("name",),
    "schema.check": ("name",),
    "schema.get": ("name",),
    "schema.bind": ("name", "dead_letter"),
    "stream.update": ("name",),
    "stream.groups": ("name",),
    "stream.group_delete": ("name",),
    "queue.update": ("name",),
}
# Schema bindings govern what may be published on a pattern: they need publish on it too.
PATTERN_CALLS: Final = frozenset({"schema.bind", "schema.unbind"})
DECLARE_CALLS: Final = frozenset({"queue.declare", "stream.declare"})  # may create a DLQ; "bind" = subscribe
# Calls that return message payloads: reading messages is what consume grants, so
# they need consume on the name, not admin (admin manages a queue, it does not read it).
READ_CALLS: Final = frozenset({"dlq.list", "queue.peek"})
DLQ_SUFFIX: Final = ".dlq"  # the default dead-letter name is "<name>.dlq" (broker/durable/queue_settings.py)


def needs_for_call(method: str, args: Mapping[str, Any]) -> list[Need]:
    """The permissions a CALL needs, from its method and arguments.

    Unknown methods need admin on ``>`` (fail closed: a new call is
    admin-only until it is added here). A missing or non-string name
    argument is skipped: the handler will reject the call as invalid anyway
    and reveal nothing. A declare needs admin on its dead-letter queue
    too (``dead_letter``, default ``<name>.dlq``, also for a name that
    itself ends in ``.dlq``), since it may create it, and ``subscribe`` on
    each ``bind`` pattern. ``dlq.list`` returns payloads: it needs
    ``consume``, not admin. ``dlq.redrive`` needs admin on the DLQ and on the
    ``to`` queue here; its further needs depend on which queues exist and
    are added by the server (:func:`redrive_needs`).
    """
    if method in OPEN_CALLS:
        return []
    if method in PATTERN_CALLS:
        pattern = args.get("pattern")
        needs = [Need("publish", pattern)] if isinstance(pattern, str) and pattern else []
        if method == "schema.unbind":
            return needs
        return [*needs, *(Need("admin", args[k]) for k in OBJECT_CALLS[method]
                          if isinstance(args.get(k), str) and args[k])]
    keys = OBJECT_CALLS.get(method)
    if keys is None:
        return [Need("admin", ALL_NAMES)]
    action = "consume" if method in READ_CALLS else "admin"
    needs = [Need(action, args[k]) for k in keys if isinstance(args.get(k), str) and args[k]]
    if method in DECLARE_CALLS:
        name = args.get("name")
        dl = args.get("dead_letter")
        if method == "queue.declare" and args.get("is_dlq"):
            pass  # a DLQ itself gets no dead-letter queue (broker/durable/queue_settings.py)
        elif isinstance(dl, str) and dl:
            needs.append(Need("admin", dl))
        elif isinstance(name, str) and name:
            # Exactly the name the broker will create: "x.dlq" gets "x.dlq.dlq", which
            # must not be created by someone without admin on that name (squatting).
            needs.append(Need("admin", name + DLQ_SUFFIX))
        bind = args.get("bind")
        if isinstance(bind, str):
            bind = [bind]
        if isinstance(bind, (list, tuple)):
            # an entry is a pattern or {"subject": pattern, "match": filter}: a filter narrows what is
            # stored, never what it needs
            pats = (p.get("subject") if isinstance(p, dict) else p for p in bind)
            needs.extend(Need("subscribe", p) for p in pats if isinstance(p, str) and p)
    return needs


def redrive_needs(destinations: Iterable[tuple[str, Iterable[str]]]) -> list[Need]:
    """What ``dlq.redrive`` needs beyond admin on the DLQ, for each destination
    queue ``(name, bind patterns)`` it may move messages into (the ``to``
    queue, or every queue that dead-letters into the DLQ): redriving into a
    queue is publishing into it, so ``admin`` on the queue and ``publish`` on
    every pattern it is bound to (by the wildcard rule: on every subject it
    can match). A user confined to ``t1.>`` thus cannot redrive into
    ``pay.jobs``, whatever the messages' headers say."""
    needs: list[Need] = []
    for name, bind in destinations:
        needs.append(Need("admin", name))
        needs.extend(Need("publish", p) for p in bind)
    return needs
