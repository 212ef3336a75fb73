"""Compatibility of JSON Schema versions: may a reader read what a writer wrote?

The modes have Confluent Schema Registry's meaning for JSON Schema:

* ``backward``: the new version can read data written with the previous one
  (reader = new, writer = old): consumers upgrade first;
* ``forward``: the previous version can read data written with the new one
  (reader = old, writer = new): producers upgrade first;
* ``full``: both;
* ``*_transitive``: the same against every earlier version, not only the latest;
* ``none``: no check.

"Can read" means: every instance valid under the writer is valid under the
reader (the writer's language is a subset of the reader's). Deciding that
for all of JSON Schema is out of reach, so the checker is **sound and
conservative**: it understands the constructs that schemas of events use
(``type``, ``enum``/``const``, numeric and string bounds, ``pattern``,
``required``, ``properties`` with ``additionalProperties`` open, closed or a
schema, ``items``, array bounds, ``uniqueItems``, nested objects) and
accepts a change it cannot reason about (``$ref``, ``anyOf``, ``oneOf``,
``allOf``, ``not``, ``if``, ``patternProperties``, ...) only when that part
of the schema is unchanged. It never calls an incompatible pair compatible;
it may refuse a compatible one, and then says which construct it could not
prove. Annotations (``title``, ``description``, ``format``, ``default``,
``examples``, ``$comment``, ...) do not affect compatibility.

Every reason names the mode, the path inside the schema and the rule:
``backward: /properties/amount: type changed from number to string``.
"""

from __future__ import annotations

import math
from typing import Any, Final, Iterable

MODES: Final = ("none", "backward", "forward", "full",
                "backward_transitive", "forward_transitive", "full_transitive")
DEFAULT_MODE: Final = "backward"  # as Confluent's default: consumers upgrade first

# Keywords that only annotate: they never change which instances are valid.
ANNOTATIONS: Final = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$defs", "definitions", "title", "description", "default",
    "examples", "deprecated", "readOnly", "writeOnly", "format", "contentEncoding", "contentMediaType",
    "contentSchema", "$vocabulary",
})
# Keywords this checker reasons about.
UNDERSTOOD: Final = frozenset({
    "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "required", "properties", "additionalProperties",
    "minProperties", "maxProperties", "items", "minItems", "maxItems", "uniqueItems",
})
JSON_TYPES: Final = ("null", "boolean", "object", "array", "number", "string", "integer")


def pairs(mode: str) -> tuple[bool, bool, bool]:
    """(check backward, check forward, transitive) for ``mode``; ValueError if unknown."""
    if mode not in MODES:
        raise ValueError(f"unknown compatibility {mode!r} (known: {', '.join(MODES)})")
    base, _, trans = mode.partition("_")
    return base in ("backward", "full"), base in ("forward", "full"), bool(trans)


def check(history: list[Any], new: Any, mode: str) -> list[str]:
    """Why ``new`` may not follow ``history`` (the earlier versions, oldest first)
    under ``mode``: an empty list if it may. Non-transitive modes compare with the
    latest version only."""
    back, fwd, transitive = pairs(mode)
    if not history or not (back or fwd):
        return []
    base = mode.partition("_")[0]
    olds = list(enumerate(history, 1)) if transitive else [(len(history), history[-1])]
    reasons: list[str] = []
    for version, old in reversed(olds):
        against = f" (against version {version})" if transitive and len(olds) > 1 else ""
        if back:
            label = "backward" if base == "backward" else "full (backward)"
            reasons += [f"{label}: {r}{against}" for r in can_read(new, old)]
        if fwd:
            label = "forward" if base == "forward" else "full (forward)"
            reasons += [f"{label}: {r}{against}" for r in can_read(old, new)]
    return reasons


def can_read(reader: Any, writer: Any) -> list[str]:
    """Why some instance valid under ``writer`` may be invalid under ``reader``
    ("path: rule" strings); empty when every one is valid under it."""
    out: list[str] = []
    _subset(writer, reader, "", out)
    return out


# ------------------------------------------------------------------ the check


def _norm(s: Any) -> Any:
    """A schema as a dict, True (anything) or False (nothing)."""
    if s is True or s is False:
        return s
    if isinstance(s, dict):
        if not any(k not in ANNOTATIONS for k in s):
            return True
        return s
    return s  # malformed: caught by meta-validation before it gets here


