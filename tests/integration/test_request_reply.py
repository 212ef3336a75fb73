"""Request/reply against a real broker: answers, no responders, timeouts."""

from __future__ import annotations

import time

import anyio
import pytest

from tidings import client
from tidings.client import connect


async def _echo(sub: client.Subscription, prefix: bytes) -> None:
    async for req in sub:
        await req.respond(prefix + req.payload, headers={"served-by": prefix.decode()})


async def test_request_gets_the_reply(broker) -> None:
    async with connect(broker.url) as server, connect(broker.url) as caller:
        sub = await server.subscribe("svc.echo")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_echo, sub, b"echo:")
            for i in range(20):
                reply = await caller.request("svc.echo", f"hi {i}".encode(), timeout=5)
                assert reply.payload == f"echo:hi {i}".encode()
                assert reply.headers == {"served-by": "echo:"}
            tg.cancel_scope.cancel()


async def test_concurrent_requests_are_matched_to_their_replies(broker) -> None:
    async with connect(broker.url) as server, connect(broker.url) as caller:
        sub = await server.subscribe("svc.*", group="echoers")
        sub2 = await server.subscribe("svc.*", group="echoers")
        results: dict[int, bytes] = {}

        async def ask(i: int) -> None:
            results[i] = (await caller.request("svc.x", str(i).encode(), timeout=5)).payload

        async with anyio.create_task_group() as tg:
            tg.start_soon(_echo, sub, b"a:")
            tg.start_soon(_echo, sub2, b"b:")
            async with anyio.create_task_group() as asks:
                for i in range(50):
                    asks.start_soon(ask, i)
            tg.cancel_scope.cancel()
        assert sorted(results) == list(range(50))
        for i, payload in results.items():
            assert payload in (b"a:%d" % i, b"b:%d" % i)


async def test_request_without_subscribers_raises_no_responders_quickly(broker) -> None:
    async with connect(broker.url) as caller:
        t0 = time.monotonic()
        with pytest.raises(client.NoRespondersError) as info:
            await caller.request("nobody.home", b"?", timeout=30)
        elapsed = time.monotonic() - t0
        assert not isinstance(info.value, client.TimeoutError)
        assert elapsed < 10.0, f"NoRespondersError took {elapsed:.2f}s; the timeout was 30s"
        # the connection is still fine for the next request
        sub = await caller.subscribe("somebody.home")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_echo, sub, b"yes:")
            assert (await caller.request("somebody.home", b"x", timeout=5)).payload == b"yes:x"
            tg.cancel_scope.cancel()


async def test_request_whose_responder_never_answers_times_out(broker) -> None:
    async with connect(broker.url) as server, connect(broker.url) as caller:
        silent = await server.subscribe("svc.silent")
        t0 = time.monotonic()
        with pytest.raises(client.TimeoutError) as info:
            await caller.request("svc.silent", b"?", timeout=0.5)
        elapsed = time.monotonic() - t0
        assert not isinstance(info.value, client.NoRespondersError)
        assert isinstance(info.value, TimeoutError)  # also the builtin, for plain `except TimeoutError`
        assert 0.4 <= elapsed < 5.0
        # the responder did get the request (it just did not answer)
        m = await silent.next(timeout=5)
        assert m.payload == b"?" and m.reply
