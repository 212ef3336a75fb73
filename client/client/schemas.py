"""The schema registry API: JSON Schema versions, compatibility, subject bindings.

Composed onto the client like the durable API: :class:`Schemas` holds only a
way to make a CALL; ``Client`` keeps one as ``tc.schemas`` and forwards its
methods (``tc.register_schema(...)`` is ``tc.schemas.register(...)``).
Permissions and the wire methods are in docs/PROTOCOL.md ("Schemas").
"""

from __future__ import annotations

import builtins
from typing import Any, Awaitable, Callable

from tidings.protocol import frames as F

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


class Schemas:
    """Schema registry calls; each is one CALL to the broker."""

    def __init__(self, call: Call) -> None:
        self._call = call

    async def register(self, name: str, schema: Any, *, compatibility: str | None = None) -> int:
        """Register ``schema`` (a JSON Schema draft 2020-12 document) as the next version
        of ``name`` and return its version number (a document registered before keeps
        its version: the same call again returns the same number). ``compatibility`` ("none", "backward", "forward", "full" and their
        "_transitive" forms; default: the name's current mode, "backward" for a new
        name) applies from this version on. Raises SchemaIncompatibleError naming each
        field and rule, SchemaInvalidError for a malformed document."""
        args: dict[str, Any] = {"name": name, "schema": schema}
        if compatibility is not None:
            args["compatibility"] = compatibility
        result: dict[str, Any] = await self._call(F.CALL_SCHEMA_REGISTER, args)
        version: int = result["version"]
        return version

    async def check(self, name: str, schema: Any, *, compatibility: str | None = None) -> dict[str, Any]:
        """Would ``schema`` be accepted as the next version? Registers nothing. Returns
        ``{"compatible": bool, "reasons": [...], "version": the number it would get,
        "compatibility": the mode checked}``."""
        args: dict[str, Any] = {"name": name, "schema": schema}
        if compatibility is not None:
            args["compatibility"] = compatibility
        result: dict[str, Any] = await self._call(F.CALL_SCHEMA_CHECK, args)
        return result

    async def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """One version (default: the latest): ``{"name", "version", "schema",
        "compatibility", "created_ms", "versions"}``. NotFoundError if absent."""
        args: dict[str, Any] = {"name": name}
        if version is not None:
            args["version"] = version
        result: dict[str, Any] = await self._call(F.CALL_SCHEMA_GET, args)
        return result

    async def list(self) -> list[dict[str, Any]]:
        """Every schema: name, latest version, mode, bound patterns, valid/invalid counts."""
        result: list[dict[str, Any]] = await self._call(F.CALL_SCHEMA_LIST, {})
        return result

    async def bind(self, pattern: str, name: str, *, on_invalid: str = "reject",
                   dead_letter_queue: str | None = None) -> dict[str, Any]:
        """Validate every publish to subjects matching ``pattern`` against schema ``name``.
        An invalid message is refused (``on_invalid="reject"``) or stored in the queue
        ``dead_letter_queue`` with the violation in its headers (``"dead_letter"``).
        Replaces the pattern's binding, if any."""
        args: dict[str, Any] = {"pattern": pattern, "name": name, "on_invalid": on_invalid}
        if dead_letter_queue is not None:
            args["dead_letter"] = dead_letter_queue
        result: dict[str, Any] = await self._call(F.CALL_SCHEMA_BIND, args)
        return result

    async def unbind(self, pattern: str) -> dict[str, Any]:
        """Remove the binding of ``pattern``; returns it. NotFoundError if there is none."""
        result: dict[str, Any] = await self._call(F.CALL_SCHEMA_UNBIND, {"pattern": pattern})
        return result

    async def bindings(self) -> builtins.list[dict[str, Any]]:
        """Every binding: pattern, schema, on_invalid, dead_letter, created_ms."""
        result: builtins.list[dict[str, Any]] = await self._call(F.CALL_SCHEMA_BINDINGS, {})
        return result
