"""Request/reply between users (issue 10.8): each user's inbox can be granted
to that user alone, reply subjects cannot be guessed, and a publish may
name only a reply subject its publisher could subscribe to, so neither
replies nor the broker's no-responders message reach another user's inbox."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import anyio
import pytest
from securitytools import PASSWORDS, WAIT, audit_lines, user, write_config

from tidings import client
from tidings.client import connect
from tidings.client import errors as E

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
EXAMPLE = re.compile(r"<!-- request-reply-example:start -->\n```toml\n(.*?)```\n<!-- request-reply-example:end -->",
                     re.DOTALL)
PRICING_PASSWORD = "pricing-secret-pw"


def documented_permissions() -> dict[str, dict[str, list[str]]]:
    """The requester/responder permission example of docs/OPERATIONS.md, parsed."""
    m = EXAMPLE.search(OPERATIONS.read_text(encoding="utf-8"))
    assert m, "docs/OPERATIONS.md lost its request-reply example"
    return {name: entry["permissions"] for name, entry in tomllib.loads(m.group(1))["users"].items()}


async def _serve_prices(sub: client.Subscription, seen: list[str]) -> None:
    async for req in sub:
        assert req.reply is not None
        seen.append(req.reply)
        await req.respond(b"42 for " + req.payload)


async def test_the_documented_requester_permissions_work_as_written(start_broker, tmp_path: Path) -> None:
    doc = documented_permissions()
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("alice", **doc["alice"]),
        **user("pricing", password=PRICING_PASSWORD, **doc["pricing"]),
        **user("carol", subscribe=["_INBOX.carol.>"], publish=["svc.>"]),  # another requester
    })
    b = start_broker("--config", str(cfg))
    async with connect(b.url, user="pricing", password=PRICING_PASSWORD, reconnect=False) as svc, \
            connect(b.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as alice, \
            connect(b.url, user="carol", password=PASSWORDS["carol"], reconnect=False) as carol:
        seen: list[str] = []
        sub = await svc.subscribe("svc.price")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_prices, sub, seen)
            for item in (b"tea", b"coffee"):
                assert (await alice.request("svc.price", item, timeout=WAIT)).payload == b"42 for " + item
            assert (await carol.request("svc.price", b"cake", timeout=WAIT)).payload == b"42 for cake"
            with pytest.raises(E.NoRespondersError):  # the 503 reaches alice's own inbox
                await alice.request("svc.nobody", b"?", timeout=WAIT)
            tg.cancel_scope.cancel()
        # the default inbox is _INBOX.<user>.<random>, and every reply subject ends in a fresh random token
        assert all(re.fullmatch(r"_INBOX\.alice\.[0-9a-f]{16}\.[0-9a-f]{24}", r) for r in seen[:2]), seen
        assert seen[2].startswith("_INBOX.carol.")
        assert seen[0].rsplit(".", 1)[0] == seen[1].rsplit(".", 1)[0] and seen[0] != seen[1]
        # carol cannot listen to alice's replies
        with pytest.raises(E.PermissionDeniedError):
            await carol.subscribe("_INBOX.alice.>")


async def test_a_reply_subject_needs_subscribe_permission(start_broker, tmp_path: Path) -> None:
    """bob may publish requests, but not name alice's inbox as the reply
    subject: before, the broker sent its no-responders 503 there (and a
    responder would have sent bob's answer there)."""
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", publish=[">"], subscribe=[">"]),
        **user("alice", publish=["svc.>"], subscribe=["_INBOX.alice.>"]),
        **user("bob", publish=["svc.>"], subscribe=["_INBOX.bob.>"]),
    })
    b = start_broker("--config", str(cfg))
    async with connect(b.url, user="admin", password=PASSWORDS["admin"], reconnect=False) as adm, \
            connect(b.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as alice, \
            connect(b.url, user="bob", password=PASSWORDS["bob"], reconnect=False) as bob:
        probe = await alice.subscribe("_INBOX.alice.>")
        for target in ("svc.nobody", "svc.somebody"):
            with pytest.raises(E.PermissionDeniedError, match="reply subject"):
                await bob.publish(target, b"x", reply="_INBOX.alice.0123.1", confirm=True)
        watcher = await adm.subscribe("svc.somebody")
        with pytest.raises(E.PermissionDeniedError):
            await bob.publish("svc.somebody", b"x", reply="_INBOX.alice.0123.2", confirm=True)
        # bob's frames were handled before this one: anything they sent alice would come first
        await adm.publish("_INBOX.alice.sentinel", b"end")
        await adm.flush(timeout=WAIT)
        first = await probe.next(timeout=WAIT)
        assert (first.subject, first.payload) == ("_INBOX.alice.sentinel", b"end")
        # bob's own requests still work, and the request frames above reached no responder
        with pytest.raises(E.NoRespondersError):
            await bob.request("svc.nobody", b"?", timeout=WAIT)
        await bob.publish("svc.somebody", b"fine", confirm=True)
        assert (await watcher.next(timeout=WAIT)).payload == b"fine"
    b.terminate()
    denials = [d for d in audit_lines(b.data_dir) if d["event"] == "permission_denied" and d["user"] == "bob"]
    assert denials and denials[0]["action"] == "subscribe" and denials[0]["name"] == "_INBOX.alice.0123.1"


async def test_inbox_prefix_option(broker) -> None:
    async with connect(broker.url) as svc, connect(broker.url, inbox_prefix="apps.billing.inbox") as tc:
        seen: list[str] = []
        sub = await svc.subscribe("svc.price")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_prices, sub, seen)
            assert (await tc.request("svc.price", b"x", timeout=WAIT)).payload == b"42 for x"
            tg.cancel_scope.cancel()
        assert re.fullmatch(r"apps\.billing\.inbox\.[0-9a-f]{16}\.[0-9a-f]{24}", seen[0]), seen
    async with connect(broker.url) as anon:  # no users: _INBOX.<random>
        assert anon.server_info.get("user") is None
    for bad in ("", "a..b", "inbox.*", "in box"):
        with pytest.raises(ValueError):
            client.Client(broker.url, inbox_prefix=bad)


