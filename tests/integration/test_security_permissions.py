"""The permission matrix against a real broker: publish, subscribe, consume
and admin, each allowed, denied by a deny pattern (deny beats allow) and
denied by default; a forbidden publish stores nothing and the connection
stays usable; denials are audited (rate-limited)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from queuetools import holds
from rawclient import RawClient
from securitytools import PASSWORDS, WAIT, audit_lines, user, write_config

from tidings.client import Client, connect
from tidings.client import errors as E
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F

ADMIN = {"publish": [">"], "subscribe": [">"], "consume": [">"], "admin": [">"]}
ALICE = {
    "publish": ["orders.>", "jobs.>", "_INBOX.>"],
    "publish_deny": ["orders.internal.>"],
    "subscribe": ["orders.>", "_INBOX.>", "jobs.>"],
    "subscribe_deny": ["orders.secret.>"],
    "consume": ["jobs", "jobs/workers"],  # queue or stream "jobs", and group "workers" of stream "jobs"
    "admin": ["jobs", "jobs.dlq"],
}


@pytest.fixture
def perm_broker(start_broker, tmp_path: Path):
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", **ADMIN),
        **user("alice", **ALICE),
        **user("bob"),  # no permissions at all: nothing is allowed
    })
    return start_broker("--config", str(cfg))


def login(b: Any, name: str) -> connect:
    return connect(b.url, user=name, password=PASSWORDS[name], reconnect=False)


async def assert_usable(tc: Client, subject: str = "orders.eu.ping") -> None:
    """The connection still works: an allowed publish comes back to an allowed subscription."""
    sub = await tc.subscribe(subject)
    await tc.publish(subject, b"still here")
    await tc.flush(timeout=WAIT)
    assert (await sub.next(timeout=WAIT)).payload == b"still here"
    await sub.close()


# ------------------------------------------------------------------ publish

async def test_allowed_publish_is_delivered(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        sub = await adm.subscribe("orders.>")
        await alice.publish("orders.eu.created", b"ok")
        assert (await sub.next(timeout=WAIT)).payload == b"ok"


@pytest.mark.parametrize("subject, why", [("orders.internal.audit", "deny beats allow"),
                                          ("payments.eu.created", "not in the allow list")])
async def test_denied_publish_with_confirm_raises_and_is_not_delivered(perm_broker, subject: str, why: str) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        sub = await adm.subscribe(">")
        with pytest.raises(E.PermissionDeniedError) as info:
            await alice.publish(subject, b"forbidden", confirm=True)
        assert subject in str(info.value), why
        await alice.publish("orders.eu.after", b"allowed")
        await alice.flush(timeout=WAIT)
        got = await sub.next(timeout=WAIT)
        assert (got.subject, got.payload) == ("orders.eu.after", b"allowed")  # the forbidden one never came
        await assert_usable(alice)


async def test_denied_publish_without_confirm_gets_one_err_per_frame(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, RawClient.open(perm_broker.host, perm_broker.port) as rc:
        await rc.send(F.Hello(F.PROTOCOL_VERSION, "raw", {"user": "alice", "password": PASSWORDS["alice"]}, {}))
        await rc.read_until(lambda f: isinstance(f, F.Welcome), WAIT)
        sub = await adm.subscribe("orders.>")
        msgs = [["orders.internal.x", b"no", None, None, 0, None] for _ in range(3)]
        msgs.append(["orders.eu.ok", b"yes", None, None, 0, None])
        msgs.append(["orders.internal.y", b"no", None, None, 7, None])  # asks for a confirm
        await rc.send_wire([F.Op.PUB, msgs])
        await rc.ping()
        errs = [f for f in rc.frames if isinstance(f, F.Err)]
        assert len(errs) == 1 and errs[0].code == ErrorCode.PERMISSION_DENIED and errs[0].rid == 0, errs
        assert "orders.internal.x" in errs[0].message and "2 more" in errs[0].message
        confirms = [c for f in rc.frames if isinstance(f, F.Confirm) for c in f.items]
        assert confirms == [[7, ErrorCode.PERMISSION_DENIED, "permission denied: publish on 'orders.internal.y'"]]
        got = await sub.next(timeout=WAIT)
        assert got.subject == "orders.eu.ok"
        await adm.flush(timeout=WAIT)
        assert sub.pending == 0


async def test_forbidden_publish_stores_nothing(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        await adm.declare_queue("internal", bind=["orders.internal.>"])
        await alice.wait_connected()
        with pytest.raises(E.PermissionDeniedError):
            await alice.publish("orders.internal.secret", b"x" * 100, confirm=True)
        assert (await adm.queue_info("internal"))["depth"] == 0
        # the same subject from an allowed user is stored
        await adm.publish("orders.internal.secret", b"y", confirm=True)
        assert (await adm.queue_info("internal"))["depth"] == 1
        await assert_usable(alice)


# ---------------------------------------------------------------- subscribe

@pytest.mark.parametrize("pattern, allowed", [
    ("orders.eu.*", True),
    ("orders.eu.>", True),
    ("orders.secret.keys", False),  # deny beats allow
    ("orders.>", False),  # could match orders.secret.*: refused up front
    ("orders.*.created", False),  # likewise
    ("payments.>", False),  # not allowed at all
    (">", False),
])
async def test_subscribe_matrix(perm_broker, pattern: str, allowed: bool) -> None:
    async with login(perm_broker, "alice") as alice:
        if allowed:
            sub = await alice.subscribe(pattern)
            await sub.close()
        else:
            with pytest.raises(E.PermissionDeniedError):
                await alice.subscribe(pattern)
        await assert_usable(alice)


async def test_request_reply_needs_inbox_permissions(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice, \
            login(perm_broker, "bob") as bob:
        sub = await adm.subscribe("orders.service")

        async def serve() -> None:
            m = await sub.next(timeout=WAIT)
            await adm.publish(m.reply, b"pong")

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            reply = await alice.request("orders.service", b"ping", timeout=WAIT)
            assert reply.payload == b"pong"
        # bob may not subscribe to an inbox, so he cannot even ask
        with pytest.raises(E.PermissionDeniedError):
            await bob.request("orders.service", b"ping", timeout=WAIT)


# ------------------------------------------------------------------ consume

async def test_consume_matrix(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        await adm.declare_queue("jobs", bind=["jobs.>"])
        await adm.declare_queue("other", bind=["other.>"])
        await alice.wait_connected()
        await alice.publish("jobs.one", b"1")
        async with alice.consume("jobs") as deliveries:
            d = await deliveries.next(timeout=WAIT)
            assert d.payload == b"1"
            await d.ack(wait=True)  # acks are covered by the consume permission
        with pytest.raises(E.PermissionDeniedError):
            async with alice.consume("other"):
                pass
        assert (await adm.queue_info("jobs"))["depth"] == 0
        await assert_usable(alice)


async def test_stream_consume_matrix(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        await adm.declare_stream("jobs", partitions=2, bind=["jobs.>"])
        await adm.declare_stream("other", bind=["other.>"])
        await alice.wait_connected()
        for i in range(4):
            await alice.publish(f"jobs.{i}", str(i).encode(), key=str(i))
        async with alice.stream_consume("jobs", "workers") as msgs:  # a group member: acks commit
            got = []
            for _ in range(4):
                m = await msgs.next(timeout=WAIT)
                got.append(m.payload)
                await m.ack()
        assert sorted(got) == [b"0", b"1", b"2", b"3"]
        replay = [m.payload async for m in alice.read_stream("jobs", 0)]  # a plain reader
        assert replay
        with pytest.raises(E.PermissionDeniedError, match="jobs/billing"):  # another group of the same stream
            async with alice.stream_consume("jobs", "billing"):
                pass
        with pytest.raises(E.PermissionDeniedError):
            async with alice.stream_consume("other", "workers"):
                pass
        with pytest.raises(E.PermissionDeniedError):
            async for _m in alice.read_stream("other", 0):
                pass
        await assert_usable(alice)


# -------------------------------------------------------------------- admin

async def test_admin_matrix(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        await alice.declare_queue("jobs", bind=["jobs.>"])  # admin on jobs and jobs.dlq, subscribe on jobs.>
        assert await alice.purge_queue("jobs") == 0
        await adm.declare_queue("other", bind=["other.>"])
        for call in (lambda: alice.purge_queue("other"),
                     lambda: alice.declare_queue("mine", bind=["mine.>"]),
                     lambda: alice.declare_queue("jobs2", bind=["payments.>"]),
                     lambda: alice.call("stats"),
                     lambda: alice.list_queues(),
                     lambda: alice.dlq_redrive("other")):
            with pytest.raises(E.PermissionDeniedError):
                await call()
        assert (await alice.call("server.info"))["auth"] is True  # harmless: open to every user
        stats = await adm.call("stats")
        assert stats["auth"]["enabled"] is True
        await assert_usable(alice)


async def test_user_without_permissions_may_do_nothing(perm_broker) -> None:
    async with login(perm_broker, "bob") as bob:
        with pytest.raises(E.PermissionDeniedError):
            await bob.publish("anything", b"x", confirm=True)
        with pytest.raises(E.PermissionDeniedError):
            await bob.subscribe("anything")
        with pytest.raises(E.PermissionDeniedError):
            await bob.call("stats")
        with pytest.raises(E.PermissionDeniedError):
            await bob.declare_queue("q", bind=["q.>"])
        await bob.flush(timeout=WAIT)  # still connected and answered


# -------------------------------------------------------------------- audit

async def test_denials_and_admin_operations_are_audited_and_rate_limited(perm_broker) -> None:
    async with login(perm_broker, "admin") as adm, login(perm_broker, "alice") as alice:
        await adm.declare_queue("jobs", bind=["jobs.>"])
        await adm.purge_queue("jobs")
        for _ in range(50):
            with pytest.raises(E.PermissionDeniedError):
                await alice.subscribe("payments.>")
        with pytest.raises(E.PermissionDeniedError):
            await alice.purge_queue("other")
    assert perm_broker.terminate() == 0
    lines = audit_lines(perm_broker.data_dir)
    admin_ops = [(x["user"], x["method"], x["target"], x["outcome"]) for x in lines if x["event"] == "admin"]
    assert admin_ops == [("admin", "queue.declare", "jobs", "ok"), ("admin", "queue.purge", "jobs", "ok")]
    denied = [x for x in lines if x["event"] == "permission_denied" and x["action"] == "subscribe"]
    assert 1 <= len(denied) <= 10, len(denied)  # 5 per second at most, whatever the flood
    assert denied[0]["name"] == "payments.>" and denied[0]["user"] == "alice"
    suppressed = sum(x["suppressed"] for x in lines if x["event"] == "suppressed" and x["of"] == "permission_denied"
                     and x.get("action") == "subscribe")
    assert len(denied) + suppressed == 50
    assert any(x["event"] == "permission_denied" and x["action"] == "admin" and x["name"] == "other"
               for x in lines)


# ------------------------------------------------- docs/OPERATIONS.md, row by row

async def _consume_queue(tc: Client) -> None:
    async with tc.consume("jobs") as deliveries:
        await (await deliveries.next(timeout=WAIT)).ack(wait=True)


async def _read_stream(tc: Client) -> None:
    assert [m.payload async for m in tc.read_stream("ev", 0)] == [b"e"]


async def _join_group(tc: Client) -> None:
    async with tc.stream_consume("ev", "g") as msgs:
        await (await msgs.next(timeout=WAIT)).ack()


async def _subscribe(tc: Client) -> None:
    await (await tc.subscribe("news.>")).close()


async def _backup(tc: Client) -> None:
    """Past the permission check is enough here: the path's directory does not
    exist, so nothing is written (where backups may go is the backup settings'
    business, tested in test_ops_backup.py)."""
    try:
        await tc.call("backup", {"path": "/nonexistent-tidings-dir/backup.db"})
    except E.PermissionDeniedError:
        raise
    except E.ServerError:
        pass


async def _delete_group(tc: Client) -> None:
    """Past the permission check is enough: the group does not exist (NOT_FOUND)."""
    with pytest.raises(E.NotFoundError):
        await tc.delete_group("ev", "nogroup")


NEW_Q = {"admin": ["new", "new.dlq"], "subscribe": ["new.>"]}
NEAR_JOBS = {"admin": ["jobs.dlq"], "consume": ["jobs"]}  # rights near "jobs", but not admin on it

# (row of the permission table, permissions that allow it, permissions one short, the operation)
TABLE_ROWS: list[tuple[str, dict[str, list[str]], dict[str, list[str]], Any]] = [
    ("publish", {"publish": ["jobs.>"]}, {"publish": ["other.>"]},
     lambda tc: tc.publish("jobs.b", b"x", confirm=True)),
    ("subscribe", {"subscribe": ["news.>"]}, {"subscribe": ["news.eu.>"]}, _subscribe),
    ("consume queue", {"consume": ["jobs"]}, {"consume": ["jobs/g"], "admin": ["jobs"]}, _consume_queue),
    ("consume stream", {"consume": ["ev"]}, {"consume": ["ev/g"]}, _read_stream),
    ("consume group", {"consume": ["ev/g"]}, {"consume": ["ev", "ev/h"]}, _join_group),
    ("queue.declare", NEW_Q, {"admin": ["new"], "subscribe": ["new.>"]},
     lambda tc: tc.declare_queue("new", bind=["new.>"])),
    ("queue.declare bind", NEW_Q, {"admin": ["new", "new.dlq"]},
     lambda tc: tc.declare_queue("new", bind=["new.>"])),
    ("stream.declare", {"admin": ["st", "st.dlq"], "subscribe": ["st.>"]},
     {"admin": ["st"], "subscribe": ["st.>"]}, lambda tc: tc.declare_stream("st", bind=["st.>"])),
    ("queue.info", {"admin": ["jobs"]}, NEAR_JOBS, lambda tc: tc.queue_info("jobs")),
    ("queue.purge", {"admin": ["jobs"]}, NEAR_JOBS, lambda tc: tc.purge_queue("jobs")),
    ("queue.delete", {"admin": ["jobs", "jobs.dlq"]}, {"admin": ["jobs"]}, lambda tc: tc.delete_queue("jobs")),
    ("queue.delete keep_dlq", {"admin": ["jobs"]}, NEAR_JOBS, lambda tc: tc.delete_queue("jobs", keep_dlq=True)),
    ("queue.update", {"admin": ["jobs"]}, NEAR_JOBS, lambda tc: tc.update_queue("jobs", max_deliveries=2)),
    ("dlq.count", {"admin": ["jobs.dlq"]}, {"consume": ["jobs.dlq"]},
     lambda tc: tc.call("dlq.count", {"name": "jobs.dlq"})),
    ("dlq.list", {"consume": ["jobs.dlq"]}, {"admin": ["jobs.dlq"]}, lambda tc: tc.dlq_list("jobs.dlq")),
    ("queue.peek", {"consume": ["jobs"]}, {"admin": ["jobs"]}, lambda tc: tc.peek_queue("jobs")),
    ("dlq.purge", {"admin": ["jobs.dlq"]}, {"consume": ["jobs.dlq"]}, lambda tc: tc.dlq_purge("jobs.dlq")),
    ("dlq.redrive", {"admin": ["jobs.dlq", "jobs"], "publish": ["jobs.>"]}, {"admin": ["jobs.dlq", "jobs"]},
     lambda tc: tc.dlq_redrive("jobs.dlq")),
    ("dlq.redrive to", {"admin": ["jobs.dlq", "other"], "publish": ["other.>"]},
     {"admin": ["jobs.dlq"], "publish": [">"]}, lambda tc: tc.dlq_redrive("jobs.dlq", to="other")),
    ("stream.info", {"admin": ["ev"]}, {"consume": ["ev", "ev/g"]}, lambda tc: tc.stream_info("ev")),
    ("stream.trim", {"admin": ["ev"]}, {"consume": ["ev"]},
     lambda tc: tc.call("stream.trim", {"name": "ev"})),
    ("stream.delete", {"admin": ["ev", "ev.dlq"]}, {"admin": ["ev"]}, lambda tc: tc.delete_stream("ev")),
    ("stream.delete keep_dlq", {"admin": ["ev"]}, {"consume": ["ev"]}, lambda tc: tc.delete_stream("ev", keep_dlq=True)),
    ("stream.update", {"admin": ["ev"]}, {"consume": ["ev"]}, lambda tc: tc.update_stream("ev", max_messages=10)),
    ("stream.groups", {"admin": ["ev"]}, {"consume": ["ev", "ev/>"]}, lambda tc: tc.stream_groups("ev")),
    ("stream.group_delete", {"admin": ["ev"]}, {"consume": ["ev", "ev/>"]}, _delete_group),
    ("stats", {"admin": [">"]}, {"admin": ["jobs", "ev", "other"]}, lambda tc: tc.call("stats")),
    ("queue.list", {"admin": [">"]}, {"admin": ["jobs", "ev", "other"]}, lambda tc: tc.list_queues()),
    ("stream.list", {"admin": [">"]}, {"admin": ["jobs", "ev", "other"]}, lambda tc: tc.list_streams()),
    ("backup", {"admin": [">"]}, {"admin": ["jobs", "ev", "other"]}, _backup),
    ("server.info", {}, None, lambda tc: tc.call("server.info")),
]


@pytest.mark.parametrize("row, allowed, short, op", TABLE_ROWS, ids=[r[0] for r in TABLE_ROWS])
async def test_permission_table_row(start_broker, tmp_path: Path, row: str, allowed: dict[str, list[str]],
                                    short: dict[str, list[str]] | None, op: Any) -> None:
    """Each row of the permission table in docs/OPERATIONS.md: the listed
    permissions allow the operation, and a user holding a near miss (often
    another permission on the same name) is refused."""
    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", **ADMIN),
        **user("alice", **allowed),
        **user("bob", **(short or {})),
    })
    b = start_broker("--config", str(cfg))
    async with login(b, "admin") as adm:
        await adm.declare_queue("jobs", bind=["jobs.>"], max_deliveries=1)
        await adm.declare_queue("other", bind=["other.>"])
        await adm.publish("jobs.a", b"dead")
        async with adm.consume("jobs") as deliveries:
            await (await deliveries.next(timeout=WAIT)).reject("for the table", wait=True)
        await adm.publish("jobs.a", b"live")
        await adm.declare_stream("ev", bind=["ev.>"])
        await adm.publish("ev.a", b"e")
        await holds(adm, "jobs.dlq", 1)  # the reject's move to the DLQ has committed
    if short is not None:
        async with login(b, "bob") as bob:
            await bob.wait_connected()
            with pytest.raises(E.PermissionDeniedError):
                await op(bob)
    async with login(b, "alice") as alice:
        await alice.wait_connected()
        await op(alice)
