"""Clients that break the rules: garbage bytes, huge length prefixes, frames
out of order, malformed frames, silence, too many connections.

Each gets an ERR frame or is closed (or both), and never disturbs anyone
else: a control client connected throughout still publishes, receives and
flushes afterwards, and the broker process stays alive.
"""

from __future__ import annotations

import random
import time

import anyio
import msgpack
import pytest

from tidings import client
from tidings.client import Client, connect
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from rawclient import EOF, RawClient, frame_bytes

WAIT = 10.0


def pack(value: object) -> bytes:
    return frame_bytes(msgpack.packb(value, use_bin_type=True))


async def assert_control_works(tc: Client, tag: str) -> None:
    """The control client can still subscribe, publish, receive and flush."""
    sub = await tc.subscribe(f"control.{tag}")
    await tc.publish(f"control.{tag}", tag.encode())
    await tc.flush(timeout=WAIT)
    assert (await sub.next(timeout=WAIT)).payload == tag.encode()
    await sub.close()


# -------------------------------------------------------------- before HELLO

PRE_HELLO = {
    # length prefix 0xFFFFFFFF: refused before any allocation
    "huge_length_prefix": (b"\xff\xff\xff\xff" + b"x" * 64, ErrorCode.FRAME_TOO_LARGE),
    # a plain HTTP request: "GET " read as a length is far over the pre-HELLO limit
    "http_request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
    "ping_first": (pack([F.Op.PING, 1]), ErrorCode.BAD_STATE),
    "pub_first": (pack([F.Op.PUB, [["a", b"x", None, None, 0, None]]]), ErrorCode.BAD_STATE),
    "welcome_first": (pack([F.Op.WELCOME, 1, "me", {}]), ErrorCode.BAD_STATE),
    "not_msgpack_first": (frame_bytes(b"\xc1\xc1\xc1"), ErrorCode.BAD_STATE),
    "empty_frame_first": (frame_bytes(b""), ErrorCode.BAD_STATE),
    "hello_bad_shape": (pack([F.Op.HELLO, 1]), ErrorCode.BAD_STATE),
    "hello_wrong_version": (pack([F.Op.HELLO, 99, "x", None, {}]), ErrorCode.UNSUPPORTED_VERSION),
    "hello_bad_max_frame": (pack([F.Op.HELLO, 1, "x", None, {"max_frame": 1}]), ErrorCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(PRE_HELLO))
async def test_bad_first_bytes_get_err_and_close(module_broker, case: str) -> None:
    broker = module_broker()  # all cases on one broker: none may disturb it for anyone else
    data, code = PRE_HELLO[case]
    async with connect(broker.url) as control:
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.send_raw(data)
            frames = await rc.read_until_eof(timeout=WAIT)
        assert [(type(f), getattr(f, "code", None)) for f in frames] == [(F.Err, code)], frames
        await assert_control_works(control, case)
    assert broker.alive()


@pytest.mark.parametrize("seed", range(8))
async def test_random_bytes_before_hello(module_broker, seed: int) -> None:
    # the bytes follow the connect at once; the HELLO timeout only ends a prefix that never
    # completes, and must not fire first on a busy machine
    broker = module_broker(env={"TIDINGS_HELLO_TIMEOUT": "5"})  # shared by the seeds
    rng = random.Random(seed)
    data = rng.randbytes(rng.choice([3, 100, 5000, 200_000]))
    async with connect(broker.url) as control:
        async with RawClient.open(broker.host, broker.port) as rc:
            try:
                await rc.send_raw(data)
            except (anyio.BrokenResourceError, ConnectionError):
                pass  # the broker may close before it has read everything
            frames = await rc.read_until_eof(timeout=WAIT)
        # at most one ERR, nothing else, then the connection is closed
        assert len(frames) <= 1 and all(isinstance(f, F.Err) for f in frames), frames
        await assert_control_works(control, f"seed{seed}")
    assert broker.alive()


# --------------------------------------------------------- after a good HELLO

def pub(*message: object) -> bytes:
    """A PUB frame carrying one message (valid or not)."""
    return pack([F.Op.PUB, [list(message)]])


POST_HELLO_NONFATAL = {
    "not_msgpack": (frame_bytes(b"\xc1"), ErrorCode.PROTOCOL_ERROR),
    "empty_frame": (frame_bytes(b""), ErrorCode.PROTOCOL_ERROR),
    "trailing_bytes": (frame_bytes(msgpack.packb([F.Op.PING, 5]) + b"\x01"), ErrorCode.PROTOCOL_ERROR),
    "not_an_array": (pack({"op": 2}), ErrorCode.PROTOCOL_ERROR),
    "empty_array": (pack([]), ErrorCode.PROTOCOL_ERROR),
    "unknown_op": (pack([99, 1]), ErrorCode.UNKNOWN_OPERATION),
    "server_only_op": (pack([F.Op.MSG, 1, []]), ErrorCode.UNKNOWN_OPERATION),
    "second_hello": (pack([F.Op.HELLO, 1, "again", None, {}]), ErrorCode.BAD_STATE),
    "sub_bad_pattern": (pack([F.Op.SUB, 7, 1, "a..b", None]), ErrorCode.INVALID_SUBJECT),
    "sub_bad_shape": (pack([F.Op.SUB, 8, "x"]), ErrorCode.PROTOCOL_ERROR),
    "unsub_unknown": (pack([F.Op.UNSUB, 9, 12345]), ErrorCode.NOT_FOUND),
    "pub_payload_not_bytes": (pub("a", "text", None, None, 0, None), ErrorCode.PROTOCOL_ERROR),
    "pub_subject_is_a_list": (pub(["a"], b"x", None, None, 0, None), ErrorCode.INVALID_SUBJECT),
    "pub_wildcard_subject": (pub("a.*", b"x", None, None, 0, None), ErrorCode.INVALID_SUBJECT),
    "pub_bad_header": (pub("a", b"x", {"k": [1]}, None, 0, None), ErrorCode.PROTOCOL_ERROR),
    "array32_claims_4g_items": (frame_bytes(b"\xdd\xff\xff\xff\xff"), ErrorCode.PROTOCOL_ERROR),
    "deeply_nested": (frame_bytes(b"\x91" * 5000 + b"\xc0"), ErrorCode.PROTOCOL_ERROR),
    "ext_type": (frame_bytes(msgpack.packb(msgpack.ExtType(5, b"x"))), ErrorCode.PROTOCOL_ERROR),
    "rid_too_big": (pack([F.Op.PING, 2**64 - 1]), ErrorCode.PROTOCOL_ERROR),
    "call_unknown_method": (pack([F.Op.CALL, 11, "no.such.method", {}]), ErrorCode.UNKNOWN_OPERATION),
}


@pytest.mark.parametrize("case", list(POST_HELLO_NONFATAL))
async def test_malformed_frame_after_hello_gets_err_and_connection_stays_usable(module_broker,
                                                                                 case: str) -> None:
    broker = module_broker()  # all cases on one broker: none may disturb it for anyone else
    data, code = POST_HELLO_NONFATAL[case]
    async with connect(broker.url) as control, RawClient.open(broker.host, broker.port) as rc:
        await rc.hello()
        await rc.send_raw(data)
        err = await rc.read_until(lambda f: isinstance(f, F.Err), timeout=WAIT)
        assert isinstance(err, F.Err) and err.code == code, err
        # the stream is still in sync: a PING is answered and a SUB works
        await rc.ping()
        await rc.subscribe("raw.ok", sid=99)
        await control.publish("raw.ok", b"hello raw")
        msg = await rc.read_until(lambda f: isinstance(f, F.Msg), timeout=WAIT)
        assert isinstance(msg, F.Msg) and msg.sid == 99 and msg.messages[0][1] == b"hello raw"
        await assert_control_works(control, case)
    assert broker.alive()


async def test_pub_over_max_payload_gets_err_and_connection_stays_usable(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_PAYLOAD": "65536"})
    async with connect(broker.url) as control, RawClient.open(broker.host, broker.port) as rc:
        welcome = await rc.hello()
        assert welcome.info["max_payload"] == 65536
        sub = await control.subscribe("big")
        await rc.send_wire([F.Op.PUB, [["big", b"x" * 65537, None, None, 0, None]]])
        err = await rc.read_until(lambda f: isinstance(f, F.Err), timeout=WAIT)
        assert isinstance(err, F.Err)
        assert err.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.INVALID_ARGUMENT), err
        assert "max_payload" in err.message
        await rc.ping()
        await rc.send_wire([F.Op.PUB, [["big", b"x" * 65536, None, None, 0, None]]])
        await rc.ping()
        assert len((await sub.next(timeout=WAIT)).payload) == 65536  # exactly max_payload is fine
        await assert_control_works(control, "big")


async def test_huge_length_prefix_after_hello_gets_err_and_close(broker) -> None:
    async with connect(broker.url) as control:
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            await rc.send_raw(b"\xff\xff\xff\xff")
            frames = await rc.read_until_eof(timeout=WAIT)
        assert [(type(f), getattr(f, "code", None)) for f in frames] == [(F.Err, ErrorCode.FRAME_TOO_LARGE)]
        await assert_control_works(control, "huge")
    assert broker.alive()


@pytest.mark.parametrize("seed", range(6))
async def test_random_bytes_after_hello(module_broker, seed: int) -> None:
    # A random length prefix may announce a frame that never completes: the
    # frame timeout ends that, so keep it short.
    broker = module_broker(env={"TIDINGS_FRAME_TIMEOUT": "1"})  # shared by the seeds
    rng = random.Random(1000 + seed)
    data = rng.randbytes(rng.choice([5, 300, 20_000]))
    async with connect(broker.url) as control:
        async with RawClient.open(broker.host, broker.port) as rc:
            await rc.hello()
            try:
                await rc.send_raw(data)
                await rc.send(F.Ping(424242))
            except (anyio.BrokenResourceError, ConnectionError):
                pass
            got: list[F.Frame] = []
            in_sync = False
            try:
                await rc.read_until(lambda f: isinstance(f, F.Pong) and f.rid == 424242, timeout=WAIT)
                in_sync = True
            except EOF:
                pass
            # everything after WELCOME and the binding set that follows it
            got = [f for f in rc.frames[1:] if not (isinstance(f, F.Notice) and f.kind == "bindings")]
            # only ERRs (and possibly our PONG) come back: either the stream
            # stayed in sync, or it was closed after an ERR
            others = [f for f in got if not isinstance(f, (F.Err, F.Pong))]
            assert not others, others
            assert in_sync or any(isinstance(f, F.Err) for f in got), got
        await assert_control_works(control, f"seed{seed}")
    assert broker.alive()


async def test_partial_frame_times_out(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_FRAME_TIMEOUT": "0.5"})
    async with RawClient.open(broker.host, broker.port) as rc:
        await rc.hello()
        await rc.send_raw(b"\x00\x00\x01\x00" + b"\x92")  # announces 256 bytes, sends 1
        frames = await rc.read_until_eof(timeout=WAIT)
    assert [(type(f), getattr(f, "code", None)) for f in frames] == [(F.Err, ErrorCode.FRAME_TIMEOUT)]
    assert broker.alive()


# --------------------------------------------------------------- HELLO timeout

@pytest.mark.parametrize("sent", [b"", b"\x00\x00"], ids=["silent", "partial_hello"])
async def test_hello_timeout(start_broker, sent: bytes) -> None:
    broker = start_broker(env={"TIDINGS_HELLO_TIMEOUT": "0.5"})
    async with connect(broker.url) as control:
        async with RawClient.open(broker.host, broker.port) as rc:
            t0 = time.monotonic()
            if sent:
                await rc.send_raw(sent)
            frames = await rc.read_until_eof(timeout=WAIT)
            elapsed = time.monotonic() - t0
        assert [(type(f), getattr(f, "code", None)) for f in frames] == [(F.Err, ErrorCode.HELLO_TIMEOUT)]
        assert elapsed >= 0.4, elapsed  # not before the timeout (a slow machine only makes it later)
        # a client that does say HELLO in time is unaffected
        await assert_control_works(control, "hello_timeout")
    assert broker.alive()


# ------------------------------------------------------------ max_connections

async def test_max_connections_refuses_the_next_one_with_a_clear_error(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_CONNECTIONS": "3"})
    async with connect(broker.url) as c1, connect(broker.url) as c2:
        async with connect(broker.url) as c3:
            for _ in range(3):  # refused every time, not just once
                async with RawClient.open(broker.host, broker.port) as rc:
                    await rc.send(F.Hello(F.PROTOCOL_VERSION, "fourth", None, {}))
                    frames = await rc.read_until_eof(timeout=WAIT)
                assert [(type(f), getattr(f, "code", None)) for f in frames] == \
                       [(F.Err, ErrorCode.TOO_MANY_CONNECTIONS)]
            # the first three keep working, across connections
            sub = await c3.subscribe("mc")
            await c1.publish("mc", b"1")
            await c2.publish("mc", b"2")
            await c1.flush()
            await c2.flush()
            assert sorted([(await sub.next(timeout=WAIT)).payload for _ in range(2)]) == [b"1", b"2"]
            stats = await c1.call("stats")
            assert stats["connections"] == 3
            assert stats["connections_refused"] == 3
        # once one leaves, a new connection is admitted again
        with anyio.fail_after(WAIT):
            while (await c1.call("stats"))["connections"] != 2:
                await c1.flush()
        async with connect(broker.url) as c4:
            await assert_control_works(c4, "fourth")


async def test_max_connections_client_sees_too_many_connections(start_broker) -> None:
    broker = start_broker(env={"TIDINGS_MAX_CONNECTIONS": "1"})
    async with connect(broker.url) as c1:
        with pytest.raises(client.TidingsError) as info:
            async with connect(broker.url):
                pass
        assert info.value.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert info.value.retriable
        await assert_control_works(c1, "still")


async def test_connect_to_nothing_raises_connect_error(broker) -> None:
    url = broker.url
    assert broker.terminate() == 0  # now nobody listens on that port
    with pytest.raises(client.ConnectError):
        async with connect(url, timeout=5):
            pass