def _strip(s: Any) -> Any:
    if isinstance(s, dict):
        return {k: _strip(v) for k, v in s.items() if k not in ANNOTATIONS}
    if isinstance(s, list):
        return [_strip(v) for v in s]
    return s


def _types(s: dict[str, Any]) -> set[str] | None:
    """The JSON types an instance may have (None: any)."""
    t = s.get("type")
    if t is None:
        values = _values(s)
        if values is None:
            return None
        return {_type_of(v) for v in values}
    ts = {t} if isinstance(t, str) else set(t)
    if "number" in ts:
        ts.add("integer")
    return ts


def _type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _values(s: dict[str, Any]) -> list[Any] | None:
    """The values ``enum``/``const`` allow (None: not restricted)."""
    if "const" in s:
        return [s["const"]]
    if "enum" in s and isinstance(s["enum"], list):
        return list(s["enum"])
    return None


def _show(ts: Iterable[str]) -> str:
    shown = sorted(set(ts) - ({"integer"} if "number" in set(ts) else set()))
    return shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"


def _same(a: Any, b: Any) -> bool:
    return _strip(a) == _strip(b)


def _subset(w: Any, r: Any, path: str, out: list[str]) -> None:
    """Append to ``out`` why an instance valid under ``w`` may be invalid under ``r``."""
    w, r = _norm(w), _norm(r)
    if r is True or w is False:
        return
    if r is False:
        out.append(f"{path or '/'}: no value is allowed any more (schema false)")
        return
    if w is True:
        w = {}
    if not isinstance(w, dict) or not isinstance(r, dict):
        if not _same(w, r):
            out.append(f"{path or '/'}: not a schema this checker understands, and it changed")
        return
    unknown = sorted((set(w) | set(r)) - UNDERSTOOD - ANNOTATIONS)
    changed = [k for k in unknown if not _same(w.get(k), r.get(k))]
    if changed:
        out.append(f"{path or '/'}: {', '.join(changed)} changed (only unchanged {', '.join(changed)} "
                   "can be proven compatible)")
        return
    if unknown and _same(w, r):
        return  # identical, whatever it holds
    n = len(out)
    _types_and_values(w, r, path, out)
    if len(out) > n:
        return  # the rest would only repeat it
    wt = _types(w)
    can = (lambda t: wt is None or t in wt)  # may a writer's instance be of JSON type t?
    if can("number") or can("integer"):
        _numbers(w, r, path, out)
    if can("string"):
        _strings(w, r, path, out)
    if can("array"):
        _arrays(w, r, path, out)
    if can("object"):
        _objects(w, r, path, out)


def _types_and_values(w: dict[str, Any], r: dict[str, Any], path: str, out: list[str]) -> None:
    where = path or "/"
    rt, wt = _types(r), _types(w)
    if rt is not None and "type" in r:
        if wt is None:
            out.append(f"{where}: type {_show(rt)} added where any type was allowed")
        elif not wt <= rt:
            extra = wt - rt
            if wt & rt:
                out.append(f"{where}: type narrowed from {_show(wt)} to {_show(rt)} (drops {_show(extra)})")
            else:
                out.append(f"{where}: type changed from {_show(wt)} to {_show(rt)}")
    rv = _values(r)
    if rv is not None:
        wv = _values(w)
        if wv is None:
            out.append(f"{where}: enum added where any value was allowed")
        else:
            missing = [v for v in wv if not any(_equal(v, x) for x in rv)]
            if missing:
                out.append(f"{where}: enum narrowed: {', '.join(map(repr, missing[:5]))} no longer allowed")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _bound(s: dict[str, Any], inclusive: str, exclusive: str, lower: bool) -> tuple[float, bool] | None:
    """The tightest bound of ``s`` in one direction: (value, exclusive?)."""
    best: tuple[float, bool] | None = None
    for key, excl in ((inclusive, False), (exclusive, True)):
        v = s.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            cand = (float(v), excl)
            if best is None:
                best = cand
            elif lower:
                best = cand if (cand[0] > best[0] or (cand[0] == best[0] and excl)) else best
            else:
                best = cand if (cand[0] < best[0] or (cand[0] == best[0] and excl)) else best
    return best


