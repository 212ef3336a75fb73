"""The schema registry: named, numbered JSON Schema versions, subject bindings,
and the check every publish to a bound subject passes at the door.

State (owned by the event loop thread): every version of every schema, each
compiled once (validator.py) when it is registered or loaded at start, and
the bindings (subject pattern -> schema name, what to do with an invalid
message). Both are stored through the durable store's schema operations
(PutSchema, PutSchemaBinding, DeleteSchemaBinding) before they take effect,
so they survive restarts and are in every backup.

The publish path asks :meth:`SchemaRegistry.screen` about each message only
while some binding exists (``active``); the answer per subject is memoised,
so a message to an unbound subject costs one dict lookup. A message to a
bound subject is decoded by its ``content-type`` and validated against the
version it names (``tidings-schema-version`` header, or the trailing number
of its CloudEvents ``ce-dataschema``) or else the latest. A valid one is
stamped with ``tidings-schema`` and ``tidings-schema-version`` (what it was
validated against) and goes on; an invalid one is refused, or turned into a
dead-letter entry for the binding's queue.

Where several bindings match one subject, the most specific wins: the one
with more literal tokens, then the longer pattern, then the pattern's text.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final

import anyio

from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V
from tidings.protocol.codec import MAX_HEADERS
from tidings.protocol.errors import ErrorCode, RemoteProtocolError
from tidings.protocol.filters import MISSING
from tidings.protocol.subjects import validate_pattern

from tidings.broker.durable.settings import validate_name
from tidings.broker.durable.store.base import DeleteSchemaBinding, PutSchema, PutSchemaBinding, Store
from tidings.broker.router import Router
from tidings.broker.schemas import compat
from tidings.broker.schemas.validator import (
    SchemaDocumentError,
    Violation,
    compile_document,
    decode,
    first_violation,
    loads,
    media_type,
)

log = logging.getLogger(__name__)

#: Subjects whose binding (or its absence) is remembered; cleared whole when exceeded
#: (bounded memory under a flood of distinct subjects) and on every binding change.
SUBJECT_MEMO: Final = 65_536
#: Versions one schema may have: a transitive check compares with every one of them.
MAX_VERSIONS: Final = 1_000
#: Schema names and bindings the broker keeps: all are compiled/held in memory.
MAX_SCHEMAS: Final = 10_000
MAX_BINDINGS: Final = 10_000
#: Reasons an incompatible registration lists at most (the rest are counted).
MAX_REASONS: Final = 10
ON_INVALID: Final = ("reject", "dead_letter")
#: A valid message is stamped with its schema and version only while that keeps it within the
#: protocol's header limit (every reader refuses a message with more): one with 63 or 64 headers
#: already goes on unstamped.
STAMP_ROOM: Final = MAX_HEADERS - 2
_MISSING: Final = object()
_TRAILING_NUMBER: Final = re.compile(r"(?:^|[^0-9])([0-9]{1,9})/?$")


def _err(msg: str, code: ErrorCode, rid: int = 0) -> RemoteProtocolError:
    return RemoteProtocolError(msg, code, rid=rid)


@dataclass(slots=True)
class Version:
    version: int
    document: Any
    compatibility: str
    created_ms: int
    validator: Any  # compiled; is_valid(instance) -> bool


@dataclass(slots=True)
class Schema:
    name: str
    versions: list[Version] = field(default_factory=list)
    valid: int = 0  # publishes that passed (metrics)
    invalid: int = 0  # publishes refused or dead-lettered (metrics)
    dead_lettered: int = 0

    @property
    def latest(self) -> Version:
        return self.versions[-1]

    @property
    def compatibility(self) -> str:
        return self.versions[-1].compatibility if self.versions else compat.DEFAULT_MODE

    def get(self, version: int) -> Version | None:
        return self.versions[version - 1] if 0 < version <= len(self.versions) else None


@dataclass(slots=True)
class Binding:
    pattern: str
    schema: str
    on_invalid: str
    dead_letter: str | None
    created_ms: int

    def info(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "schema": self.schema, "on_invalid": self.on_invalid,
                "dead_letter": self.dead_letter, "created_ms": self.created_ms}


def _specificity(pattern: str) -> tuple[int, int, str]:
    tokens = pattern.split(".")
    return (sum(t not in ("*", ">") for t in tokens), len(tokens), pattern)


def version_named(headers: dict[str, Any]) -> int | None | str:
    """The schema version a message names: its ``tidings-schema-version`` header, else
    the trailing number of its ``ce-dataschema`` URI (``.../OrderPlaced/2``,
    ``urn:...:OrderPlaced:2``); None if it names none; a str (the bad value) if the
    header is not a version number."""
    v = headers.get(V.H_SCHEMA_VERSION)
    if v is not None:
        if type(v) is int and v > 0:
            return v
        text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        return int(text) if text.isdigit() and 0 < len(text) <= 9 and int(text) > 0 else text
    ds = headers.get(V.CE_DATASCHEMA)
    if ds is not None:
        m = _TRAILING_NUMBER.search(ds.decode("latin-1") if isinstance(ds, bytes) else str(ds))
        if m is not None and int(m.group(1)) > 0:
            return int(m.group(1))
    return None


class SchemaRegistry:
    """Schemas, bindings and the publish-time check (see the module docstring).

    ``store`` keeps them; ``queue`` finds a queue target by name (the dead-letter
    destination of a binding: what the durable bindings match returns) or None."""

    def __init__(self, store: Store, queue: Callable[[str], Any], *,
                 now_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.store = store
        self.queue = queue
        self.now_ms = now_ms
        self.schemas: dict[str, Schema] = {}
        self.bindings: dict[str, Binding] = {}
        self._router: Router[Binding] = Router()
        self._memo: dict[str, Any] = {}  # subject -> (binding, schema), or None: not validated
        self._lock = anyio.Lock()  # one registration or binding change at a time (version numbers)
        self.active = False  # some binding exists: the publish path asks screen()

    # ------------------------------------------------------------ loading

    async def load(self) -> None:
        """Read every schema version and binding from the store and compile the versions.
        A stored document that no longer compiles is logged and its name left out
        (with its bindings, which then refuse nothing)."""
        broken: set[str] = set()
        for name, version, document, mode, created in await self.store.load_schemas():
            if name in broken:
                continue
            try:
                validator = compile_document(document)
            except SchemaDocumentError as exc:
                log.error("schema %s version %d no longer compiles (%s): schema left out", name, version, exc)
                broken.add(name)
                self.schemas.pop(name, None)
                continue
            self.schemas.setdefault(name, Schema(name)).versions.append(
                Version(version, document, mode, created, validator))
        for pattern, schema, on_invalid, dead_letter, created in await self.store.load_schema_bindings():
            self._bind(Binding(pattern, schema, on_invalid, dead_letter, created))
        if self.schemas or self.bindings:
            log.info("schema registry: %d schemas, %d bindings", len(self.schemas), len(self.bindings))

    # ------------------------------------------------------------ publish path

    def screen(self, m: list[Any]) -> tuple[Violation, tuple[list[Any], list[Any]] | None] | None:
        """Check one PUB message ``[subject, payload, headers, reply, seq, opts]``.

        None: it may go on (no binding, or valid: then stamped with the schema and
        version it was validated against). Otherwise ``(violation, dead)``: ``dead``
        is the dead-letter entry ``(message, [queue])`` to store instead, or None
        when the message is refused."""
        hit = self._memo.get(m[0], _MISSING)
        if hit is None:
            return None
        if hit is _MISSING:
            hit = self._resolve(m[0])
            if hit is None:
                return None
        b, schema = hit
        h = m[2]
        ver = schema.versions[-1]
        ct = None
        if h:
            if V.H_SCHEMA_VERSION in h or V.CE_DATASCHEMA in h:
                named = version_named(h)
                if named is not None:
                    got = schema.get(named) if type(named) is int else None
                    if got is None:
                        return self._refused(m, b, schema, Violation(
                            schema.name, None, "", "schema-version",
                            f"version {named!r} of {schema.name} is not registered (latest is "
                            f"{len(schema.versions)})"))
                    ver = got
            ct = h.get(V.CONTENT_TYPE)
        mtype = V.CT_JSON if ct is None or ct == V.CT_JSON else media_type(h)
        try:
            instance = loads(m[1]) if mtype == V.CT_JSON else decode(m[1], mtype)
        except LookupError:
            return self._refused(m, b, schema, Violation(
                schema.name, ver.version, "", "content-type",
                f"content-type {mtype!r} cannot be validated (application/json or application/msgpack)"))
        except ValueError as exc:
            return self._refused(m, b, schema, Violation(
                schema.name, ver.version, "", "decode",
                f"the payload is not {'msgpack' if 'msgpack' in mtype else 'JSON'}: {str(exc)[:200]}"))
        try:
            ok = ver.validator.is_valid(instance)
        except (ValueError, TypeError):  # a value JSON cannot hold (msgpack bytes, say)
            ok = False
        if not ok:
            return self._refused(m, b, schema, first_violation(ver.validator, instance, schema.name, ver.version))
        schema.valid += 1
        m.append(instance)  # net/publish.py P_DECODED: content filters on "data" read it, not decode again
        if h is None:
            m[2] = {V.H_SCHEMA: schema.name, V.H_SCHEMA_VERSION: ver.version}
        elif len(h) < STAMP_ROOM:
            h[V.H_SCHEMA] = schema.name
            h[V.H_SCHEMA_VERSION] = ver.version
        return None

    def decoded(self, m: list[Any]) -> Any:
        """The payload of PUB message ``m`` as a JSON value, for content filters on its
        fields: only when a schema binds its subject (MISSING otherwise, or when it cannot
        be decoded). A message that passed :meth:`screen` already carries it."""
        hit = self._memo.get(m[0], _MISSING)
        if hit is _MISSING:
            hit = self._resolve(m[0])
        if hit is None:
            return MISSING
        try:
            return decode(m[1], media_type(m[2]))
        except (LookupError, ValueError):
            return MISSING

    def _resolve(self, subject: str) -> tuple[Binding, Schema] | None:
        """The binding that applies to ``subject`` and its schema (None: no binding, or its
        schema failed to load), remembered until the bindings or the schema names change."""
        plain = self._router.match(subject)[0]
        b = max(plain, key=lambda x: _specificity(x.pattern)) if plain else None
        schema = self.schemas.get(b.schema) if b is not None else None
        hit = (b, schema) if b is not None and schema is not None and schema.versions else None
        if len(self._memo) >= SUBJECT_MEMO:
            self._memo.clear()
        self._memo[subject] = hit
        return hit

    def _refused(self, m: list[Any], b: Binding, schema: Schema,
                 v: Violation) -> tuple[Violation, tuple[list[Any], list[Any]] | None]:
        schema.invalid += 1
        if b.on_invalid != "dead_letter" or b.dead_letter is None:
            return v, None
        q = self.queue(b.dead_letter)
        if q is None:
            return Violation(v.schema, v.version, v.pointer, v.rule,
                             f"{v.detail}; and its dead-letter queue {b.dead_letter!r} does not exist"), None
        schema.dead_lettered += 1
        headers = dict(m[2]) if m[2] else {}
        headers.update({
            V.H_DLQ_REASON: V.DLQ_SCHEMA_VIOLATION,
            V.H_SCHEMA: schema.name,
            V.H_SCHEMA_ERROR: v.message()[:1000],
            V.H_SCHEMA_ERROR_POINTER: v.pointer[:1000],
            V.H_SCHEMA_ERROR_RULE: v.rule,
            V.H_DEAD_LETTERED_AT: self.now_ms(),
        })
        return v, ([m[0], m[1], headers, None, m[4], m[5]], [q])

    # ------------------------------------------------------------ bindings

    def _bind(self, b: Binding) -> None:
        old = self.bindings.pop(b.pattern, None)
        if old is not None:
            self._router.remove(old.pattern, old)
        self.bindings[b.pattern] = b
        self._router.add(b.pattern, b)
        self._changed()

    def _unbind(self, pattern: str) -> Binding | None:
        old = self.bindings.pop(pattern, None)
        if old is not None:
            self._router.remove(old.pattern, old)
            self._changed()
        return old

    def _changed(self) -> None:
        self._memo = {}
        self.active = bool(self.bindings)

    # ------------------------------------------------------------ calls

    def calls(self) -> dict[str, Callable[..., Any]]:
        """The CALL methods (``handler(args, rid)``) the dispatcher serves."""
        return {F.CALL_SCHEMA_REGISTER: self.register, F.CALL_SCHEMA_CHECK: self.check,
                F.CALL_SCHEMA_GET: self.get, F.CALL_SCHEMA_LIST: self.list_schemas, F.CALL_SCHEMA_BIND: self.bind,
                F.CALL_SCHEMA_UNBIND: self.unbind, F.CALL_SCHEMA_BINDINGS: self.list_bindings}

    def _candidate(self, args: dict[str, Any], rid: int) -> tuple[str, Any, Any, str, Schema | None]:
        """Name, document, compiled validator and mode of a register/check call."""
        name = validate_name(args.get("name"), "schema")
        if "schema" not in args:
            raise _err("schema.register needs 'schema': a JSON Schema document", ErrorCode.INVALID_ARGUMENT, rid)
        document = args["schema"]
        try:
            validator = compile_document(document)
        except SchemaDocumentError as exc:
            raise _err(f"schema {name!r}: {exc}", ErrorCode.SCHEMA_INVALID, rid) from None
        existing = self.schemas.get(name)
        mode = args.get("compatibility")
        if mode is None:
            mode = existing.compatibility if existing is not None else compat.DEFAULT_MODE
        if mode not in compat.MODES:
            raise _err(f"unknown compatibility {mode!r} (known: {', '.join(compat.MODES)})",
                       ErrorCode.INVALID_ARGUMENT, rid)
        return name, document, validator, mode, existing

    @staticmethod
    def _same(existing: Schema | None, document: Any) -> Version | None:
        """The version of ``existing`` whose document is ``document`` (the latest such), if any."""
        if existing is None:
            return None
        return next((v for v in reversed(existing.versions) if v.document == document), None)

    @staticmethod
    def _reasons(existing: Schema | None, document: Any, mode: str) -> list[str]:
        history = [v.document for v in existing.versions] if existing is not None else []
        return compat.check(history, document, mode)

    async def register(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Register a new version (or return the number of the version that already has
        this document, as Confluent's registry does). Refused with SCHEMA_INCOMPATIBLE
        and the reasons by the mode."""
        async with self._lock:
            name, document, validator, mode, existing = self._candidate(args, rid)
            same = self._same(existing, document)
            if same is not None and existing is not None:  # as Confluent's: a known document keeps its version
                if "compatibility" in args and mode != existing.compatibility:
                    raise _err(f"schema {name!r}: this document is already version {same.version}; "
                               "a mode changes with a new version", ErrorCode.CONFLICT, rid)
                return {"name": name, "version": same.version, "created": False}
            reasons = self._reasons(existing, document, mode)
            if reasons:
                more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
                raise _err(f"schema {name!r} is not compatible: " + "; ".join(reasons[:MAX_REASONS]) + more,
                           ErrorCode.SCHEMA_INCOMPATIBLE, rid)
            if existing is None and len(self.schemas) >= MAX_SCHEMAS:
                raise _err(f"the broker holds its maximum of {MAX_SCHEMAS} schemas", ErrorCode.LIMIT_EXCEEDED, rid)
            if existing is not None and len(existing.versions) >= MAX_VERSIONS:
                raise _err(f"schema {name!r} has its maximum of {MAX_VERSIONS} versions",
                           ErrorCode.LIMIT_EXCEEDED, rid)
            version = len(existing.versions) + 1 if existing is not None else 1
            created = self.now_ms()
            await self.store.write(PutSchema(name, version, document, mode, created))
            if existing is None:
                self.schemas[name] = Schema(name)
                self._memo = {}  # a binding whose schema failed to load may apply again
            self.schemas[name].versions.append(Version(version, document, mode, created, validator))
            log.info("schema %s version %d registered (compatibility %s)", name, version, mode)
            return {"name": name, "version": version, "created": True}

    async def check(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Would this document be accepted as the next version? Registers nothing."""
        name, document, _validator, mode, existing = self._candidate(args, rid)
        same = self._same(existing, document)
        if same is not None:
            return {"compatible": True, "reasons": [], "version": same.version, "compatibility": mode}
        reasons = self._reasons(existing, document, mode)
        version = len(existing.versions) + 1 if existing is not None else 1
        return {"compatible": not reasons, "reasons": reasons, "version": version, "compatibility": mode}

    def _schema(self, args: dict[str, Any], rid: int, key: str = "name") -> Schema:
        name = args.get(key)
        s = self.schemas.get(name) if isinstance(name, str) else None
        if s is None:
            raise _err(f"no schema named {name!r}", ErrorCode.NOT_FOUND, rid)
        return s

    def get(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        s = self._schema(args, rid)
        want = args.get("version")
        v: Version | None = s.latest
        if want is not None:
            v = s.get(want) if type(want) is int else None
            if v is None:
                raise _err(f"schema {s.name!r} has no version {want!r} (latest is {len(s.versions)})",
                           ErrorCode.NOT_FOUND, rid)
        assert v is not None
        return {"name": s.name, "version": v.version, "schema": v.document, "compatibility": v.compatibility,
                "created_ms": v.created_ms, "versions": len(s.versions)}

    def list_schemas(self, args: dict[str, Any], rid: int) -> list[dict[str, Any]]:
        return [{"name": s.name, "latest": s.latest.version, "compatibility": s.compatibility,
                 "bindings": sorted(b.pattern for b in self.bindings.values() if b.schema == s.name),
                 "valid": s.valid, "invalid": s.invalid, "dead_lettered": s.dead_lettered}
                for s in sorted(self.schemas.values(), key=lambda x: x.name)]

    def list_bindings(self, args: dict[str, Any], rid: int) -> list[dict[str, Any]]:
        return [b.info() for _p, b in sorted(self.bindings.items())]

    async def bind(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        """Bind a subject pattern to a schema (replacing the pattern's binding)."""
        try:
            pattern = validate_pattern(args.get("pattern"))
        except RemoteProtocolError as exc:
            raise _err(exc.message, ErrorCode.INVALID_SUBJECT, rid) from None
        s = self._schema(args, rid)
        on_invalid = args.get("on_invalid", "reject")
        if on_invalid not in ON_INVALID:
            raise _err(f"on_invalid must be one of {', '.join(ON_INVALID)}, not {on_invalid!r}",
                       ErrorCode.INVALID_ARGUMENT, rid)
        dead_letter = args.get("dead_letter")
        if on_invalid == "dead_letter":
            if not isinstance(dead_letter, str) or not dead_letter:
                raise _err("on_invalid 'dead_letter' needs 'dead_letter': a queue name",
                           ErrorCode.INVALID_ARGUMENT, rid)
            if self.queue(dead_letter) is None:
                raise _err(f"dead-letter queue {dead_letter!r} does not exist; declare it first",
                           ErrorCode.NOT_FOUND, rid)
        elif dead_letter is not None:
            raise _err("'dead_letter' is only for on_invalid 'dead_letter'", ErrorCode.INVALID_ARGUMENT, rid)
        async with self._lock:
            if pattern not in self.bindings and len(self.bindings) >= MAX_BINDINGS:
                raise _err(f"the broker holds its maximum of {MAX_BINDINGS} schema bindings",
                           ErrorCode.LIMIT_EXCEEDED, rid)
            b = Binding(pattern, s.name, on_invalid, dead_letter, self.now_ms())
            await self.store.write(PutSchemaBinding(b.pattern, b.schema, b.on_invalid, b.dead_letter, b.created_ms))
            self._bind(b)
        return b.info()

    async def unbind(self, args: dict[str, Any], rid: int) -> dict[str, Any]:
        pattern = args.get("pattern")
        async with self._lock:
            if not isinstance(pattern, str) or pattern not in self.bindings:
                raise _err(f"no schema binding for pattern {pattern!r}", ErrorCode.NOT_FOUND, rid)
            await self.store.write(DeleteSchemaBinding(pattern))
            old = self._unbind(pattern)
        assert old is not None
        return old.info()

    # ------------------------------------------------------------ metrics

    def counters(self) -> list[tuple[str, int, int, int]]:
        """(schema, valid, invalid, dead_lettered) per schema, for /metrics."""
        return [(s.name, s.valid, s.invalid, s.dead_lettered) for s in self.schemas.values()]
