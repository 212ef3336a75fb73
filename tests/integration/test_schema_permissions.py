"""Who may register, read and bind schemas, against a broker with users (docs/PROTOCOL.md §15)."""

from __future__ import annotations

from pathlib import Path

import pytest
from securitytools import PASSWORDS, user, write_config

from tidings.client import connect
from tidings.client import errors as E

TEAM = {"publish": ["team1.>"], "subscribe": ["team1.>"], "admin": ["team1.>"]}
SCHEMA = {"type": "object", "required": ["id"]}


@pytest.fixture
def team_broker(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", publish=[">"], subscribe=[">"], consume=[">"], admin=[">"]),
        **user("alice", **TEAM),
    })
    return start_broker("--config", str(cfg))


async def test_schema_calls_follow_the_names_and_patterns_a_user_holds(team_broker) -> None:
    async with connect(team_broker.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as tc:
        assert await tc.register_schema("team1.Order", SCHEMA) == 1
        assert (await tc.get_schema("team1.Order"))["version"] == 1
        await tc.bind_schema("team1.orders.placed", "team1.Order")
        with pytest.raises(E.PermissionDeniedError):
            await tc.register_schema("payments.Order", SCHEMA)
        with pytest.raises(E.PermissionDeniedError):  # a binding decides what may be published there
            await tc.bind_schema("payments.>", "team1.Order")
        with pytest.raises(E.PermissionDeniedError):  # lists every schema: admin on ">"
            await tc.list_schemas()
        with pytest.raises(E.SchemaViolationError):
            await tc.publish("team1.orders.placed", b"{}", confirm=True)
    async with connect(team_broker.url, user="admin", password=PASSWORDS["admin"], reconnect=False) as tc:
        assert [s["name"] for s in await tc.list_schemas()] == ["team1.Order"]
        await tc.register_schema("payments.Order", SCHEMA)
    async with connect(team_broker.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as tc:
        with pytest.raises(E.PermissionDeniedError):
            await tc.get_schema("payments.Order")
