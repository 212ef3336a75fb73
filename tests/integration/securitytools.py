"""Helpers for the security integration tests (test_security_*.py): write a
TOML config with users, permissions and TLS into a temp dir, and read the
broker's audit log.

Password hashes use a cheap scrypt cost (n=1024) so logins are fast; the
format and the code path are the production ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from tidings.broker.security.auth import hash_password, token_hash

FAST_N: Final = 1024
WAIT: Final = 10.0

PASSWORDS: Final = {"admin": "admin-secret-pw", "alice": "alice-secret-pw", "bob": "bob-secret-pw",
                    "carol": "carol-secret-pw"}
TOKENS: Final = {"svc": "svc-token-0123456789abcdef0123456789abcdef"}


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(type(v))


def user(name: str, *, password: str | None = None, tokens: list[str] | None = None,
         max_connections: int | None = None, **permissions: list[str]) -> dict[str, Any]:
    """One [users.NAME] entry: the password (default PASSWORDS[name]) is
    hashed here; ``tokens`` are plaintext tokens, stored as hashes."""
    entry: dict[str, Any] = {}
    pw = password if password is not None else PASSWORDS.get(name)
    if pw is not None:
        entry["password"] = hash_password(pw, n=FAST_N)
    if tokens:
        entry["tokens"] = [token_hash(t) for t in tokens]
    if max_connections is not None:
        entry["max_connections"] = max_connections
    if permissions:
        entry["permissions"] = permissions
    return {name: entry}


def write_config(path: Path, *, users: dict[str, dict[str, Any]] | None = None,
                 tls: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                 raw: str = "") -> Path:
    """Write a TOML config file at ``path`` and return it. With users, the
    FAST_N hashes are kept as they are (``password_upgrade = false``) unless
    ``settings`` says otherwise: an upgrade costs a 128 MiB hash per user."""
    settings = dict(settings or {})
    if users:
        settings.setdefault("password_upgrade", False)
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items()]
    if raw:
        lines.append(raw)
    for name, entry in (users or {}).items():
        lines.append(f"\n[users.{json.dumps(name)}]")
        for k, v in entry.items():
            if k != "permissions":
                lines.append(f"{k} = {_toml(v)}")
        if "permissions" in entry:
            lines.append(f"[users.{json.dumps(name)}.permissions]")
            for k, v in entry["permissions"].items():
                lines.append(f"{k} = {_toml(v)}")
    if tls:
        lines.append("\n[tls]")
        lines.extend(f"{k} = {_toml(str(v) if isinstance(v, Path) else v)}" for k, v in tls.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def audit_lines(data_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``<data_dir>/audit.log``, parsed (each must be one JSON object)."""
    path = data_dir / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
