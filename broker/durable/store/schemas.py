"""SQLite's schema-registry storage: the migration step, the SQL of the
schema write operations and the reads.

The operations themselves (PutSchema, PutSchemaBinding, DeleteSchemaBinding)
are part of the store contract and live in base.py. The registry that uses
them is tidings.broker.schemas: the store only keeps what it is given.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tidings.broker.durable.store.reads import Reads

#: 3 -> 4: the schema registry. A schema version is immutable once stored (the
#: primary key refuses a second row for (name, version)); a binding is replaced whole.
MIGRATION_SCHEMAS: Final = """
CREATE TABLE schemas (
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    document      TEXT NOT NULL,        -- the JSON Schema document, as JSON
    compatibility TEXT NOT NULL,        -- the name's mode when this version was registered
    created_ms    INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;

CREATE TABLE schema_bindings (
    pattern     TEXT PRIMARY KEY,       -- a subject pattern
    schema      TEXT NOT NULL,          -- the schema name its publishes are validated against
    on_invalid  TEXT NOT NULL,          -- "reject" or "dead_letter"
    dead_letter TEXT,                   -- the queue invalid messages go to (dead_letter mode)
    created_ms  INTEGER NOT NULL
) WITHOUT ROWID;
"""

INSERT_SCHEMA: Final = (
    "INSERT INTO schemas (name, version, document, compatibility, created_ms) VALUES (?,?,?,?,?)")
UPSERT_BINDING: Final = (
    "INSERT INTO schema_bindings (pattern, schema, on_invalid, dead_letter, created_ms) VALUES (?,?,?,?,?)"
    " ON CONFLICT (pattern) DO UPDATE SET schema = excluded.schema, on_invalid = excluded.on_invalid,"
    " dead_letter = excluded.dead_letter, created_ms = excluded.created_ms")
DELETE_BINDING: Final = "DELETE FROM schema_bindings WHERE pattern = ?"


def encode_document(document: Any) -> str:
    """The stored form of a schema document (compact JSON, key order kept). Raises
    TypeError/ValueError for what JSON cannot hold (at submit, like every op)."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


class SchemaReads:
    """Read queries for the schema registry, mixed into the store (uses Reads._fetch)."""

    async def load_schemas(self: Reads) -> list[tuple[str, int, Any, str, int]]:  # type: ignore[misc]
        rows = await self._fetch(
            "SELECT name, version, document, compatibility, created_ms FROM schemas ORDER BY name, version")
        return [(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    async def load_schema_bindings(self: Reads) -> list[tuple[str, str, str, str | None, int]]:  # type: ignore[misc]
        rows = await self._fetch(
            "SELECT pattern, schema, on_invalid, dead_letter, created_ms FROM schema_bindings ORDER BY pattern")
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
