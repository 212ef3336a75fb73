"""Pub/sub, queue groups and request/reply across the brokers of a cluster (issue 13,
item 2): real brokers on one fresh PostgreSQL database (tests/clustertools.py).

Interest travels between brokers asynchronously, so a test first waits until the
publishing broker knows the subscribers (``interest_barrier``: a probe subscription
made after the real ones on the subscriber's broker is seen by the publisher's
broker, and interest changes travel in order on one route). Absence is proven
without sleeping: one publisher's messages reach a subscription in order, so once
it sees a sentinel published after everything else, nothing else is coming.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
import uuid
from typing import Any

import anyio
import msgpack
import pytest

from tidings.client import Client, Subscription, connect
from tidings.client.errors import NoRespondersError

from tests.clustertools import Cluster
from tests.brokerproc import BrokerProcess

pytest_plugins = ["tests.clustertools", "tests.pgserver"]

WAIT = 30.0  # bound on one wait for a message or a state


async def stats(tc: Client) -> dict[str, Any]:
    return await tc.call("stats", {})


async def wait_for(pred: Any, what: str, timeout: float = WAIT) -> None:
    """Poll ``await pred()`` (bounded, with a generous overall timeout)."""
    with anyio.fail_after(timeout):
        while not await pred():
            await anyio.sleep(0.05)


async def routes_up(clients: list[Client]) -> None:
    """Wait until every broker has a route to every other."""
    n = len(clients) - 1

    async def ok() -> bool:
        for tc in clients:
            info = (await stats(tc))["cluster"]
            if info["routes"] < n:
                return False
        return True
    await wait_for(ok, f"{n} routes per broker")


async def interest_barrier(sub_side: Client, pub_side: Client) -> None:
    """Return once ``pub_side``'s broker knows every subscription ``sub_side`` made before."""
    probe = f"probe.{uuid.uuid4().hex}"
    sub = await sub_side.subscribe(probe)
    await sub_side.flush()
    with anyio.fail_after(WAIT):
        while True:
            await pub_side.publish(probe, b"")
            await pub_side.flush()
            with anyio.move_on_after(0.2):
                await sub.next()
                break
    await sub.close()


async def take_until_sentinel(sub: Subscription, limit: int = 100_000) -> list[bytes]:
    got: list[bytes] = []
    with anyio.fail_after(WAIT):
        for _ in range(limit):
            m = await sub.next()
            if m.headers and m.headers.get("sentinel"):
                return got
            got.append(m.payload)
    raise AssertionError("no sentinel")


async def responder(tc: Client, subject: str, tag: bytes, group: str | None = None) -> Subscription:
    """A subscription that answers every request with ``tag`` (run by the caller's task group)."""
    return await tc.subscribe(subject, group)


async def serve_requests(sub: Subscription, tag: bytes) -> None:
    async for m in sub:
        await m.respond(tag + b":" + m.payload)


def forwarded(info: dict[str, Any], peer_id: str) -> int:
    return next(p["forwarded"] for p in info["peers"] if p["id"] == peer_id)


async def test_pubsub_across_three_brokers_once_each(start_cluster: Cluster) -> None:
    a, b, c = start_cluster(3)
    async with connect(a.url) as ta, connect(b.url) as tb, connect(c.url) as tc:
        await routes_up([ta, tb, tc])
        # two overlapping patterns on B: B must still get each message from A once
        sb1 = await tb.subscribe("news.>")
        sb2 = await tb.subscribe("news.*")
        sc = await tc.subscribe("news.sports")
        sa = await ta.subscribe("news.sports")
        await interest_barrier(tb, ta)
        await interest_barrier(tc, ta)
        before = (await stats(ta))["cluster"]
        for i in range(100):
            await ta.publish("news.sports", str(i).encode())
        await ta.publish("news.sports", b"", headers={"sentinel": "1"})
        want = [str(i).encode() for i in range(100)]
        for sub in (sb1, sb2, sc, sa):
            assert await take_until_sentinel(sub) == want
        # ... and each peer got each message over its route once (101 with the sentinel),
        # although B has two matching patterns: messages from a route are never forwarded again
        after = (await stats(ta))["cluster"]
        b_id, c_id = (await stats(tb))["cluster"]["id"], (await stats(tc))["cluster"]["id"]
        assert forwarded(after, b_id) - forwarded(before, b_id) == 101
        assert forwarded(after, c_id) - forwarded(before, c_id) == 101
        for other in (tb, tc):
            peers = (await stats(other))["cluster"]["peers"]
            assert all(p["forwarded"] < 100 for p in peers), peers  # B and C forwarded nothing of it


