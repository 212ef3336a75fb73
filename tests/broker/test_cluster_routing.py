"""The cluster's hooks in the publish path, in-process: a peer's interest is a subscriber
in the router (broker/cluster/route.py RemoteSub), queue groups prefer local members
(broker/router.py), and a message is queued once per peer however many of its
patterns match; forwarded messages reach local subscribers only (net/publish.py)."""

from __future__ import annotations

from typing import Any

from tidings.broker.cluster.route import RemoteSub, Route
from tidings.broker.net.publish import Filtering, deliver_forwarded, route
from tidings.broker.router import Router


class Conn:
    def __init__(self) -> None:
        self.got: list[tuple[int, Any]] = []

    def push_msg(self, sid: int, item: list[Any], size: int) -> None:
        self.got.append((sid, item[1]))


class Sub:
    __slots__ = ("conn", "sid", "pattern", "group", "flt")

    def __init__(self, conn: Conn, sid: int, pattern: str, group: str | None = None) -> None:
        self.conn, self.sid, self.pattern, self.group, self.flt = conn, sid, pattern, group, None


def bare_route() -> Route:
    r = Route.__new__(Route)  # only the publish-path half: no socket, no tasks
    r._out, r._groups, r._last, r._pending, r._idle, r.closed, r.dropped = [], {}, None, 0, False, False, 0
    return r


def pub(subject: str, payload: bytes) -> list[Any]:
    return [subject, payload, None, None, 0, None]


def test_a_peer_gets_each_message_once_with_the_groups_it_was_picked_for() -> None:
    router: Router[Any] = Router()
    peer = bare_route()
    for iid, (pattern, group) in enumerate([("a.>", None), ("a.*", None), ("a.b", "workers")], 1):
        router.add(pattern, RemoteSub(peer, iid, pattern, group, 1), group)
    route(router, None, [pub("a.b", b"1"), pub("a.c", b"2")])
    assert [m[1] for m in peer._out] == [b"1", b"2"]  # once each, although two or three patterns match
    assert peer._groups == {0: [3]}  # the group rides along with the first message


def test_queue_group_prefers_a_local_member_then_round_robins_remote_brokers() -> None:
    router: Router[Any] = Router()
    b, c = bare_route(), bare_route()
    router.add("jobs", RemoteSub(b, 7, "jobs", "w", 2), "w")
    router.add("jobs", RemoteSub(c, 9, "jobs", "w", 1), "w")
    route(router, None, [pub("jobs", str(i).encode()) for i in range(4)])
    assert [m[1] for m in b._out] == [b"0", b"2"] and [m[1] for m in c._out] == [b"1", b"3"]
    local = Conn()
    router.add("jobs", Sub(local, 1, "jobs", "w"), "w")
    route(router, None, [pub("jobs", b"x")])
    assert local.got == [(1, b"x")] and len(b._out) == 2 and len(c._out) == 2


def test_forwarded_messages_reach_local_subscribers_only() -> None:
    router: Router[Any] = Router()
    other_peer = bare_route()
    router.add("t.>", RemoteSub(other_peer, 1, "t.>", None, 1))
    local = Conn()
    router.add("t.>", Sub(local, 5, "t.>"))
    members = [Conn(), Conn()]
    for i, m in enumerate(members):
        router.add("t.*", Sub(m, 10 + i, "t.*", "g"), "g")
    g = router.group("t.*", "g")
    fl = Filtering(Router(), lambda m: None)
    n = deliver_forwarded(router, fl, [["t.x", b"1", None, None], ["t.y", b"2", None, None]], {1: [g]}, RemoteSub)
    assert n == 3
    assert local.got == [(5, b"1"), (5, b"2")]
    assert sum(len(m.got) for m in members) == 1  # the group only for the message it was picked for
    assert other_peer._out == []  # never forwarded again


async def test_a_broker_on_every_address_must_name_its_cluster_address(tmp_path: Any) -> None:
    import pytest

    from tidings.broker.cluster.node import Cluster
    from tidings.broker.config import Config, ConfigError

    cfg = Config(data_dir=str(tmp_path), store="postgresql://t@127.0.0.1:1/db", cluster=True)
    cluster = Cluster(cfg, Router(), Filtering(Router(), lambda m: None))
    with pytest.raises(ConfigError, match="set cluster_address"):
        await cluster.start(None, ("0.0.0.0", 7421))  # type: ignore[arg-type]  # refused before any task starts
