"""net/ports.py: a ConnectionActor needs nothing of the broker but its BrokerPort.

The actor runs here against a small in-test port (no Broker, no durable
layer, no store) over a real loopback socket: HELLO is admitted through the
port, WELCOME carries the port's info and is followed by what ``opened``
queues, a request goes to ``handle_request``, a PUB is routed through the
port's router, and closing calls ``detach``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio

from tidings.protocol import NEED_DATA, Connection, ErrorCode, Role
from tidings.protocol import frames as F

from tidings.broker.config import Config
from tidings.broker.net.connection import ConnectionActor, Subscription
from tidings.broker.net.ports import BrokerPort
from tidings.broker.ops.limits import ResourceMonitor
from tidings.broker.ops.stats import Stats
from tidings.broker.router import Router
from tidings.broker.security.audit import AuditLog

WAIT = 10.0


class StubPort:
    """A BrokerPort with nothing behind it but lists of what was asked."""

    def __init__(self, tmp: str) -> None:
        self.config = Config(port=0, data_dir=tmp)
        self.stats = Stats()
        self.audit = AuditLog(lambda line: None)
        self.monitor = ResourceMonitor(memory_high_water=0, min_free_disk=0, data_dir=tmp, interval=1.0)
        self.router: Router[Subscription] = Router()
        self.durable_match = None
        self.schemas = SimpleNamespace(active=False)  # no subject is schema-bound
        self.filtering = SimpleNamespace(active=False)  # no content filter anywhere
        self.shutting_down = False
        self.calls: list[str] = []
        self.detached = anyio.Event()

    async def admit(self, conn: ConnectionActor, hello: F.Hello) -> tuple[ErrorCode, str] | None:
        self.calls.append(f"admit {hello.client_name}")
        return None

    def welcome_info(self, conn: ConnectionActor) -> dict[str, Any]:
        return {"max_frame": conn.conn.max_frame, "stub": True}

    def opened(self, conn: ConnectionActor) -> None:
        self.calls.append("opened")
        conn.push_wire([F.Op.NOTICE, "hello-from-port", {}])

    async def handle_request(self, conn: ConnectionActor, frame: Any) -> None:
        self.calls.append(type(frame).__name__)
        if type(frame) is F.Sub:
            sub = Subscription(conn, frame.sid, frame.pattern, frame.group)
            conn.subs[frame.sid] = sub
            self.router.add(frame.pattern, sub, frame.group)
            conn.push_wire([F.Op.OK, frame.rid, None])

    async def publish_durable(self, conn: ConnectionActor, batch: list[Any]) -> None:
        raise AssertionError("no durable targets in this test")

    def detach(self, conn: ConnectionActor) -> None:
        if "detach" not in self.calls:
            self.calls.append("detach")
        for sub in conn.subs.values():
            self.router.remove(sub.pattern, sub, sub.group)
        conn.subs.clear()
        self.detached.set()


async def read_frame(stream: Any, conn: Connection) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            return ev
        conn.receive_data(await stream.receive())


async def test_a_connection_runs_on_its_port_alone(tmp_path: Any) -> None:
    port = StubPort(str(tmp_path))
    typed: BrokerPort[ConnectionActor] = port  # the stub satisfies the protocol (checked by mypy)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    address = listener.extra(anyio.abc.SocketAttribute.local_address)

    async def serve_one(stream: Any) -> None:
        await ConnectionActor(typed, stream, 1, "test").run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_one)
        with anyio.fail_after(WAIT):
            client = await anyio.connect_tcp("127.0.0.1", int(address[1]))
            c = Connection(Role.CLIENT)
            await client.send(c.send(F.Hello(F.PROTOCOL_VERSION, "stub-client")))
            welcome = await read_frame(client, c)
            assert isinstance(welcome, F.Welcome) and welcome.info["stub"] is True
            notice = await read_frame(client, c)
            assert isinstance(notice, F.Notice) and notice.kind == "hello-from-port"
            await client.send(c.send(F.Sub(1, 7, "a.b")))
            ok = await read_frame(client, c)
            assert isinstance(ok, F.Ok) and ok.rid == 1
            await client.send(c.send(F.Pub([["a.b", b"x", {}, None, 0, None]])))
            msg = await read_frame(client, c)
            assert isinstance(msg, F.Msg) and msg.sid == 7
            assert port.stats.published == 1
            await client.aclose()
            await port.detached.wait()
        tg.cancel_scope.cancel()
    await listener.aclose()
    assert port.calls[:3] == ["admit stub-client", "opened", "Sub"] and port.calls[-1] == "detach"
    assert port.router.count == 0