def _numbers(w: dict[str, Any], r: dict[str, Any], path: str, out: list[str]) -> None:
    where = path or "/"
    for lower, inc, exc, word in ((True, "minimum", "exclusiveMinimum", "minimum"),
                                  (False, "maximum", "exclusiveMaximum", "maximum")):
        rb = _bound(r, inc, exc, lower)
        if rb is None:
            continue
        wb = _bound(w, inc, exc, lower)
        if wb is None:
            out.append(f"{where}: {word} {rb[0]:g} added")
            continue
        tighter = (rb[0] > wb[0]) if lower else (rb[0] < wb[0])
        if tighter or (rb[0] == wb[0] and rb[1] and not wb[1]):
            out.append(f"{where}: {word} tightened from {wb[0]:g} to {rb[0]:g}"
                       f"{' (exclusive)' if rb[1] else ''}")
    rm = r.get("multipleOf")
    if isinstance(rm, (int, float)) and rm > 0:
        wm = w.get("multipleOf")
        ok = isinstance(wm, (int, float)) and wm > 0 and math.isclose(wm / rm, round(wm / rm))
        if not ok:
            out.append(f"{where}: multipleOf {rm:g} added or changed")


def _strings(w: dict[str, Any], r: dict[str, Any], path: str, out: list[str]) -> None:
    where = path or "/"
    _count_bounds(w, r, "minLength", "maxLength", where, out)
    if "pattern" in r and r.get("pattern") != w.get("pattern"):
        out.append(f"{where}: pattern {r['pattern']!r} added or changed")


def _count_bounds(w: dict[str, Any], r: dict[str, Any], lo: str, hi: str, where: str, out: list[str]) -> None:
    rl, wl = r.get(lo), w.get(lo, 0)
    if isinstance(rl, int) and rl > (wl if isinstance(wl, int) else 0):
        out.append(f"{where}: {lo} tightened from {wl} to {rl}")
    rh, wh = r.get(hi), w.get(hi)
    if isinstance(rh, int):
        if not isinstance(wh, int):
            out.append(f"{where}: {hi} {rh} added")
        elif rh < wh:
            out.append(f"{where}: {hi} tightened from {wh} to {rh}")


def _arrays(w: dict[str, Any], r: dict[str, Any], path: str, out: list[str]) -> None:
    where = path or "/"
    _count_bounds(w, r, "minItems", "maxItems", where, out)
    if r.get("uniqueItems") is True and w.get("uniqueItems") is not True:
        out.append(f"{where}: uniqueItems added")
    if "items" in r:
        _subset(w.get("items", True), r["items"], f"{path}/items", out)


def _objects(w: dict[str, Any], r: dict[str, Any], path: str, out: list[str]) -> None:
    where = path or "/"
    _count_bounds(w, r, "minProperties", "maxProperties", where, out)
    wreq = set(w.get("required", ()))
    for name in r.get("required", ()):
        if name not in wreq:
            out.append(f"{path}/properties/{_escape(name)}: required field added")
    wp: dict[str, Any] = w.get("properties", {}) or {}
    rp: dict[str, Any] = r.get("properties", {}) or {}
    wap = w.get("additionalProperties", True)
    rap = r.get("additionalProperties", True)
    for name in sorted(set(wp) | set(rp)):
        sub = f"{path}/properties/{_escape(name)}"
        if name in wp and name in rp:
            _subset(wp[name], rp[name], sub, out)
        elif name in wp:  # the reader no longer lists it: its additionalProperties must take it
            if _norm(rap) is False:
                out.append(f"{sub}: property removed while additionalProperties is false")
            else:
                _subset(wp[name], rap, sub, out)
        else:  # the reader lists a property the writer did not: the writer's extras must fit it
            if _norm(wap) is False:
                continue  # the writer never wrote it
            scratch: list[str] = []
            _subset(wap, rp[name], sub, scratch)
            if scratch:
                out.append(f"{sub}: property added while the writer's additionalProperties is open "
                           "(its data may hold this name with any value)")
    # names neither lists: the writer's extras against the reader's extras
    if _norm(rap) is not True:
        extras: list[str] = []
        _subset(wap, rap, f"{path}/additionalProperties", extras)
        if extras:
            if _norm(rap) is False:
                out.append(f"{path}/additionalProperties: additionalProperties closed (was open)")
            else:
                out.extend(extras)


def _escape(name: str) -> str:
    """A JSON Pointer reference token."""
    return str(name).replace("~", "~0").replace("/", "~1")
