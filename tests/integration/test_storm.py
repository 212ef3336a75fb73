"""Hostile load on a real broker: a storm of malformed frames, slow-loris
connections, and thousands of idle connections.

* Storm: at least 2,000 malformed frames of many kinds (random bodies, valid
  values followed by garbage, wrong shapes and types, deep nesting, huge
  array/map/bin/str headers, extension types, empty frames, a second HELLO)
  on logged-in connections, each answered by exactly one ERR with the
  stream still in sync; plus connections that break the framing itself
  (garbage before HELLO, length prefixes of 0xFFFFFFFF and limit+1 before
  and after HELLO, unframed random bytes), each answered by an ERR and/or
  a close. Throughout, a control client's flush (a PING) keeps answering;
  afterwards the broker's RSS is back near its baseline. ``--soak`` runs
  ten times as many.
* Slow-loris: hundreds of connections that say nothing, drip a HELLO a
  byte at a time, or log in and drip a frame, are all closed on time while
  a logged-in publisher keeps working.
* Idle: 2,000 logged-in idle connections are held; the broker's RSS per
  connection is printed (run with -s to see it) and bounded.
"""

from __future__ import annotations

import contextlib
import random
import resource
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
from rawclient import RawClient, frame_bytes
from securitytools import PASSWORDS, user, write_config

from tidings.client import Client, connect
from tidings.protocol import ErrorCode
from tidings.protocol import frames as F
from tidings.protocol.codec import PRE_HELLO_MAX_FRAME, Decoder, unpack
from tidings.protocol.errors import RemoteProtocolError

WAIT = 15.0
FRAMES_PER_CONNECTION = 100
STORM_CONNECTIONS = 20  # x FRAMES_PER_CONNECTION non-fatal frames: 2,000 in the default suite
FATAL_CONNECTIONS = 120  # one framing-breaking input each
SOAK_FACTOR = 10
RSS_MARGIN = 48 * 1024 * 1024  # after the storm, RSS may exceed its baseline by this much (allocator slack)
PING_RID = 2**40  # the control PING after each burst; never a junk frame's rid


def soak(request: pytest.FixtureRequest) -> int:
    return SOAK_FACTOR if request.config.getoption("--soak") else 1


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


# ------------------------------------------------------------ frame makers

_CHECK = Decoder(F.CLIENT_OPS, 1024 * 1024)


def _locally_invalid(body: bytes) -> bool:
    """True if the broker's own decoder refuses ``body`` (so it must answer ERR)."""
    try:
        frame = _CHECK.frame(unpack(body))
    except RemoteProtocolError:
        return True
    return type(frame) is F.Hello  # a second HELLO: valid shape, refused as BAD_STATE


def _junk(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(9 if depth < 3 else 6)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice([0, 1, -1, 2**31, -2**63, 2**64 - 1, rng.randint(-1000, 1000)])
    if k == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308])
    if k == 4:
        return "".join(rng.choice("ab.*>_ \x00\u00e9\U0001f600") for _ in range(rng.randrange(0, 12)))
    if k == 5:
        return rng.randbytes(rng.randrange(0, 16))
    if k == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if k == 7:
        return {rng.choice(["k", "id", "auth", "", "a.b"]) if rng.random() < 0.8 else rng.randrange(9):
                _junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 8)))


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _random_body(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def _valid_then_garbage(rng: random.Random) -> bytes:
    good = rng.choice([[F.Op.PING, 1], [F.Op.PUB, [["a.b", b"x", None, None, 0, None]]],
                       [F.Op.SUB, 1, 1, "a.>", None]])
    return _pack(good) + rng.randbytes(rng.randrange(1, 40))


def _wrong_shape(rng: random.Random) -> bytes:
    op = rng.choice([*F.Op, 0, 99, -1, 2**32])
    return _pack([op, *(_junk(rng) for _ in range(rng.randrange(0, 6)))])


def _wrong_type(rng: random.Random) -> bytes:
    templates = [
        [F.Op.PUB, [["a.b", b"x", None, None, 0, None]]],
        [F.Op.SUB, 5, 5, "a.>", None],
        [F.Op.UNSUB, 5, 5],
        [F.Op.CALL, 5, "stats", {}],
        [F.Op.CONSUME, 5, 5, {"queue": "q"}],
        [F.Op.ACK, 5, 5, [[1, 0, None]]],
        [F.Op.STOP, 5, 5],
    ]
    v = list(rng.choice(templates))
    if v[0] == F.Op.PUB:
        m = list(v[1][0])
        m[rng.randrange(len(m))] = _junk(rng)
        v[1] = [m]
    else:
        v[rng.randrange(1, len(v))] = _junk(rng)
    return _pack(v)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([9, 64, 1000, 5000, 20000])
    if rng.random() < 0.5:
        return b"\x91" * depth + b"\xc0"  # [[[[...nil...]]]]
    return b"\x81\xa1k" * depth + b"\xc0"  # {"k": {"k": ...}}


def _huge_header(rng: random.Random) -> bytes:
    head = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                       b"\xdb\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff"])
    if rng.random() < 0.5:
        return b"\x92\x0a" + head  # [PUB, <claims billions of items>]
    return head + rng.randbytes(rng.randrange(0, 8))


