"""Helpers shared by the storage tests (conftest.py and the test files)."""

from __future__ import annotations

from typing import Any

from tidings.broker.durable.store import StoredMessage

#: The backends the contract tests run against (tests/storage/test_store_contract.py).
#: "postgres" runs on the throwaway server of tests/pgserver.py (skipped when PostgreSQL is absent).
BACKENDS = ("sqlite", "memory", "postgres")


def make_row(queue: str, id: int, *, payload: bytes | None = None, available_ms: int = 1_000,
             headers: dict[str, Any] | None = None, msg_id: str | None = None, **kw: Any) -> StoredMessage:
    """A message with predictable contents: payload defaults to b"<queue>:<id>"."""
    return StoredMessage(queue, id, f"subj.{queue}", payload if payload is not None else f"{queue}:{id}".encode(),
                         headers, msg_id, kw.pop("published_ms", 500), available_ms, **kw)