async def test_inbox_prefix_with_a_restricted_user(start_broker, tmp_path: Path) -> None:
    """A user granted replies only under an application prefix (not ``_INBOX``)
    does request/reply with ``inbox_prefix``; without it, the default inbox
    is refused, with a PermissionDeniedError rather than a silent timeout."""
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("alice", publish=["svc.>"], subscribe=["apps.billing.inbox.>"]),
        **user("pricing", password=PRICING_PASSWORD, subscribe=["svc.price"], publish=["apps.billing.inbox.>"]),
    })
    b = start_broker("--config", str(cfg))
    async with connect(b.url, user="pricing", password=PRICING_PASSWORD, reconnect=False) as svc, \
            connect(b.url, user="alice", password=PASSWORDS["alice"], reconnect=False,
                    inbox_prefix="apps.billing.inbox") as alice, \
            connect(b.url, user="alice", password=PASSWORDS["alice"], reconnect=False) as default:
        seen: list[str] = []
        sub = await svc.subscribe("svc.price")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve_prices, sub, seen)
            assert (await alice.request("svc.price", b"tea", timeout=WAIT)).payload == b"42 for tea"
            assert (await alice.request("svc.price", json={"item": "tea"}, timeout=WAIT)).payload \
                == b'42 for {"item":"tea"}'
            with pytest.raises(E.PermissionDeniedError):  # _INBOX.alice.> is not granted here
                await default.request("svc.price", b"tea", timeout=WAIT)
            tg.cancel_scope.cancel()
        assert all(r.startswith("apps.billing.inbox.") for r in seen) and len(seen) == 2, seen
