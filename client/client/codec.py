"""Payloads in and out: what a publish accepts, the JSON codec, and the
accessors every received message shares (:class:`Body`).

A payload is bytes on the wire. A publish takes ``bytes``, ``bytearray``,
``memoryview`` or ``str`` (sent as UTF-8) and nothing else: ``bytes(42)``
would be 42 zero bytes and a dict would fail deep inside, so anything else
is a TypeError that names the alternatives. Structured data goes through an
explicit codec, ``json=obj``, which also sets the ``content-type`` header;
``msg.json()`` and ``msg.model(T)`` read it back.

pydantic is optional and never imported by this module unless
``msg.model(T)`` is asked for a type that is not a pydantic model itself
(``list[Order]``, a dataclass, a TypedDict): models are recognised by their
methods (``model_dump_json``, ``model_validate_json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json as _json
from typing import Any, Final, Hashable, TypeVar, Union, cast

from tidings.protocol import vocabulary as V

T = TypeVar("T")

# What a publish accepts as its payload.
Payload = Union[bytes, bytearray, memoryview, str]


class _Unset:
    """The default of ``json=``: ``None`` is a JSON value (null), so it cannot mean "not given"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


def to_bytes(payload: Any) -> bytes:
    """A publish's payload as bytes: str is encoded as UTF-8, bytearray and
    memoryview are copied. Callers test ``type(payload) is bytes`` first (the
    common case costs nothing more). Raises TypeError for anything else."""
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, (bytearray, memoryview, bytes)):
        return bytes(payload)
    kind = type(payload).__name__
    if hasattr(payload, "model_dump_json"):
        hint = f"pass json=... to send a {kind} model as JSON"
    else:
        hint = "pass json=... to send it as JSON, or encode it yourself"
    raise TypeError(f"payload must be bytes, bytearray, memoryview or str, not {kind}: {hint}")


def _default(obj: Any) -> Any:
    """What json.dumps cannot encode by itself: pydantic models and dataclasses nested in the value."""
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"json= cannot encode a {type(obj).__name__}: give JSON types, a pydantic model or a dataclass")


def encode_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON. A pydantic model is dumped by pydantic
    itself (``model_dump_json``); models and dataclasses inside dicts and lists
    are dumped too. Raises TypeError for what JSON cannot hold, ValueError for
    NaN or infinity (they are not JSON)."""
    dump = getattr(value, "model_dump_json", None)
    if dump is not None and not isinstance(value, type):
        text: str = dump()
        return text.encode()
    return _json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                       default=_default).encode()


def with_json(payload: Any, value: Any, headers: dict[str, Any] | None) -> tuple[bytes, dict[str, Any]]:
    """The payload and headers of a publish given ``json=value``: the value
    encoded, and ``content-type: application/json`` added to (a copy of) the
    headers unless they name a content type already. Raises TypeError if a
    payload was given as well."""
    if payload:
        raise TypeError("give either a payload or json=, not both")
    data = encode_json(value)
    if headers is None:
        return data, {V.CONTENT_TYPE: V.CT_JSON}
    if V.CONTENT_TYPE in headers:
        return data, headers
    return data, {**headers, V.CONTENT_TYPE: V.CT_JSON}


@functools.lru_cache(maxsize=64)  # building a TypeAdapter compiles a validator: keep the few a program uses
def _adapter(cls: Any) -> Any:
    try:
        from pydantic import TypeAdapter
    except ImportError:
        raise ImportError(f"msg.model({cls!r}) needs pydantic for a type that is not a pydantic model: "
                        "pip install 'tidings[pydantic]'") from None
    return TypeAdapter(cls)


class Body:
    """The accessors a received message offers, the same on a pub/sub
    :class:`~tidings.client.message.Message` and a durable
    :class:`~tidings.client.consumer.Delivery`: ``data`` (the payload bytes),
    ``text()``, ``json()``, ``model(T)`` and ``content_type``. A class using
    it has ``payload`` (bytes) and ``headers`` (dict or None)."""

    __slots__ = ()

    payload: bytes
    headers: dict[str, Any] | None

    @property
    def data(self) -> bytes:
        """The payload bytes (the same object as ``payload``)."""
        return self.payload

    @property
    def content_type(self) -> str | None:
        """The ``content-type`` header, if the publisher set one (``json=`` does)."""
        h = self.headers
        value = h.get(V.CONTENT_TYPE) if h else None
        return value if isinstance(value, str) else None

    def text(self, encoding: str = "utf-8") -> str:
        """The payload decoded as text; UnicodeDecodeError if it is not valid ``encoding``."""
        return self.payload.decode(encoding)

    def json(self) -> Any:
        """The payload parsed as JSON (whatever its content-type header says);
        ValueError (json.JSONDecodeError) if it is not JSON."""
        return _json.loads(self.payload)

    def model(self, cls: type[T]) -> T:
        """The payload (JSON) validated into ``cls``: a pydantic model through
        its ``model_validate_json``, any other type pydantic can validate
        (``list[Order]``, a dataclass, a TypedDict) through a TypeAdapter.
        Raises pydantic's ValidationError if it does not fit, ImportError if
        pydantic is needed and not installed."""
        validate = getattr(cls, "model_validate_json", None)
        if validate is None:
            validate = _adapter(cast(Hashable, cls)).validate_json
        result: T = validate(self.payload)
        return result
