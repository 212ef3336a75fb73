"""tidings beside Redis Streams and NATS JetStream, in one run, same scenarios.

    python -m benchmarks.peers [--systems tidings redis nats] [--queue-messages 100000] ...

Every system runs the same scenarios, 128-byte payloads, the server and
every client as separate processes on this machine:

* ``queue``: durable queue, 1 producer keeping 1,000 confirms in flight,
  1 consumer acking each message; end-to-end messages/s.
* ``partitions``: 4 partitions keyed by 64 keys, 1,000 confirms in flight,
  2 consumer processes, per-key order checked (a violation or gap fails the run).
* ``latency``: durable publish paced at a fixed rate (2,000 msg/s), publish
  to receive p50/p99 (the stamp is CLOCK_MONOTONIC, shared by processes).
* ``cpu``: the server process's CPU time (user + system, all its threads,
  from /proc/PID/stat) per message during the latency scenario; it is also
  reported for every other scenario.
* ``pubsub 1->1`` / ``pubsub 1->4``: tidings pub/sub against NATS core
  (the no-regression check; no durability on either side).

The peers, each with its recommended idiom and the settings of issue 14:

* tidings at ``--durability full`` (synchronous=FULL, its default): the
  workers of benchmarks.durable, benchmarks.streams and benchmarks.pubsub.
* Redis 7 (``/usr/bin/redis-server``), ``appendonly yes`` +
  ``appendfsync everysec``, through redis-py's asyncio client: XADD in
  pipelines (two connections x 500 = 1,000 in flight), XREADGROUP with
  COUNT, the batch's XACK pipelined with the next XREADGROUP. Partitions are
  4 streams, key -> stream by crc32(key) % 4, one consumer group; each
  consumer process reads two of the streams (a stream read by one consumer
  keeps its order, as a tidings partition does with its one member).
* NATS 2.9 JetStream (``/usr/sbin/nats-server -js``, file store in the temp
  dir, the server's default sync: no fsync per message) through nats-py:
  ``publish_async`` with 1,000 acks in flight; a durable pull consumer
  pulled continuously, as nats.go's ``Consume()`` does (pull requests of 256
  messages, the next sent when half have arrived; nats-py's ``fetch(n)``
  returns only when its batch is full or expires, which holds messages back
  at a low rate), each message acked. Partitions are 4 subjects of one
  stream (``peers.p.N``), each read by its own durable pull consumer
  filtered to that subject (ordered per subject); each consumer process owns
  two of them, pulling concurrently.
* Paced producers (the latency scenario) send each message at its time;
  when the host makes one late, the messages due go at once (Redis: in one
  pipeline), so every system is offered the same rate.

The run also prints the load average and the disk's ``fdatasync`` time (a
4 KiB append, p50/p99, before and after): at synchronous=FULL a durable
publish-to-receive cannot be faster than one ``fdatasync``, and on a shared
machine that time moves with the neighbours' I/O.

Servers are started on free loopback ports in a temp dir and stopped after;
a system whose server or client library is missing is skipped with the
command that installs it. Every scenario is bounded by its message count and
``--timeout`` seconds; on a timeout the run stops and only the processes it
started are killed. Prints a JSON list of rows, a table per scenario and
the comparison table with the ratios tidings / peer (for rates > 1 means
tidings is faster; for latencies and CPU < 1 means tidings is cheaper).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from typing import Any

from ._common import broker_process, emit, percentile, spawn

SYSTEMS = ("tidings", "redis", "nats")
REDIS_SERVER = "/usr/bin/redis-server"
NATS_SERVER = "/usr/sbin/nats-server"
INSTALL = {"redis": "apt-get install redis-server", "nats": "apt-get install nats-server"}
CLIENT_LIB = {"redis": ("redis", "pip install redis"), "nats": ("nats", "pip install nats-py")}
STAMP = struct.Struct(">q")          # monotonic ns, first 8 bytes of a latency/pubsub payload
SEQ = struct.Struct(">qH")           # per-key sequence number + key index (Redis/NATS partitions)
GROUP = "peers"
PARTITIONS = 4
KEYS = 64
END = b"END"
REDIS_BATCH_READ = 1000              # XREADGROUP COUNT (the consumer's prefetch, as tidings' 1,000)
NATS_FETCH = 256                     # messages per pull request
SERVER_START_S = 20.0                # bound on a server's start (the port answering)


# ---------------------------------------------------------------------------------------------
# servers


@dataclasses.dataclass(frozen=True)
class Server:
    system: str
    url: str
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {SERVER_START_S:.0f} s")


@contextlib.contextmanager
def _server_proc(cmd: list[str], port: int, what: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(proc, port, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server(tmp: str) -> Iterator[Server]:
    """redis-server with the table's settings: AOF on, fsync once a second, no RDB snapshots."""
    port = free_port()
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--appendonly", "yes",
           "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--protected-mode", "no",
           "--logfile", ""]
    with _server_proc(cmd, port, "redis-server") as proc:
        yield Server("redis", f"redis://127.0.0.1:{port}", proc.pid)