def _ext(rng: random.Random) -> bytes:
    ext = msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 16)))
    where = rng.randrange(4)
    if where == 0:
        return _pack(ext)
    if where == 1:
        return _pack([F.Op.PUB, [["a.b", ext, None, None, 0, None]]])
    if where == 2:
        return _pack([F.Op.CALL, 3, "stats", {"x": ext}])
    return b"\x92\x02\xd6\xff" + struct.pack(">I", int(time.time()))  # [PING, Timestamp ext -1]


def _hello_again(rng: random.Random) -> bytes:
    return _pack([F.Op.HELLO, F.PROTOCOL_VERSION, "again", None, {}])


NONFATAL: dict[str, Callable[[random.Random], bytes]] = {
    "random_body": _random_body, "valid_then_garbage": _valid_then_garbage, "wrong_shape": _wrong_shape,
    "wrong_type": _wrong_type, "deep_nesting": _deep, "huge_header": _huge_header, "ext_type": _ext,
    "empty": lambda rng: b"", "hello_again": _hello_again,
}


def nonfatal_frames(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """``n`` length-prefixed frames the broker must each answer with one ERR, staying in sync."""
    kinds = list(NONFATAL)
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        body = NONFATAL[kind](rng)
        if body and not _locally_invalid(body):
            continue  # a random value that happens to be a valid frame: draw again
        out.append((kind, frame_bytes(body)))
    return out


def fatal_input(rng: random.Random, i: int) -> tuple[str, bool, bytes]:
    """(kind, after_hello, bytes) that break the framing or the handshake."""
    kinds = [
        ("pre_random", False, lambda: rng.randbytes(rng.choice([1, 7, 100, 5000, 70_000]))),
        ("pre_max_u32", False, lambda: b"\xff\xff\xff\xff"),
        ("pre_limit_plus_one", False, lambda: struct.pack(">I", PRE_HELLO_MAX_FRAME + 1)),
        ("pre_garbage_frame", False, lambda: frame_bytes(rng.randbytes(rng.randrange(1, 200)))),
        ("pre_wrong_first", False, lambda: frame_bytes(_pack([F.Op.PING, 1]))),
        ("pre_empty", False, lambda: frame_bytes(b"")),
        ("pre_bad_hello", False, lambda: frame_bytes(_pack([F.Op.HELLO, _junk(rng), _junk(rng)]))),
        ("post_max_u32", True, lambda: b"\xff\xff\xff\xff"),
        ("post_limit_plus_one", True, lambda: struct.pack(">I", 1024 * 1024 + 64 * 1024 + 1)),
        ("post_unframed", True, lambda: rng.randbytes(rng.choice([3, 50, 3000, 40_000]))),
    ]
    kind, after, make = kinds[i % len(kinds)]
    return kind, after, make()


# ------------------------------------------------------------------ storm

async def storm_connection(host: str, port: int, frames: list[tuple[str, bytes]]) -> None:
    async with RawClient.open(host, port) as rc:
        await rc.hello()
        await rc.send_raw(b"".join(data for _kind, data in frames) + frame_bytes(_pack([F.Op.PING, PING_RID])))
        await rc.read_until(lambda f: isinstance(f, F.Pong) and f.rid == PING_RID, WAIT)
        errs = [f for f in rc.frames if isinstance(f, F.Err)]
        others = [f for f in rc.frames[1:] if not isinstance(f, (F.Err, F.Pong))
                  and not (isinstance(f, F.Notice) and f.kind == "bindings")]
        assert not others, others[:3]
        assert len(errs) == len(frames), (len(errs), len(frames))
        codes = {e.code for e in errs}
        assert codes <= {ErrorCode.PROTOCOL_ERROR, ErrorCode.UNKNOWN_OPERATION, ErrorCode.BAD_STATE,
                         ErrorCode.INVALID_SUBJECT, ErrorCode.INVALID_ARGUMENT}, codes


async def fatal_connection(host: str, port: int, kind: str, after_hello: bool, data: bytes) -> None:
    async with RawClient.open(host, port) as rc:
        if after_hello:
            await rc.hello()
        try:
            await rc.send_raw(data)
        except (anyio.BrokenResourceError, ConnectionError):
            pass  # closed before it read everything: fine
        frames = await rc.read_until_eof(timeout=WAIT)  # every one of these ends in a close
        got = frames  # read_until_eof returns only what came after WELCOME
        assert all(isinstance(f, (F.Err, F.Ping)) for f in got), (kind, got[:3])
        if kind.endswith(("max_u32", "limit_plus_one")):
            assert [f.code for f in got if isinstance(f, F.Err)] == [ErrorCode.FRAME_TOO_LARGE], (kind, got)


async def run_storm(host: str, port: int, rng: random.Random, connections: int, fatal: int) -> int:
    sent = 0
    limiter = anyio.CapacityLimiter(10)

    async def one_storm(frames: list[tuple[str, bytes]]) -> None:
        async with limiter:
            await storm_connection(host, port, frames)

    async def one_fatal(i: int) -> None:
        async with limiter:
            await fatal_connection(host, port, *fatal_input(rng, i))

    async with anyio.create_task_group() as tg:
        for _ in range(connections):
            frames = nonfatal_frames(rng, FRAMES_PER_CONNECTION)
            sent += len(frames)
            tg.start_soon(one_storm, frames)
        for i in range(fatal):
            sent += 1
            tg.start_soon(one_fatal, i)
    return sent


async def connections_settle(tc: Client, n: int) -> None:
    with anyio.fail_after(WAIT):
        while (await tc.call("stats"))["connections"] != n:
            await tc.flush()


async def test_malformed_frame_storm(start_broker, request: pytest.FixtureRequest) -> None:
    factor = soak(request)
    raise_fd_limit(4096)
    b = start_broker(env={"TIDINGS_HELLO_TIMEOUT": "1", "TIDINGS_FRAME_TIMEOUT": "1"})
    rng = random.Random(20240601)
    async with connect(b.url) as control:
        # warm up (imports, allocator arenas, caches), then take the baseline
        await run_storm(b.host, b.port, rng, 2, 10)
        await connections_settle(control, 1)
        baseline = b.rss_bytes()

        flushes: list[float] = []
        done = anyio.Event()

        async def keep_flushing() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                await control.flush(timeout=WAIT)  # raises if the broker stops answering PINGs
                flushes.append(time.monotonic() - t0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_flushing)
            t0 = time.monotonic()
            sent = await run_storm(b.host, b.port, rng, STORM_CONNECTIONS * factor, FATAL_CONNECTIONS * factor)
            elapsed = time.monotonic() - t0
            done.set()
        assert sent >= 2000 * factor
        assert len(flushes) >= 3 and max(flushes) < WAIT
        await connections_settle(control, 1)
        after = b.rss_bytes()
        print(f"\nstorm: {sent} malformed inputs in {elapsed:.1f}s; control flushes {len(flushes)}, "
              f"max {max(flushes) * 1000:.0f} ms; RSS baseline {baseline >> 20} MiB, after {after >> 20} MiB")
        assert after - baseline < RSS_MARGIN, (baseline, after)
        sub = await control.subscribe("after.storm")
        await control.publish("after.storm", b"ok")
        assert (await sub.next(timeout=WAIT)).payload == b"ok"
    assert b.alive()


# ------------------------------------------------------------- slow-loris

async def test_slow_loris_connections_are_closed_on_time(start_broker, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    n = 100 * soak(request)  # of each kind: 300 in the default suite
    raise_fd_limit(3 * n + 1024)
    cfg = write_config(tmp_path / "tidings.toml", users=user("alice", publish=[">"], subscribe=[">"], admin=[">"]))
    # The drip_frame clients must log in within the HELLO timeout while their logins queue for the
    # 2 password-hashing threads: that timeout is long next to the queue, even on a busy machine.
    limits = {"silent": 5.0, "drip_hello": 5.0, "drip_frame": 1.0}
    b = start_broker("--config", str(cfg), env={"TIDINGS_HELLO_TIMEOUT": str(limits["silent"]),
                                                 "TIDINGS_FRAME_TIMEOUT": str(limits["drip_frame"]),
                                                 # all lorises come from one address: lift the pending-handshake
                                                 # caps so that the timeouts are what closes them
                                                 "TIDINGS_MAX_PENDING_HANDSHAKES": str(4 * n),
                                                 "TIDINGS_MAX_PENDING_HANDSHAKES_PER_IP": str(4 * n)})
    creds = {"user": "alice", "password": PASSWORDS["alice"]}
    hello = frame_bytes(_pack([F.Op.HELLO, F.PROTOCOL_VERSION, "loris", creds, {}]))
    pub = frame_bytes(_pack([F.Op.PUB, [["loris.x", b"y" * 200, None, None, 0, None]]]))
    late: list[tuple[str, float]] = []
    codes: dict[str, list[int]] = {"silent": [], "drip_hello": [], "drip_frame": []}
    drip_every = 0.1

    async def drip(rc: RawClient, data: bytes) -> None:
        for i in range(len(data)):
            try:
                await rc.send_raw(data[i:i + 1])
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                return
            await anyio.sleep(drip_every)  # the misbehaviour under test, not synchronisation

    # Logins are hashed by at most 2 threads with a backlog of 64 (beyond it HELLO is refused
    # as OVERLOADED, retriable); the drippers log in a few at a time, as a real client retries.
    logins = anyio.CapacityLimiter(16)

    async def loris(kind: str) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if kind == "drip_frame":
                async with logins:  # connect only when a login slot is free: HELLO has 5 s
                    rc = await stack.enter_async_context(RawClient.open(b.host, b.port))
                    await rc.send_raw(hello)
                    await rc.read_until(lambda f: isinstance(f, F.Welcome), WAIT)
            else:
                rc = await stack.enter_async_context(RawClient.open(b.host, b.port))
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                if kind != "silent":
                    tg.start_soon(drip, rc, hello if kind == "drip_hello" else pub)
                frames = await rc.read_until_eof(timeout=WAIT)
                tg.cancel_scope.cancel()
            took = time.monotonic() - t0
            codes[kind].extend(f.code for f in frames if isinstance(f, F.Err))
            if took > limits[kind] + 3.0:
                late.append((kind, took))

    async with connect(b.url, user="alice", password=PASSWORDS["alice"]) as publisher:
        sub = await publisher.subscribe("work")
        rounds: list[float] = []
        done = anyio.Event()

        async def keep_publishing() -> None:
            i = 0
            while not done.is_set():
                i += 1
                t0 = time.monotonic()
                await publisher.publish("work", str(i).encode())
                assert (await sub.next(timeout=WAIT)).payload == str(i).encode()
                rounds.append(time.monotonic() - t0)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_publishing)
            async with anyio.create_task_group() as lorises:
                for kind in ("silent", "drip_hello", "drip_frame"):
                    for _ in range(n):
                        lorises.start_soon(loris, kind)
            done.set()
        assert not late, late[:5]
        assert codes["silent"] == [ErrorCode.HELLO_TIMEOUT] * n
        assert codes["drip_hello"] == [ErrorCode.HELLO_TIMEOUT] * n
        assert codes["drip_frame"] == [ErrorCode.FRAME_TIMEOUT] * n
        assert len(rounds) >= 10 and max(rounds) < 2.0, (len(rounds), max(rounds))
        print(f"\nslow-loris: {3 * n} connections closed on time; publisher {len(rounds)} round trips, "
              f"max {max(rounds) * 1000:.0f} ms")
        await connections_settle(publisher, 1)
    assert b.alive()


# ------------------------------------------------------------ idle holding

async def test_many_idle_connections_are_held_cheaply(start_broker, request: pytest.FixtureRequest) -> None:
    n = 2000 * (4 if request.config.getoption("--soak") else 1)
    raise_fd_limit(2 * n + 1024)  # ours and (inherited at spawn) the broker's
    b = start_broker()
    hello = frame_bytes(_pack([F.Op.HELLO, F.PROTOCOL_VERSION, "idle", None, {}]))
    streams: list[Any] = []
    async with connect(b.url) as control:
        await control.flush()
        before = b.rss_bytes()
        limiter = anyio.CapacityLimiter(100)

        async def open_one() -> None:
            async with limiter:
                with anyio.fail_after(WAIT):
                    stream = await anyio.connect_tcp(b.host, b.port)
                    await stream.send(hello)
                    got = b""
                    while len(got) < 4 or len(got) < 4 + struct.unpack(">I", got[:4])[0]:
                        got += await stream.receive()
                    assert msgpack.unpackb(got[4:4 + struct.unpack(">I", got[:4])[0]])[0] == F.Op.WELCOME
                streams.append(stream)

        try:
            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(open_one)
            opened = time.monotonic() - t0
            await connections_settle(control, n + 1)
            after = b.rss_bytes()
            per = (after - before) / n
            print(f"\nidle: {n} connections opened in {opened:.1f}s; broker RSS {before >> 20} -> "
                  f"{after >> 20} MiB: {per / 1024:.1f} KiB ({per:.0f} bytes) per idle connection")
            assert per < 64 * 1024, per
            # they are all still served: a sample answers PING, and the control client is unaffected
            for stream in streams[:: max(1, n // 20)]:
                await stream.send(frame_bytes(_pack([F.Op.PING, 77])))
                with anyio.fail_after(WAIT):
                    reply = await stream.receive()
                assert msgpack.unpackb(reply[4:])[:2] == [F.Op.PONG, 77]
            sub = await control.subscribe("idle.check")
            await control.publish("idle.check", b"fine")
            assert (await sub.next(timeout=WAIT)).payload == b"fine"
        finally:
            for stream in streams:
                await stream.aclose()
        await connections_settle(control, 1)
    assert b.alive()
