"""Schema documents checked and compiled once; payloads decoded and validated.

The validator is jsonschema-rs (compiled in Rust, full draft 2020-12),
chosen by measurement on a realistic 10-field OrderPlaced event
(benchmarks/README.md, "Schemas"): ~1.3 us per valid event, against
~13 us for fastjsonschema (which also stops at draft 7) and ~300 us for the
pure-Python jsonschema. A document is compiled when its version is
registered or loaded, never per message; a payload is first checked with
``is_valid`` (no error objects), and only a failure builds the first error.

Remote ``$ref``s are never fetched: the broker does not reach out to the
network on behalf of a publisher (a document that needs one is refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import jsonschema_rs
import msgpack
import orjson

from tidings.protocol import vocabulary as V

DRAFT_2020_12: Final = "https://json-schema.org/draft/2020-12/schema"
#: Largest schema document accepted (bytes of its JSON): a schema is loaded into
#: memory and compiled on every start; 256 KiB is far beyond any event's schema.
MAX_DOCUMENT_BYTES: Final = 256 * 1024

JSON_TYPES: Final = frozenset({"application/json", ""})  # "": no content-type header (documented: JSON)
MSGPACK_TYPES: Final = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})


class SchemaDocumentError(ValueError):
    """A schema document is not a usable JSON Schema draft 2020-12 document."""


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a payload was refused: the JSON Pointer of the first violation inside
    the payload, the rule it broke (a JSON Schema keyword, or ``content-type``,
    ``decode``, ``schema-version``) and a human detail."""

    schema: str
    version: int | None
    pointer: str
    rule: str
    detail: str

    def message(self) -> str:
        """The wire message: ``RULE at "POINTER": DETAIL (schema NAME vN)`` (the pointer
        JSON-quoted, so a client can parse it back; docs/PROTOCOL.md)."""
        where = f"schema {self.schema}" + (f" v{self.version}" if self.version is not None else "")
        return f"{self.rule} at {json.dumps(self.pointer)}: {self.detail} ({where})"


def _no_remote(uri: str) -> Any:
    raise ValueError(f"remote $ref {uri!r} is not fetched: embed it in $defs")


def compile_document(document: Any) -> Any:
    """Check ``document`` against the draft 2020-12 meta-schema and compile it.
    Returns the validator; raises SchemaDocumentError saying what is wrong."""
    if not isinstance(document, (dict, bool)):
        raise SchemaDocumentError(f"a schema must be a JSON object (or true/false), not {type(document).__name__}")
    try:
        size = len(json.dumps(document, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SchemaDocumentError(f"the schema is not JSON: {exc}") from None
    if size > MAX_DOCUMENT_BYTES:
        raise SchemaDocumentError(f"the schema is {size} bytes of JSON; the limit is {MAX_DOCUMENT_BYTES}")
    if isinstance(document, dict):
        declared = document.get("$schema")
        if declared is not None and str(declared).rstrip("#") != DRAFT_2020_12:
            raise SchemaDocumentError(f"$schema {declared!r}: only draft 2020-12 ({DRAFT_2020_12}) is supported")
    try:
        jsonschema_rs.meta.validate(document)
    except jsonschema_rs.ValidationError as exc:
        path = "/" + "/".join(str(p) for p in exc.instance_path)
        raise SchemaDocumentError(f"not a valid draft 2020-12 schema at {path}: {exc.message}") from None
    except ValueError as exc:  # a $schema jsonschema-rs does not know
        raise SchemaDocumentError(f"not a valid schema: {exc}") from None
    try:
        return jsonschema_rs.Draft202012Validator(document, retriever=_no_remote, validate_formats=False)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SchemaDocumentError(f"the schema does not compile: {first}") from None


def _pointer(path: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def first_violation(validator: Any, instance: Any, name: str, version: int) -> Violation:
    """The first error of an instance ``validator`` refused (``is_valid`` was False)."""
    try:
        err = next(iter(validator.iter_errors(instance)))
    except StopIteration:  # not expected: is_valid said no
        return Violation(name, version, "", "schema", "refused by the schema")
    except (ValueError, TypeError) as exc:  # a value JSON cannot hold (msgpack bytes, say)
        return Violation(name, version, "", "decode", f"not a JSON value: {exc}")
    rule = str(err.schema_path[-1]) if err.schema_path else "schema"
    pointer = _pointer(err.instance_path)
    kind = err.kind
    if rule == "required":
        prop = getattr(kind, "property", None)
        if isinstance(prop, str):
            pointer += "/" + prop.replace("~", "~0").replace("/", "~1")
    elif rule == "additionalProperties":
        unexpected = getattr(kind, "unexpected", None)
        if isinstance(unexpected, list) and unexpected:
            pointer += "/" + str(unexpected[0]).replace("~", "~0").replace("/", "~1")
    return Violation(name, version, pointer, rule, err.message)


def media_type(headers: dict[str, Any] | None) -> str:
    """The payload's media type from its ``content-type`` header: lower case, without
    parameters; "" when there is none."""
    if not headers:
        return ""
    ct = headers.get(V.CONTENT_TYPE)
    if ct is None:
        return ""
    if isinstance(ct, bytes):
        ct = ct.decode("latin-1")
    return str(ct).split(";", 1)[0].strip().lower()


#: JSON decoding of payloads: orjson, 2-5x faster than the json module on a 10-field event
#: (benchmarks/README.md, "Schemas"); it refuses what is not JSON (NaN, Infinity) and
#: integers beyond 64 bits (a "decode" violation). Raises ValueError (orjson.JSONDecodeError).
loads: Final = orjson.loads


def decode(payload: bytes, mtype: str) -> Any:
    """The payload as a JSON value, by its media type. Raises ValueError (with the
    reason) if it cannot be decoded, LookupError for a media type the broker cannot read."""
    if mtype in JSON_TYPES or mtype.endswith("+json"):
        return loads(payload)
    if mtype in MSGPACK_TYPES:
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
            raise ValueError(f"not msgpack: {exc}") from None
    raise LookupError(mtype)