@contextlib.contextmanager
def nats_server(tmp: str) -> Iterator[Server]:
    """nats-server with JetStream, its file store in ``tmp`` (the server's default sync)."""
    port = free_port()
    cmd = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", os.path.join(tmp, "jetstream")]
    with _server_proc(cmd, port, "nats-server") as proc:
        yield Server("nats", f"nats://127.0.0.1:{port}", proc.pid)


@contextlib.contextmanager
def tidings_server() -> Iterator[Server]:
    with broker_process("--durability", "full") as b:
        yield Server("tidings", b.url, b.pid)


def missing(system: str) -> str | None:
    """Why ``system`` cannot run here (with the install command), or None."""
    if system == "tidings":
        return None
    binary = REDIS_SERVER if system == "redis" else NATS_SERVER
    if not os.path.exists(binary) and shutil.which(os.path.basename(binary)) is None:
        return f"{os.path.basename(binary)} not installed: {INSTALL[system]}"
    mod, pip = CLIENT_LIB[system]
    try:
        __import__(mod)
    except ImportError:
        return f"the Python client library is missing: {pip} (or pip install -e '.[bench]')"
    return None


def _binary(system: str) -> str:
    path = REDIS_SERVER if system == "redis" else NATS_SERVER
    return path if os.path.exists(path) else (shutil.which(os.path.basename(path)) or path)


FSYNC_PROBES = 100  # 4 KiB appends, each followed by fdatasync: ~0.1-1 s


def fsync_ms(directory: str) -> tuple[float, float]:
    """p50 and p99 of ``fdatasync`` after a 4 KiB append in ``directory``, in ms: the floor of
    a durable commit at synchronous=FULL on this disk right now (other work moves it a lot)."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(FSYNC_PROBES):
            os.write(fd, b"\0" * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return round(percentile(times, 50), 3), round(percentile(times, 99), 3)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# the bound: a watchdog that kills this run's own child processes


class Watchdog:
    """Kills the direct children of this process (the servers and workers this run started,
    nothing else) when a scenario exceeds its time; blocked reads then end and the run stops."""

    def __init__(self) -> None:
        self.fired: str | None = None
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float, label: str) -> None:
        self.disarm()
        self._timer = threading.Timer(seconds, self._fire, args=(label, seconds))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, label: str, seconds: float) -> None:
        self.fired = f"{label}: no result within {seconds:.0f} s"
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                with contextlib.suppress(OSError):
                    os.kill(int(entry), signal.SIGKILL)


def _line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _ready(proc: subprocess.Popen[bytes]) -> None:
    line = _line(proc)
    if line != b"ready":
        raise RuntimeError(f"worker did not start: {line!r}")


def _result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    line = _line(proc)
    if not line:
        raise RuntimeError("a worker ended without a result")
    return json.loads(line)  # type: ignore[no-any-return]


def _send(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, OSError):
        proc.stdin.write(text.encode() + b"\n")
        proc.stdin.flush()


def _finish(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        _send(p, "exit")
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _worker(role: str, server: Server, **params: Any) -> list[str]:
    return ["benchmarks.peers", "--role", role, "--system", server.system, "--url", server.url,
            "--params", json.dumps(params)]


def run_pair(server: Server, consumers: list[list[str]], producer: list[str],
             ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Start the consumers, then the producer; go; collect their JSON lines and the server's
    CPU seconds between go and the last consumer's result."""
    cons = [spawn(*c) for c in consumers]
    procs = list(cons)
    try:
        for c in cons:
            _ready(c)
        prod = spawn(*producer)
        procs.append(prod)
        _ready(prod)
        cpu0 = cpu_seconds(server.pid)
        clients0 = sum(cpu_seconds(w.pid) for w in procs)
        _send(prod, "go")
        p = _result(prod)
        cs = [_result(c) for c in cons]
        cpu = cpu_seconds(server.pid) - cpu0
        # the workers are not reaped yet (a zombie keeps its CPU times): what the clients spent
        p["client_cpu"] = sum(cpu_seconds(w.pid) for w in procs) - clients0
    finally:
        _finish(procs)
    return p, cs, cpu


# ---------------------------------------------------------------------------------------------
# scenarios (parent side)


def _tidings_setup(url: str, queue: str | None = None, bind: str = "") -> dict[str, Any]:
    """Declare ``queue`` (if given); return the broker's store counters (commits, ...)."""
    from tidings.broker.serve import run_loop
    from tidings.client import connect

    async def setup() -> dict[str, Any]:
        async with connect(url) as tc:
            if queue is not None:
                await tc.declare_queue(queue, bind=[bind])
            return (await tc.call("stats")).get("store", {})  # type: ignore[no-any-return]

    return run_loop(setup)  # type: ignore[no-any-return]


