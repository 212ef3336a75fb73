"""CloudEvents 1.0 over tidings: the envelope as headers, the data as the payload.

A tidings message carries a CloudEvent in the binary content mode: the
attributes are headers (``ce-id``, ``ce-source``, ``ce-type``,
``ce-specversion``, ``ce-time``, ``ce-dataschema``, ``ce-subject``), the
event's data is the payload, and its ``datacontenttype`` is the
``content-type`` header (``application/json`` or ``application/msgpack``).

    await tc.publish_event("orders.placed", type="OrderPlaced", source="/shop", data={...})
    ...
    ev = msg.event            # a CloudEvent, its data decoded (and upcast), or None

Upcasters turn an old version's data into the next version's:
``tc.register_upcaster("OrderPlaced", 1, fn)`` makes ``fn(data_v1)`` return
version 2 data; ``msg.event`` applies the chain from the message's version
(the broker's ``tidings-schema-version`` header, else the trailing number of
``ce-dataschema``) as far as it is registered. The schema name is the
broker's ``tidings-schema`` header, else the event's ``type``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Final, Mapping

import msgpack

from tidings.protocol import vocabulary as V

#: Upcasting steps one event may take (a chain registered by mistake in a loop is impossible,
#: versions only go up, but a bound keeps a bad registration from costing unbounded time).
MAX_UPCAST_STEPS: Final = 1_000
CONTENT_TYPES: Final = (V.CT_JSON, V.CT_MSGPACK)
_TRAILING_NUMBER: Final = re.compile(r"(?:^|[^0-9])([0-9]{1,9})/?$")

Upcaster = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvents 1.0 event read from a message: its attributes, its decoded
    ``data``, and ``version``: the schema version ``data`` is at (after upcasting;
    None if the message names none)."""

    id: str
    source: str
    type: str
    specversion: str
    data: Any
    time: str | None = None
    dataschema: str | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    version: int | None = None


class Upcasters:
    """Per (schema name, version) functions that lift data one version up."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, name: str, version: int, fn: Upcaster) -> None:
        """``fn(data)`` turns version ``version`` of ``name`` into version ``version + 1``."""
        if not isinstance(name, str) or not name:
            raise ValueError("an upcaster needs a schema name")
        if type(version) is not int or version < 1:
            raise ValueError(f"version must be an int >= 1, not {version!r}")
        if not callable(fn):
            raise TypeError("an upcaster must be callable")
        self._steps[(name, version)] = fn

    def upcast(self, name: str, version: int, data: Any) -> tuple[Any, int]:
        """``data`` of ``version`` lifted as far as registered upcasters go: (data, version)."""
        steps = self._steps
        for _ in range(MAX_UPCAST_STEPS):
            fn = steps.get((name, version))
            if fn is None:
                break
            data = fn(data)
            version += 1
        return data, version


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def now_rfc3339() -> str:
    """The current UTC time as CloudEvents writes it (RFC 3339, milliseconds, ``Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_data(data: Any, content_type: str) -> bytes:
    """``data`` as the payload of ``content_type`` (JSON or msgpack). Raises ValueError."""
    if content_type == V.CT_JSON:
        try:
            return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data cannot be encoded as JSON: {exc}") from None
    if content_type == V.CT_MSGPACK:
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"data cannot be encoded as msgpack: {exc}") from None
        return packed
    raise ValueError(f"content_type must be one of {', '.join(CONTENT_TYPES)}, not {content_type!r}")


def event_headers(*, type: str, source: str, id: str | None = None, time: Any = None,
                  dataschema: str | None = None, subject: str | None = None,
                  content_type: str = V.CT_JSON, schema_version: int | None = None,
                  headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The headers of an event: ``headers`` plus the CloudEvents attributes (``id``
    defaults to a new UUID4, ``time`` to now; a datetime is written as RFC 3339)."""
    if not isinstance(type, str) or not type or not isinstance(source, str) or not source:
        raise ValueError("an event needs a non-empty type and source")
    out: dict[str, Any] = dict(headers) if headers else {}
    if time is None:
        stamp = now_rfc3339()
    elif isinstance(time, datetime):
        t = time if time.tzinfo is not None else time.replace(tzinfo=timezone.utc)
        stamp = t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    else:
        stamp = str(time)
    out.update({V.CE_SPECVERSION: V.CE_SPEC, V.CE_ID: id or str(uuid.uuid4()), V.CE_SOURCE: source,
                V.CE_TYPE: type, V.CE_TIME: stamp, V.CONTENT_TYPE: content_type})
    if dataschema is not None:
        out[V.CE_DATASCHEMA] = dataschema
    if subject is not None:
        out[V.CE_SUBJECT] = subject
    if schema_version is not None:
        if isinstance(schema_version, bool) or not isinstance(schema_version, int) or schema_version < 1:
            raise ValueError(f"schema_version must be an int >= 1, not {schema_version!r}")
        out[V.H_SCHEMA_VERSION] = schema_version
    return out


def version_of(headers: Mapping[str, Any]) -> int | None:
    """The schema version a message's data is at: ``tidings-schema-version``, else the
    trailing number of ``ce-dataschema``; None if neither names one."""
    v = headers.get(V.H_SCHEMA_VERSION)
    if type(v) is int:
        return v
    text = _text(v)
    if text is not None and text.isdigit() and len(text) <= 9:
        return int(text)
    ds = _text(headers.get(V.CE_DATASCHEMA))
    if ds is not None:
        m = _TRAILING_NUMBER.search(ds)
        if m is not None:
            return int(m.group(1))
    return None


def decode_data(payload: bytes, content_type: str | None) -> Any:
    """The payload decoded by its content type (JSON when there is none). Raises ValueError."""
    ct = (content_type or V.CT_JSON).split(";", 1)[0].strip().lower()
    if ct == V.CT_JSON or ct.endswith("+json"):
        return json.loads(payload)
    if ct in (V.CT_MSGPACK, "application/x-msgpack", "application/vnd.msgpack"):
        try:
            return msgpack.unpackb(payload, raw=False)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
            raise ValueError(f"the payload is not msgpack: {exc}") from None
    raise ValueError(f"cannot decode data of content-type {ct!r}")


def event_of(headers: Mapping[str, Any] | None, payload: bytes, upcasters: Upcasters | None) -> CloudEvent | None:
    """The CloudEvent a message carries (None if it has no ``ce-specversion``), its
    data decoded and upcast. Raises ValueError if the data cannot be decoded."""
    if not headers or V.CE_SPECVERSION not in headers:
        return None
    ct = _text(headers.get(V.CONTENT_TYPE))
    data = decode_data(payload, ct)
    etype = _text(headers.get(V.CE_TYPE)) or ""
    version = version_of(headers)
    if upcasters is not None and version is not None:
        name = _text(headers.get(V.H_SCHEMA)) or etype
        data, version = upcasters.upcast(name, version, data)
    return CloudEvent(
        id=_text(headers.get(V.CE_ID)) or "", source=_text(headers.get(V.CE_SOURCE)) or "", type=etype,
        specversion=_text(headers.get(V.CE_SPECVERSION)) or "", data=data, time=_text(headers.get(V.CE_TIME)),
        dataschema=_text(headers.get(V.CE_DATASCHEMA)), subject=_text(headers.get(V.CE_SUBJECT)),
        datacontenttype=ct, version=version)
