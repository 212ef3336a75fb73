"""Content filters: EventBridge-style patterns over a message's headers and,
where a schema binds its subject, the top-level fields of its payload.

A filter is a map. Each key names a header and holds a list of conditions
(any-of); the key ``"data"`` holds a map of payload field -> list of
conditions the same way. Every key must match (AND)::

    {"region": [{"prefix": "eu-"}],                  # header "region"
     "data": {"amount": [{"numeric": [">", 100]}],   # payload field "amount"
              "status": ["placed", "paid"]}}

Conditions: an exact value (string, number, bool, null); ``{"prefix": s}``,
``{"suffix": s}``; ``{"anything-but": v | [v, ...] | {"prefix": s}}``;
``{"numeric": [">", 100]}`` or ``[">=", 0, "<", 10]``; ``{"exists": bool}``.
A missing key matches only ``{"exists": false}``. Header values are text (or
bytes, read as latin-1, or ints): a numeric condition reads a text header as
a number, an exact number matches a header holding that number.

:func:`compile_filter` checks a filter and compiles it once into predicates
(no parsing per message); a bad filter raises :class:`FilterError` naming the
key and the operator. Both the client (early error) and the broker use it.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Callable, Final

#: The key whose map filters payload fields instead of headers.
DATA_KEY: Final = "data"
#: Keys (headers plus payload fields) one filter may name, and conditions per key: a
#: filter is evaluated per message for every subscription holding it, so it stays small.
MAX_KEYS: Final = 32
MAX_CONDITIONS: Final = 64
#: Bytes of a filter's canonical JSON: it travels in SUB frames and queue/stream configs.
MAX_FILTER_BYTES: Final = 16 * 1024
NUMERIC_OPS: Final = ("<", "<=", "=", ">", ">=")
OPERATORS: Final = ("prefix", "suffix", "anything-but", "numeric", "exists")

_COMPARE: Final = {"<": operator.lt, "<=": operator.le, "=": operator.eq, ">": operator.gt, ">=": operator.ge}
_NO_FIELDS: Final[dict[str, Any]] = {}

MISSING: Final[Any] = object()  # the value of a key the message does not have

Test = Callable[[Any], bool]


class FilterError(ValueError):
    """A filter broke the rules above; the message names the key and the operator."""


def _num(v: Any) -> float | None:
    """``v`` as a number: ints and floats (not bools), numeric text (headers), else None."""
    t = type(v)
    if t is int or t is float:
        return v  # type: ignore[no-any-return]
    if t is str or t is bytes:
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _is_number(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v


def _exact(value: Any) -> Test:
    if type(value) is str:
        enc = value.encode("latin-1", "replace")
        return lambda v: v == value or (type(v) is bytes and v == enc)
    if _is_number(value):
        def number(v: Any) -> bool:
            if type(v) is bool:
                return False
            n = _num(v)
            return n is not None and n == value
        return number
    if type(value) is bool:
        return lambda v: v is value
    return lambda v: v is None  # null


def _numeric(key: str, spec: Any) -> Test:
    where = f"filter key {key!r}: operator 'numeric'"
    if type(spec) is not list or len(spec) not in (2, 4):
        raise FilterError(f"{where} takes [op, number] or [op, number, op, number], not {spec!r}")
    bounds: list[tuple[str, float]] = []
    for i in range(0, len(spec), 2):
        op, n = spec[i], spec[i + 1]
        if op not in NUMERIC_OPS:
            raise FilterError(f"{where}: unknown comparison {op!r} (known: {', '.join(NUMERIC_OPS)})")
        if not _is_number(n) or type(n) is bool:
            raise FilterError(f"{where}: {op!r} needs a number, not {n!r}")
        bounds.append((op, float(n)))
    if len(bounds) == 2 and ("=" in (bounds[0][0], bounds[1][0])):
        raise FilterError(f"{where}: '=' stands alone ([\"=\", n])")
    cmps = [(_COMPARE[op], n) for op, n in bounds]

    if len(cmps) == 1:
        c0, n0 = cmps[0]

        def one(v: Any) -> bool:
            t = type(v)
            if t is int or t is float:
                return c0(v, n0)  # type: ignore[no-any-return]
            if t is str or t is bytes:
                x = _num(v)
                return x is not None and c0(x, n0)
            return False  # missing, bool, null, containers
        return one
    (c1, n1), (c2, n2) = cmps

    def two(v: Any) -> bool:
        t = type(v)
        if t is int or t is float:
            return c1(v, n1) and c2(v, n2)  # type: ignore[no-any-return]
        if t is str or t is bytes:
            x = _num(v)
            return x is not None and c1(x, n1) and c2(x, n2)
        return False
    return two


def _string_arg(key: str, op: str, arg: Any) -> str:
    if type(arg) is not str:
        raise FilterError(f"filter key {key!r}: operator {op!r} needs a string, not {arg!r}")
    return arg


def _condition(key: str, cond: Any) -> Test:
    if cond is None or type(cond) in (str, bool) or _is_number(cond):
        t = _exact(cond)
        return lambda v: v is not MISSING and t(v)
    if type(cond) is not dict:
        raise FilterError(f"filter key {key!r}: a condition is a value (string, number, bool, null) or a "
                          f"one-key map ({', '.join(OPERATORS)}), not {cond!r}")
    if len(cond) != 1:
        raise FilterError(f"filter key {key!r}: a condition map has exactly one operator, not {sorted(cond)!r}")
    op, arg = next(iter(cond.items()))
    if op == "prefix":
        p = _string_arg(key, op, arg)
        pb = p.encode("latin-1", "replace")

        def prefix(v: Any) -> bool:
            t = type(v)
            if t is str:
                return v.startswith(p)  # type: ignore[no-any-return]
            return t is bytes and v.startswith(pb)
        return prefix
    if op == "suffix":
        sfx = _string_arg(key, op, arg)
        sb = sfx.encode("latin-1", "replace")

        def suffix(v: Any) -> bool:
            t = type(v)
            if t is str:
                return v.endswith(sfx)  # type: ignore[no-any-return]
            return t is bytes and v.endswith(sb)
        return suffix
    if op == "exists":
        if type(arg) is not bool:
            raise FilterError(f"filter key {key!r}: operator 'exists' takes true or false, not {arg!r}")
        return (lambda v: v is not MISSING) if arg else (lambda v: v is MISSING)
    if op == "numeric":
        return _numeric(key, arg)
    if op == "anything-but":
        if type(arg) is dict:
            if list(arg) != ["prefix"]:
                raise FilterError(f"filter key {key!r}: operator 'anything-but' takes a value, a list of "
                                  f"values or {{\"prefix\": s}}, not {arg!r}")
            inner = _condition(key, arg)
        else:
            values = arg if type(arg) is list else [arg]
            if not values:
                raise FilterError(f"filter key {key!r}: operator 'anything-but' needs at least one value")
            for x in values:
                if not (x is None or type(x) in (str, bool) or _is_number(x)):
                    raise FilterError(f"filter key {key!r}: operator 'anything-but' takes plain values "
                                      f"(string, number, bool, null), not {x!r}")
            inner = _any([_condition(key, x) for x in values])
        return lambda v: v is not MISSING and not inner(v)
    raise FilterError(f"filter key {key!r}: unknown operator {op!r} (known: {', '.join(OPERATORS)})")


def _any(tests: list[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    return lambda v: any(t(v) for t in tests)


def _key_test(key: str, conds: Any) -> Test:
    if type(conds) is not list:
        raise FilterError(f"filter key {key!r}: conditions are a list (any of them matches), not {conds!r}")
    if not conds:
        raise FilterError(f"filter key {key!r}: the list of conditions is empty (it would match nothing)")
    if len(conds) > MAX_CONDITIONS:
        raise FilterError(f"filter key {key!r}: {len(conds)} conditions; at most {MAX_CONDITIONS}")
    if all(type(c) is str for c in conds):  # the common case: one set lookup
        accepted = frozenset(conds) | frozenset(c.encode("latin-1", "replace") for c in conds)
        return lambda v: (type(v) is str or type(v) is bytes) and v in accepted
    return _any([_condition(key, c) for c in conds])


def _compile_map(spec: Any, where: str, count: list[int]) -> list[tuple[str, Test]]:
    if type(spec) is not dict:
        raise FilterError(f"{where} must be a map of key -> list of conditions, not {spec!r}")
    out: list[tuple[str, Test]] = []
    for key, conds in spec.items():
        if type(key) is not str or not key:
            raise FilterError(f"{where}: keys are non-empty strings, not {key!r}")
        count[0] += 1
        if count[0] > MAX_KEYS:
            raise FilterError(f"a filter names at most {MAX_KEYS} keys")
        out.append((key, _key_test(key, conds)))
    return out


class Filter:
    """A compiled filter. ``header_tests``/``data_tests`` are ``(key, test)``
    pairs; ``needs_data`` is True when some condition reads the payload."""

    __slots__ = ("spec", "header_tests", "data_tests", "needs_data", "__weakref__")

    def __init__(self, spec: dict[str, Any], header_tests: list[tuple[str, Test]],
                 data_tests: list[tuple[str, Test]]) -> None:
        self.spec = spec
        self.header_tests = tuple(header_tests)
        self.data_tests = tuple(data_tests)
        self.needs_data = bool(data_tests)

    def matches(self, headers: dict[str, Any] | None, data: Any = MISSING) -> bool:
        """Does a message with ``headers`` (and decoded payload ``data``; None or MISSING
        when it was not or could not be decoded, or a schema does not bind its subject) match?"""
        if self.header_tests:
            h = headers or _NO_FIELDS
            for key, test in self.header_tests:
                if not test(h.get(key, MISSING)):
                    return False
        if self.data_tests:
            d = data if type(data) is dict else _NO_FIELDS
            for key, test in self.data_tests:
                if not test(d.get(key, MISSING)):
                    return False
        return True

    def __repr__(self) -> str:
        return f"Filter({canonical(self.spec)})"


def canonical(spec: dict[str, Any]) -> str:
    """A filter's canonical JSON text (sorted keys): equal filters give equal text."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def compile_filter(spec: Any) -> Filter:
    """Check ``spec`` and compile it. Raises FilterError (the key and operator at fault)."""
    if type(spec) is not dict:
        raise FilterError(f"a filter is a map of header (or \"data\") -> list of conditions, not {spec!r}")
    if not spec:
        raise FilterError("a filter is a non-empty map (leave it out to receive everything)")
    try:
        text = canonical(spec)
    except (TypeError, ValueError) as exc:
        raise FilterError(f"a filter holds only JSON values: {exc}") from None
    if len(text) > MAX_FILTER_BYTES:
        raise FilterError(f"a filter's JSON is {len(text)} bytes; at most {MAX_FILTER_BYTES}")
    count = [0]
    headers = {k: v for k, v in spec.items() if k != DATA_KEY}
    header_tests = _compile_map(headers, "a filter", count)
    data_tests: list[tuple[str, Test]] = []
    if DATA_KEY in spec:
        data = spec[DATA_KEY]
        if type(data) is not dict or not data:
            raise FilterError(f"filter key {DATA_KEY!r} holds a non-empty map of payload field -> list of "
                              f"conditions, not {data!r}")
        data_tests = _compile_map(data, f"filter key {DATA_KEY!r}", count)
    return Filter(spec, header_tests, data_tests)