def _commits(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
    """tidings only: store commits and write operations per message in a scenario."""
    commits = after.get("commits", 0) - before.get("commits", 0)
    ops = after.get("committed_ops", 0) - before.get("committed_ops", 0)
    return {"commits_per_msg": round(commits / max(messages, 1), 3),
            "store_ops_per_msg": round(ops / max(messages, 1), 3)}


def _nats_setup(url: str) -> None:
    async def setup() -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig

        nc = await nats.connect(url)
        js = nc.jetstream()
        for name, subjects in (("PEERSQ", ["peers.q"]), ("PEERSP", ["peers.p.*"]), ("PEERSL", ["peers.lat"])):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
            await js.add_stream(StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE))
        await nc.close()

    asyncio.run(setup())


def _row(scenario: str, server: Server, messages: int, received: int, seconds: float, cpu: float,
         client_cpu: float | None = None, **extra: Any) -> dict[str, Any]:
    row = {"scenario": scenario, "system": server.system, "messages": messages, "received": received,
           "seconds": round(seconds, 3), "msgs_per_s": round(received / seconds) if seconds > 0 else None,
           **extra, "broker_cpu_us_per_msg": round(cpu / max(received, 1) * 1e6, 1)}
    if client_cpu is not None:  # producer + consumers together (they share the 2 cores with the broker)
        row["clients_cpu_us_per_msg"] = round(client_cpu / max(received, 1) * 1e6, 1)
    row["load1"] = round(os.getloadavg()[0], 2)
    return row


def scenario_queue(server: Server, n: int, in_flight: int) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if server.system == "tidings":
        before = _tidings_setup(server.url, "bench.durable", "bench.durable.>")
        cons = [["benchmarks.durable", "--role", "consumer", "--url", server.url, "--messages", str(n),
                 "--prefetch", str(in_flight)]]
        prod = ["benchmarks.durable", "--role", "producer", "--url", server.url, "--messages", str(n),
                "--payload", "128", "--in-flight", str(in_flight)]
    else:
        cons = [_worker("queue-consumer", server, messages=n)]
        prod = _worker("queue-producer", server, messages=n, in_flight=in_flight)
    p, cs, cpu = run_pair(server, cons, prod)
    c = cs[0]
    if server.system == "tidings":
        extra = _commits(before, _tidings_setup(server.url), n)
    return _row("queue", server, n, c["received"], (c["last"] - p["start"]) / 1e9, cpu, p["client_cpu"],
                **extra)


def scenario_partitions(server: Server, n: int, in_flight: int) -> dict[str, Any]:
    if server.system == "tidings":
        from tidings.broker.serve import run_loop

        from . import streams

        before = run_loop(streams._setup, server.url, PARTITIONS)
        cons = [["benchmarks.streams", "--role", "consumer", "--url", server.url, "--window", str(in_flight)]
                for _ in range(2)]
        prod = ["benchmarks.streams", "--role", "producer", "--url", server.url, "--messages", str(n),
                "--payload", "128", "--in-flight", str(in_flight), "--keys", str(KEYS),
                "--partitions", str(PARTITIONS)]
    else:
        cons = [_worker("part-consumer", server, messages=n, index=i, members=2) for i in range(2)]
        prod = _worker("part-producer", server, messages=n, in_flight=in_flight)
    p, cs, cpu = run_pair(server, cons, prod)
    received = sum(c["received"] for c in cs)
    last = max(c["last"] for c in cs)
    extra = _commits(before, _tidings_setup(server.url), n) if server.system == "tidings" else {}
    return _row("partitions", server, n, received, (last - p["start"]) / 1e9, cpu, p["client_cpu"],
                order_violations=sum(c["violations"] for c in cs), gaps=sum(c["gaps"] for c in cs), **extra)