async def test_wildcard_interest_and_unsubscribe(start_cluster: Cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await routes_up([ta, tb])
        star = await tb.subscribe("orders.*.created")
        full = await tb.subscribe("orders.>")
        await interest_barrier(tb, ta)
        subjects = ["orders.eu.created", "orders.eu.deleted", "orders.eu.created.v2", "billing.eu.created",
                    "orders"]
        for s in subjects:
            await ta.publish(s, s.encode())
        await ta.publish("orders.x.created", b"", headers={"sentinel": "1"})
        assert await take_until_sentinel(star) == [b"orders.eu.created"]
        assert await take_until_sentinel(full) == [b"orders.eu.created", b"orders.eu.deleted",
                                                   b"orders.eu.created.v2"]
        # once B has no subscription left, A stops forwarding
        await star.close()
        await full.close()
        await interest_barrier(tb, ta)
        b_id = (await stats(tb))["cluster"]["id"]
        sent = forwarded((await stats(ta))["cluster"], b_id)
        for i in range(50):
            await ta.publish("orders.eu.created", b"x")
        await ta.flush()
        assert forwarded((await stats(ta))["cluster"], b_id) == sent
        # a clean shutdown (routes closed first, then the row deleted) ends with status 0,
        # and A sees B leave without waiting for its lease
        assert b.terminate() == 0

        async def b_gone() -> bool:
            return not (await stats(ta))["cluster"]["peers"]
        await wait_for(b_gone, "B gone from A's view")
    assert a.terminate() == 0


async def test_queue_group_across_brokers_one_member_each(start_cluster: Cluster) -> None:
    a, b, c = start_cluster(3)
    async with connect(a.url) as ta, connect(b.url) as tb, connect(c.url) as tc:
        await routes_up([ta, tb, tc])
        members = [await tb.subscribe("jobs.*", "workers"), await tb.subscribe("jobs.*", "workers"),
                   await tc.subscribe("jobs.*", "workers")]
        ends = [await tb.subscribe("end"), await tc.subscribe("end")]
        await interest_barrier(tb, ta)
        await interest_barrier(tc, ta)
        n = 300
        for i in range(n):
            await ta.publish("jobs.run", str(i).encode())
        await ta.publish("end", b"")
        for e in ends:  # the route and each broker's mailbox keep order: all jobs were handed over
            with anyio.fail_after(WAIT):
                await e.next()
        for tcl in (tb, tc):
            await tcl.flush()
            await tcl.flush()
        got: list[list[bytes]] = []
        for m in members:
            got.append([(await m.next()).payload for _ in range(m.pending)])  # what was handed over
        everything = [p for mine in got for p in mine]
        assert sorted(everything) == sorted(str(i).encode() for i in range(n))  # each exactly once
        assert got[0] or got[1]
        assert got[2], "A picks among the brokers with members: C got none"
        # a local member is preferred: with one on A, A keeps the jobs
        local = await ta.subscribe("jobs.*", "workers")
        for i in range(20):
            await ta.publish("jobs.run", b"local")
        with anyio.fail_after(WAIT):
            for _ in range(20):
                assert (await local.next()).payload == b"local"


async def test_request_reply_and_no_responders_across_brokers(start_cluster: Cluster) -> None:
    a, b, c = start_cluster(3)
    async with connect(a.url) as ta, connect(b.url) as tb, connect(c.url) as tc:
        await routes_up([ta, tb, tc])
        # nobody listens anywhere: no-responders at once
        with pytest.raises(NoRespondersError):
            await ta.request("svc.echo", b"hi", timeout=WAIT)
        async with anyio.create_task_group() as tg:
            sub = await tc.subscribe("svc.echo", "echoers")
            tg.start_soon(serve_requests, sub, b"C")
            await interest_barrier(tc, ta)
            # the responder is on C only: A forwards, C answers, the reply comes back over the route
            for i in range(10):
                reply = await ta.request("svc.echo", str(i).encode(), timeout=WAIT)
                assert reply.payload == f"C:{i}".encode()
            # and from B too (no-responders is not answered while any broker has a responder)
            await interest_barrier(tc, tb)
            assert (await tb.request("svc.echo", b"b", timeout=WAIT)).payload == b"C:b"
            tg.cancel_scope.cancel()


async def test_filters_and_permissions_hold_for_forwarded_messages(start_cluster: Cluster, tmp_path: Any) -> None:
    from tidings.client.errors import PermissionDeniedError

    from tests.integration.securitytools import PASSWORDS, user, write_config

    cfg = write_config(tmp_path / "tidings.toml", users={
        **user("admin", publish=[">"], subscribe=[">"], consume=[">"], admin=[">"]),
        **user("alice", publish=["probe.>"], subscribe=["feed.public.>", "probe.>", "_INBOX.>"]),
    })
    a, b = start_cluster(2, "--config", str(cfg))
    admin = {"user": "admin", "password": PASSWORDS["admin"]}
    alice = {"user": "alice", "password": PASSWORDS["alice"]}
    async with connect(a.url, **admin) as ta, connect(b.url, **admin) as tb_admin, \
            connect(b.url, **alice) as tb:
        await routes_up([ta, tb_admin])
        with pytest.raises(PermissionDeniedError):
            await tb.subscribe("feed.>")  # B's own check: alice may not see feed.secret
        public = await tb.subscribe("feed.public.>")
        eu = await tb.subscribe("feed.public.>", match={"region": [{"prefix": "eu-"}]})
        await interest_barrier(tb, ta)
        await ta.publish("feed.secret.x", b"secret")
        await ta.publish("feed.public.a", b"1", headers={"region": "eu-west"})
        await ta.publish("feed.public.b", b"2", headers={"region": "us-east"})
        await ta.publish("feed.public.c", b"", headers={"sentinel": "1", "region": "eu-1"})
        assert await take_until_sentinel(public) == [b"1", b"2"]
        assert await take_until_sentinel(eu) == [b"1"]


async def test_killed_broker_is_dropped_and_restarted_one_rejoins(start_cluster: Cluster) -> None:
    a, b, c = start_cluster(3)
    async with connect(a.url) as ta, connect(b.url) as tb:
        async with connect(c.url) as tc:
            await routes_up([ta, tb, tc])
            c_id = (await stats(tc))["cluster"]["id"]
        c.kill()  # SIGKILL: no goodbye; its row stays until the lease lapses

        async def c_gone() -> bool:
            return all(p["id"] != c_id for p in (await stats(ta))["cluster"]["peers"])
        await wait_for(c_gone, "C dropped from A's membership after its lease", timeout=60.0)
        # A and B keep serving each other
        sub = await tb.subscribe("after.kill")
        await interest_barrier(tb, ta)
        await ta.publish("after.kill", b"ok")
        await ta.publish("after.kill", b"", headers={"sentinel": "1"})
        assert await take_until_sentinel(sub) == [b"ok"]
        # C comes back (a new member, a new id) and joins the mesh again
        c.restart()
        async with connect(c.url) as tc:
            await routes_up([ta, tb, tc])
            assert (await stats(tc))["cluster"]["id"] != c_id
            sc = await tc.subscribe("after.restart")
            await interest_barrier(tc, ta)
            await ta.publish("after.restart", b"back")
            await ta.publish("after.restart", b"", headers={"sentinel": "1"})
            assert await take_until_sentinel(sc) == [b"back"]


def _frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _read_frames(sock: socket.socket, n: int) -> list[Any]:
    """Up to ``n`` frames (fewer if the broker closes first)."""
    buf = b""
    out: list[Any] = []
    while len(out) < n:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            size = struct.unpack(">I", buf[:4])[0]
            out.append(msgpack.unpackb(buf[4:4 + size], raw=False))
            buf = buf[4 + size:]
        if len(out) >= n:
            break
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return out


async def test_unauthenticated_route_is_refused(start_cluster: Cluster) -> None:
    a, b = start_cluster(2)
    async with connect(a.url) as ta, connect(b.url) as tb:
        await routes_up([ta, tb])
        info = (await stats(ta))["cluster"]
        watched = await ta.subscribe("target.>")
        await ta.flush()
        for attempt in ("wrong proof", "no proof"):
            with socket.create_connection((a.host, a.port), timeout=WAIT) as sock:
                sock.sendall(_frame([1, 1, "intruder", None,
                                     {"route": {"id": "intruder", "to": info["id"], "nonce": b"n" * 16}}]))
                welcome = _read_frames(sock, 1)[0]
                assert welcome[0] == 64 and "proof" in welcome[3]["route"]  # the broker proves itself...
                forged = [102, [["target.x", b"forged", None, None]], None]
                first = [100, b"\0" * 32] if attempt == "wrong proof" else forged
                sock.sendall(_frame(first) + _frame(forged))
                rest = _read_frames(sock, 5)
                assert rest and rest[0][0] == 66 and rest[0][2] == 10, rest  # ERR AUTH_FAILED, then closed
                assert len(rest) == 1
        await ta.publish("target.x", b"real")
        await ta.publish("target.x", b"", headers={"sentinel": "1"})
        assert await take_until_sentinel(watched) == [b"real"]  # nothing forged got through
        assert (await stats(ta))["cluster"]["routes_refused"] == info["routes_refused"] + 2

        from tests.integration.securitytools import audit_lines

        async def audited() -> bool:  # a refused route is a failed login in the audit log
            return any(x["event"] == "auth_failed" and x.get("method") == "route" and x["user"] == "intruder"
                       for x in audit_lines(a.data_dir))
        await wait_for(audited, "the refused routes in A's audit log")


async def test_a_broker_outside_a_cluster_refuses_routes(start_broker: Any) -> None:
    plain = start_broker()
    with socket.create_connection((plain.host, plain.port), timeout=WAIT) as sock:
        sock.sendall(_frame([1, 1, "intruder", None, {"route": {"id": "x", "to": "y", "nonce": b"n" * 16}}]))
        frames = _read_frames(sock, 2)
        assert frames[0][0] == 66 and frames[0][2] == 4  # ERR BAD_STATE: not in a cluster
        assert len(frames) == 1
