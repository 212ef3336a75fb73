"""What the schema.* calls need (broker/security/permissions.py, needs_for_call)."""

from __future__ import annotations

from tidings.broker.security.permissions import Need, Permissions, needs_for_call


def test_schema_calls_need_admin_on_the_schema_and_publish_on_the_pattern() -> None:
    assert needs_for_call("schema.register", {"name": "orders.Placed", "schema": {}}) == [
        Need("admin", "orders.Placed")]
    assert needs_for_call("schema.check", {"name": "S"}) == [Need("admin", "S")]
    assert needs_for_call("schema.get", {"name": "S"}) == [Need("admin", "S")]
    assert needs_for_call("schema.list", {}) == [Need("admin", ">")]
    assert needs_for_call("schema.bindings", {}) == [Need("admin", ">")]
    assert needs_for_call("schema.bind", {"pattern": "orders.*", "name": "S", "dead_letter": "bad"}) == [
        Need("publish", "orders.*"), Need("admin", "S"), Need("admin", "bad")]
    assert needs_for_call("schema.unbind", {"pattern": "orders.*"}) == [Need("publish", "orders.*")]


def test_a_user_confined_to_a_prefix_cannot_bind_outside_it() -> None:
    perms = Permissions({"admin": ["team1.>"], "publish": ["team1.>"]})
    assert perms.check_call("schema.bind", {"pattern": "team1.orders", "name": "team1.Order"}) is None
    assert perms.check_call("schema.bind", {"pattern": "payments.>", "name": "team1.Order"}) == Need(
        "publish", "payments.>")
    assert perms.check_call("schema.register", {"name": "other.Order"}) == Need("admin", "other.Order")
    assert perms.check_call("schema.list", {}) == Need("admin", ">")