def scenario_latency(server: Server, n: int, rate: int) -> dict[str, Any]:
    if server.system == "tidings":
        before = _tidings_setup(server.url, "bench.lat", "bench.lat.>")
    cons = [_worker("lat-consumer", server, messages=n)]
    prod = _worker("lat-producer", server, messages=n, rate=rate)
    p, cs, cpu = run_pair(server, cons, prod)
    c = cs[0]
    extra = _commits(before, _tidings_setup(server.url), n) if server.system == "tidings" else {}
    warm = min(n // 10, rate // 2)  # the first quarter second or tenth: connections and caches warming
    lat = sorted(x / 1e6 for x in c["lat"][warm:])
    return _row("latency", server, n, c["received"], (c["last"] - p["start"]) / 1e9, cpu, p["client_cpu"],
                rate=rate, p50_ms=round(percentile(lat, 50), 3), p99_ms=round(percentile(lat, 99), 3), **extra)


def scenario_pubsub(server: Server, fanout: int, n: int) -> dict[str, Any]:
    if server.system == "tidings":
        from . import pubsub

        cpu = [0.0]
        r = pubsub.run_scenario(server.url, fanout, n, 128,
                                on_go=lambda: cpu.__setitem__(0, cpu_seconds(server.pid)),
                                on_done=lambda: cpu.__setitem__(0, cpu_seconds(server.pid) - cpu[0]))
        return _row(f"pubsub 1->{fanout}", server, n * fanout, r["delivered"], r["seconds"], cpu[0],
                    p50_ms=round(r["p50_us"] / 1e3, 3), p99_ms=round(r["p99_us"] / 1e3, 3),
                    dropped=r["dropped"], disconnected=0)
    subj = f"peers.fan{fanout}"
    cons = [_worker("sub", server, messages=n, subject=subj) for _ in range(fanout)]
    prod = _worker("pub", server, messages=n, subject=subj)
    p, cs, cpu = run_pair(server, cons, prod)
    received = sum(c["received"] for c in cs)
    lat = sorted(x / 1e6 for c in cs for x in c["lat"])
    return _row(f"pubsub 1->{fanout}", server, n * fanout, received,
                (max(c["last"] for c in cs) - p["start"]) / 1e9, cpu, p["client_cpu"],
                p50_ms=round(percentile(lat, 50), 3), p99_ms=round(percentile(lat, 99), 3),
                dropped=n * fanout - received, disconnected=sum(c.get("disconnected", 0) for c in cs))


# ---------------------------------------------------------------------------------------------
# workers: tidings latency (the other tidings workers are those of durable/streams/pubsub)


async def _pace(i: int, t0: float, interval: float) -> None:
    delay = t0 + i * interval - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _payload_stamped(size: int = 128) -> tuple[bytes, Any]:
    return b"x" * (size - STAMP.size), STAMP.pack


async def _tidings_lat_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    from tidings.client import connect

    pad, pack = _payload_stamped()
    async with connect(url, name="peers-lat-producer") as tc:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        pending: deque[Any] = deque()
        mono = time.monotonic_ns
        start = mono()
        t0 = time.perf_counter()
        interval = 1 / p["rate"]
        for i in range(p["messages"]):
            await _pace(i, t0, interval)
            pending.append(tc.publish_nowait("bench.lat.x", pack(mono()) + pad, confirm=True))
            while pending and (len(pending) >= 1000 or pending[0].done()):
                await pending.popleft()
        while pending:
            await pending.popleft()
        return {"start": start, "done": mono()}


async def _tidings_lat_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    from tidings.client import connect

    n = p["messages"]
    lat: list[int] = []
    mono = time.monotonic_ns
    unpack = STAMP.unpack_from
    async with connect(url, name="peers-lat-consumer") as tc:
        async with tc.consume("bench.lat", prefetch=1000) as deliveries:
            print("ready", flush=True)
            async for d in deliveries:
                lat.append(mono() - unpack(d.payload)[0])
                await d.ack()
                if len(lat) >= n:
                    break
            last = mono()
            await tc.flush()
    return {"received": len(lat), "last": last, "lat": lat}


# ---------------------------------------------------------------------------------------------
# workers: Redis Streams (redis-py asyncio)


async def _redis_group(r: Any, stream: str) -> None:
    import redis

    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:  # BUSYGROUP: the other consumer made it
        if "BUSYGROUP" not in str(exc):
            raise


async def _redis_pipelined_xadd(r: Any, items: list[tuple[str, dict[bytes, bytes]]], batch: int) -> None:
    for i in range(0, len(items), batch):
        pipe = r.pipeline(transaction=False)
        for stream, fields in items[i:i + batch]:
            pipe.xadd(stream, fields)
        await pipe.execute()


async def _redis_produce(r: Any, items: list[tuple[str, dict[bytes, bytes]]], in_flight: int,
                         lanes: int = 2) -> None:
    """``lanes`` connections, each sending pipelines of in_flight/lanes XADDs: up to ``in_flight``
    commands outstanding (the queue has no keys: no order to keep across lanes)."""
    batch = max(1, in_flight // lanes)
    await asyncio.gather(*(_redis_pipelined_xadd(r, items[k::lanes], batch) for k in range(lanes)))


async def _redis_queue_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    body = {b"d": b"x" * 128}
    items = [("peers.q", body)] * p["messages"]
    await r.ping()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.monotonic_ns()
    await _redis_produce(r, items, p["in_flight"])
    done = time.monotonic_ns()
    await r.aclose()
    return {"start": start, "done": done}


async def _redis_consume(r: Any, streams: list[str], on_entry: Any, stop: Any) -> None:
    """XREADGROUP COUNT n; the batch's XACKs go in one pipeline with the next XREADGROUP."""
    acks: dict[str, list[bytes]] = {}
    name = f"c{os.getpid()}"
    while not stop():
        pipe = r.pipeline(transaction=False)
        for s, ids in acks.items():
            if ids:
                pipe.xack(s, GROUP, *ids)
        pipe.xreadgroup(GROUP, name, {s: ">" for s in streams}, count=REDIS_BATCH_READ, block=1000)
        out = (await pipe.execute())[-1] or []
        acks = {}
        for stream, entries in out:
            s = stream.decode()
            ids = acks.setdefault(s, [])
            for eid, fields in entries:
                on_entry(s, fields)
                ids.append(eid)
    pipe = r.pipeline(transaction=False)
    for s, ids in acks.items():
        if ids:
            pipe.xack(s, GROUP, *ids)
    await pipe.execute()


async def _redis_queue_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    await _redis_group(r, "peers.q")
    n = p["messages"]
    count = [0, 0]

    def on_entry(stream: str, fields: dict[bytes, bytes]) -> None:
        if not count[0]:
            count[1] = time.monotonic_ns()
        count[0] += 1

    print("ready", flush=True)
    await _redis_consume(r, ["peers.q"], on_entry, lambda: count[0] >= n)
    last = time.monotonic_ns()
    await r.aclose()
    return {"received": count[0], "first": count[1], "last": last}


def _keyed_items(n: int) -> Iterator[tuple[int, str, bytes]]:
    """(key index, key, payload = key's sequence number + key index + pad to 128 bytes)."""
    pad = b"x" * (128 - SEQ.size)
    names = [f"key-{i}" for i in range(KEYS)]
    seqs = [0] * KEYS
    for i in range(n):
        k = i % KEYS
        yield k, names[k], SEQ.pack(seqs[k], k) + pad
        seqs[k] += 1


def _partition(key: str) -> int:
    return zlib.crc32(key.encode()) % PARTITIONS


class OrderCheck:
    """Per-key order of first deliveries, as benchmarks.streams checks it."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.violations = self.gaps = self.received = 0
        self.ended: set[int] = set()
        self.first = 0

    def see(self, partition: int, data: bytes) -> None:
        if data == END:
            self.ended.add(partition)
            return
        if not self.received:
            self.first = time.monotonic_ns()
        self.received += 1
        seq, k = SEQ.unpack_from(data)
        prev = self.last.get(k, -1)
        if seq <= prev:
            self.violations += 1
        elif seq != prev + 1:
            self.gaps += 1
        self.last[k] = seq

    def result(self) -> dict[str, Any]:
        return {"received": self.received, "first": self.first, "last": time.monotonic_ns(),
                "violations": self.violations, "gaps": self.gaps, "keys": len(self.last)}


def _mine(index: int, members: int) -> list[int]:
    return [q for q in range(PARTITIONS) if q % members == index]


async def _redis_part_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    lanes = 2
    # a key always travels in the same lane (its index modulo lanes): its XADDs stay in order
    per_lane: list[list[tuple[str, dict[bytes, bytes]]]] = [[] for _ in range(lanes)]
    for k, key, data in _keyed_items(p["messages"]):
        per_lane[k % lanes].append((f"peers.p{_partition(key)}", {b"k": key.encode(), b"d": data}))
    batch = max(1, p["in_flight"] // lanes)
    await r.ping()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.monotonic_ns()
    await asyncio.gather(*(_redis_pipelined_xadd(r, items, batch) for items in per_lane))
    done = time.monotonic_ns()
    for q in range(PARTITIONS):
        await r.xadd(f"peers.p{q}", {b"d": END})
    await r.aclose()
    return {"start": start, "done": done}


async def _redis_part_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    mine = _mine(p["index"], p["members"])
    streams = [f"peers.p{q}" for q in mine]
    for s in streams:
        await _redis_group(r, s)
    check = OrderCheck()
    print("ready", flush=True)
    await _redis_consume(r, streams, lambda s, f: check.see(int(s[7:]), f[b"d"]),
                         lambda: check.ended >= set(mine))
    await r.aclose()
    return check.result()


async def _redis_lat_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    pad, pack = _payload_stamped()
    await r.ping()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    mono = time.monotonic_ns
    start = mono()
    t0 = time.perf_counter()
    interval = 1 / p["rate"]
    n = p["messages"]
    sent = 0
    while sent < n:
        await _pace(sent, t0, interval)
        due = min(n, int((time.perf_counter() - t0) / interval) + 1)  # behind schedule: catch up
        pipe = r.pipeline(transaction=False)
        for _ in range(max(1, due - sent)):
            pipe.xadd("peers.lat", {b"d": pack(mono()) + pad})
        sent += len(pipe)
        await pipe.execute()
    done = mono()
    await r.aclose()
    return {"start": start, "done": done}


async def _redis_lat_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    await _redis_group(r, "peers.lat")
    n = p["messages"]
    lat: list[int] = []
    mono = time.monotonic_ns
    unpack = STAMP.unpack_from

    def on_entry(stream: str, fields: dict[bytes, bytes]) -> None:
        lat.append(mono() - unpack(fields[b"d"])[0])

    print("ready", flush=True)
    await _redis_consume(r, ["peers.lat"], on_entry, lambda: len(lat) >= n)
    last = mono()
    await r.aclose()
    return {"received": len(lat), "last": last, "lat": lat}


# ---------------------------------------------------------------------------------------------
# workers: NATS JetStream and NATS core (nats-py)


async def _nats_publish_all(js: Any, subjects_payloads: Any) -> int:
    """publish_async with the context's bound of acks in flight; returns the failed publishes."""
    futures = []
    for subj, data in subjects_payloads:
        futures.append(await js.publish_async(subj, data))
    await js.publish_async_completed()
    return sum(1 for f in futures if f.cancelled() or f.exception() is not None)


async def _nats_connect(url: str, **kwargs: Any) -> Any:
    import nats

    return await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False,
                              pending_size=8 * 1024 * 1024, **kwargs)


async def _nats_queue_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream(publish_async_max_pending=p["in_flight"])
    body = b"x" * 128
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.monotonic_ns()
    failed = await _nats_publish_all(js, (("peers.q", body) for _ in range(p["messages"])))
    done = time.monotonic_ns()
    await nc.close()
    return {"start": start, "done": done, "failed": failed}


async def _nats_pull(nc: Any, stream: str, durable: str, on_msg: Any, stop: Any,
                     batch: int = NATS_FETCH) -> None:
    """A continuous pull on a durable consumer, as nats.go's ``Consume()`` does it: pull
    requests for ``batch`` messages, the next one sent when half of the outstanding ones have
    arrived, so messages flow as they are stored (nats-py's ``fetch(n)`` waits for its batch to
    fill or expire, which holds messages back at a low rate), handled in the subscription's
    callback (no per-message ``next_msg`` timeout). Each message is acked."""
    inbox = nc.new_inbox()
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    request = json.dumps({"batch": batch}).encode()  # no expiry: outstanding is then exact
    done = asyncio.Event()
    outstanding = [batch]

    async def handle(m: Any) -> None:
        if not m.reply:  # a status message (no reply subject: nothing to ack)
            return
        outstanding[0] -= 1
        on_msg(m)
        await m.ack()
        if stop():
            done.set()
        elif outstanding[0] <= batch // 2:
            await nc.publish(subject, request, reply=inbox)
            outstanding[0] += batch

    sub = await nc.subscribe(inbox, cb=handle, pending_msgs_limit=batch * 4)
    await nc.publish(subject, request, reply=inbox)
    if not stop():
        await done.wait()
    await sub.unsubscribe()
    await nc.flush()


async def _nats_queue_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream()
    await js.pull_subscribe("peers.q", durable="q", stream="PEERSQ")  # creates the durable consumer
    n = p["messages"]
    count = [0, 0]

    def on_msg(m: Any) -> None:
        if not count[0]:
            count[1] = time.monotonic_ns()
        count[0] += 1

    print("ready", flush=True)
    await _nats_pull(nc, "PEERSQ", "q", on_msg, lambda: count[0] >= n)
    last = time.monotonic_ns()
    await nc.close()
    return {"received": count[0], "first": count[1], "last": last}


async def _nats_part_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream(publish_async_max_pending=p["in_flight"])
    items = [(f"peers.p.{_partition(key)}", data) for _, key, data in _keyed_items(p["messages"])]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.monotonic_ns()
    failed = await _nats_publish_all(js, items)
    done = time.monotonic_ns()
    for q in range(PARTITIONS):
        await js.publish(f"peers.p.{q}", END)
    await nc.close()
    return {"start": start, "done": done, "failed": failed}


async def _nats_part_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream()
    mine = _mine(p["index"], p["members"])
    subs = {q: await js.pull_subscribe(f"peers.p.{q}", durable=f"p{q}", stream="PEERSP") for q in mine}
    check = OrderCheck()
    print("ready", flush=True)

    async def one(q: int, psub: Any) -> None:
        await _nats_pull(nc, "PEERSP", f"p{q}", lambda m: check.see(q, m.data), lambda: q in check.ended)

    await asyncio.gather(*(one(q, s) for q, s in subs.items()))
    await nc.close()
    return check.result()


async def _nats_lat_producer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream(publish_async_max_pending=1000)
    pad, pack = _payload_stamped()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    mono = time.monotonic_ns
    start = mono()
    t0 = time.perf_counter()
    interval = 1 / p["rate"]
    futures = []
    for i in range(p["messages"]):
        await _pace(i, t0, interval)
        futures.append(await js.publish_async("peers.lat", pack(mono()) + pad))
    await js.publish_async_completed()
    done = mono()
    await nc.close()
    return {"start": start, "done": done,
            "failed": sum(1 for f in futures if f.cancelled() or f.exception() is not None)}


async def _nats_lat_consumer(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    js = nc.jetstream()
    await js.pull_subscribe("peers.lat", durable="lat", stream="PEERSL")
    n = p["messages"]
    lat: list[int] = []
    mono = time.monotonic_ns
    unpack = STAMP.unpack_from
    print("ready", flush=True)
    await _nats_pull(nc, "PEERSL", "lat", lambda m: lat.append(mono() - unpack(m.data)[0]), lambda: len(lat) >= n)
    last = mono()
    await nc.close()
    return {"received": len(lat), "last": last, "lat": lat}


async def _nats_pub(url: str, p: dict[str, Any]) -> dict[str, Any]:
    nc = await _nats_connect(url)
    pad, pack = _payload_stamped()
    subj = p["subject"]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    mono = time.monotonic_ns
    start = mono()
    publish = nc.publish
    for _ in range(p["messages"]):
        await publish(subj, pack(mono()) + pad)
    await nc.flush(timeout=60)
    done = mono()
    await nc.publish(subj + ".end", b"")
    await nc.flush()
    await nc.close()
    return {"start": start, "done": done}


async def _nats_sub(url: str, p: dict[str, Any]) -> dict[str, Any]:
    n = p["messages"]
    lat: list[int] = []
    state = {"n": 0, "first": 0, "last": 0, "cut": 0}
    done = asyncio.Event()
    mono = time.monotonic_ns
    unpack = STAMP.unpack_from

    async def on_msg(m: Any) -> None:
        now = mono()
        c = state["n"] = state["n"] + 1
        if c == 1:
            state["first"] = now
        state["last"] = now
        if not c & 63:
            lat.append(now - unpack(m.data)[0])
        if c >= n:
            done.set()

    async def on_end(m: Any) -> None:
        # the publisher's last message: stop once what already arrived is counted (drops are possible)
        for _ in range(1000):
            if not sub.pending_msgs:
                break
            await asyncio.sleep(0.01)
        done.set()

    async def on_closed() -> None:
        # nats-server disconnects a subscriber that falls too far behind (its slow-consumer
        # rule): what arrived until then is counted, the rest shows as dropped
        state["cut"] = 1
        done.set()

    async def on_error(exc: Exception) -> None:
        pass  # the disconnect above, reported in the result

    nc = await _nats_connect(url, closed_cb=on_closed, error_cb=on_error)
    sub = await nc.subscribe(p["subject"], cb=on_msg, pending_msgs_limit=2 * n + 1,
                             pending_bytes_limit=1 << 30)
    await nc.subscribe(p["subject"] + ".end", cb=on_end)
    await nc.flush()
    print("ready", flush=True)
    await done.wait()
    result = {"received": state["n"], "first": state["first"], "last": state["last"], "lat": lat,
              "disconnected": state["cut"]}  # read before our own close() calls on_closed
    if not nc.is_closed:
        await nc.close()
    return result


WORKERS = {
    ("tidings", "lat-producer"): _tidings_lat_producer, ("tidings", "lat-consumer"): _tidings_lat_consumer,
    ("redis", "queue-producer"): _redis_queue_producer, ("redis", "queue-consumer"): _redis_queue_consumer,
    ("redis", "part-producer"): _redis_part_producer, ("redis", "part-consumer"): _redis_part_consumer,
    ("redis", "lat-producer"): _redis_lat_producer, ("redis", "lat-consumer"): _redis_lat_consumer,
    ("nats", "queue-producer"): _nats_queue_producer, ("nats", "queue-consumer"): _nats_queue_consumer,
    ("nats", "part-producer"): _nats_part_producer, ("nats", "part-consumer"): _nats_part_consumer,
    ("nats", "lat-producer"): _nats_lat_producer, ("nats", "lat-consumer"): _nats_lat_consumer,
    ("nats", "pub"): _nats_pub, ("nats", "sub"): _nats_sub,
}


def run_worker(system: str, role: str, url: str, params: dict[str, Any]) -> None:
    from tidings.broker.serve import run_loop

    fn = WORKERS[(system, role)]

    async def main() -> None:
        result = await fn(url, params)
        print(json.dumps(result), flush=True)

    run_loop(main)  # uvloop for every system's workers alike


# ---------------------------------------------------------------------------------------------
# the run


ROW_COLUMNS = ["scenario", "system", "messages", "received", "seconds", "msgs_per_s", "p50_ms", "p99_ms",
               "broker_cpu_us_per_msg", "clients_cpu_us_per_msg", "commits_per_msg", "order_violations", "gaps", "dropped", "load1"]

# (label in the comparison, scenario, metric, higher is better)
COMPARISON = [
    ("durable queue msg/s", "queue", "msgs_per_s", True),
    ("partitions msg/s", "partitions", "msgs_per_s", True),
    ("latency p50 ms", "latency", "p50_ms", False),
    ("latency p99 ms", "latency", "p99_ms", False),
    ("broker CPU us/msg @ rate", "latency", "broker_cpu_us_per_msg", False),
    ("pubsub 1->1 msg/s (NATS core)", "pubsub 1->1", "msgs_per_s", True),
    ("pubsub 1->4 deliveries/s (NATS core)", "pubsub 1->4", "msgs_per_s", True),
]


def comparison(rows: list[dict[str, Any]], systems: list[str]) -> list[dict[str, Any]]:
    """The issue's table: one line per metric, a column per system, the ratios tidings / peer."""
    by = {(r["scenario"], r["system"]): r for r in rows}
    out = []
    for label, scenario, metric, _ in COMPARISON:
        line: dict[str, Any] = {"metric": label}
        t = by.get((scenario, "tidings"), {}).get(metric)
        for s in systems:
            v = by.get((scenario, s), {}).get(metric)
            line[s] = v
        for s in systems:
            if s == "tidings":
                continue
            v = by.get((scenario, s), {}).get(metric)
            line[f"tidings/{s}"] = round(t / v, 2) if isinstance(t, (int, float)) and v else None
        if any(line.get(s) is not None for s in list(line)[1:]):
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--scenarios", nargs="+", choices=["queue", "partitions", "latency", "pubsub"],
                    default=["queue", "partitions", "latency", "pubsub"])
    ap.add_argument("--queue-messages", type=int, default=100_000)
    ap.add_argument("--partition-messages", type=int, default=100_000)
    ap.add_argument("--latency-messages", type=int, default=20_000, help="10 s at the default rate")
    ap.add_argument("--latency-rate", type=int, default=2_000, help="msg/s of the latency scenario")
    ap.add_argument("--pubsub-messages", type=int, default=300_000)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per scenario and system")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.role:
        run_worker(ns.system, ns.role, ns.url, json.loads(ns.params))
        return 0

    systems: list[str] = []
    skipped: dict[str, str] = {}
    for s in ns.systems:
        why = missing(s)
        if why:
            skipped[s] = why
            print(f"peers: skipping {s}: {why}", file=sys.stderr)
        else:
            systems.append(s)
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds the servers' context managers: nothing left running

    signal.signal(signal.SIGTERM, on_term)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    dog = Watchdog()
    status = 0
    fsync_before = fsync_after = (float("nan"), float("nan"))
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-bench-"))
            fsync_before = fsync_ms(tmp)  # the same file system as the brokers' data (the temp dir)
            servers: dict[str, Server] = {}
            for s in systems:
                dog.arm(SERVER_START_S * 2, f"starting {s}")
                if s == "tidings":
                    servers[s] = stack.enter_context(tidings_server())
                elif s == "redis":
                    servers[s] = stack.enter_context(redis_server(tmp))
                else:
                    servers[s] = stack.enter_context(nats_server(tmp))
                    _nats_setup(servers[s].url)
                dog.disarm()
            plan: list[tuple[str, Any]] = []
            if "queue" in ns.scenarios:
                plan.append(("queue", lambda srv: scenario_queue(srv, ns.queue_messages, ns.in_flight)))
            if "partitions" in ns.scenarios:
                plan.append(("partitions",
                             lambda srv: scenario_partitions(srv, ns.partition_messages, ns.in_flight)))
            if "latency" in ns.scenarios:
                plan.append(("latency", lambda srv: scenario_latency(srv, ns.latency_messages, ns.latency_rate)))
            if "pubsub" in ns.scenarios:
                for f in (1, 4):
                    plan.append((f"pubsub 1->{f}",
                                 lambda srv, f=f: scenario_pubsub(srv, f, ns.pubsub_messages)))
            for name, fn in plan:  # scenario by scenario, each system in turn: load drift hits all alike
                for s in systems:
                    if name.startswith("pubsub") and s == "redis":
                        continue  # the no-regression check is against NATS core (Redis pub/sub is slower)
                    print(f"peers: {name} on {s} ...", file=sys.stderr, flush=True)
                    dog.arm(ns.timeout, f"{name} on {s}")
                    rows.append(fn(servers[s]))
                    dog.disarm()
            fsync_after = fsync_ms(tmp)
    except Exception:
        dog.disarm()
        if not dog.fired:
            raise
        # the results so far are printed; the servers are gone, so the run ends here
        print(f"peers: timed out: {dog.fired}; stopped the processes this run started", file=sys.stderr)
        status = 3
    load_after = os.getloadavg()
    if rows:
        emit(rows, ROW_COLUMNS)
    else:
        print("[]")
    comp = comparison(rows, systems)
    if comp:
        print()
        print(json.dumps({"comparison": comp, "skipped": skipped,
                          "loadavg_before": [round(x, 2) for x in load_before],
                          "loadavg_after": [round(x, 2) for x in load_after],
                          "fdatasync_ms_p50_p99_before": fsync_before,
                          "fdatasync_ms_p50_p99_after": fsync_after}, indent=2))
        from ._common import table
        print()
        print(table(comp, list(comp[0])))
    print(f"\nload average (1/5/15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
          f"; after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"fdatasync of a 4 KiB append (p50/p99 ms) before: {fsync_before[0]}/{fsync_before[1]}"
          f"; after: {fsync_after[0]}/{fsync_after[1]}")
    for s, why in skipped.items():
        print(f"skipped {s}: {why}")
    # durable scenarios must deliver everything in order; pub/sub may drop (NATS core does by design)
    bad = [r for r in rows if r.get("order_violations") or r.get("gaps")
           or (not r["scenario"].startswith("pubsub") and r["received"] < r["messages"])]
    for r in bad:
        print(f"FAILED: {r['scenario']} on {r['system']}: received {r['received']:,} of {r['messages']:,}, "
              f"{r.get('order_violations', 0)} order violations", file=sys.stderr)
    return status or (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
