"""The `tidings` command reads, and never shows a traceback (issue 15, item 5).

Run as a user runs it (a subprocess against a real broker): --version; pub with
--key/--msg-id/--header/stdin printing the confirm; `queues peek` leaving the
messages in place; `streams read` from earliest, an offset or a time; the
TIDINGS_* environment on every command; and every failure (a locked data
directory, a bad URL, a pattern written for another broker, a server that is not
a tidings broker, no terminal or Ctrl-C in `passwd`, a flag typo in `serve`) as
one line on stderr with its exit status.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from tidings.client import ConnectError, connect
from tidings.client.errors import InvalidArgumentError, InvalidSubjectError, NotABrokerError

CLI = [sys.executable, "-m", "tidings"]
# The CLI with SIGINT at its default, for tests that press Ctrl-C: a job started in the
# background by a non-interactive shell (a CI runner) inherits SIGINT ignored.
CLI_WITH_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execv(sys.executable, [sys.executable, '-m', 'tidings', *sys.argv[1:]])"]
RUN_TIMEOUT = 60.0  # a hang bound for one command, never a deadline a passing run comes near
WAIT = 30.0
HINT = "'*' for one token and '>' for the rest"
NATS_INFO = b'INFO {"server_id":"NDUMMY","version":"2.10.0","go":"go1.22","max_payload":1048576}\r\n'


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any TIDINGS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
            **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=RUN_TIMEOUT, env=env or clean_env(),
                          input=stdin if stdin is not None else b"", check=False, **kw)  # type: ignore[call-overload]


async def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> Result:
    r = await anyio.to_thread.run_sync(lambda: run_cli(*args, env=env, stdin=stdin))
    return Result(r.returncode, r.stdout.decode(), r.stderr.decode())


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def one_line_failure(self, code: int = 1) -> str:
        """Assert the command failed with ``code`` and exactly one line on stderr; return it."""
        assert self.code == code, (self.code, self.out, self.err)
        assert "Traceback" not in self.err, self.err
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tidings"), self.err
        return lines[0]


# ------------------------------------------------------------------ version


def test_version_is_the_package_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"tidings {version('tidings')}"


# ---------------------------------------------------------------------- pub


async def test_pub_to_a_mistyped_subject_says_no_route(broker) -> None:
    """Issue 15.1 from the shell: a publish that asks for a confirm and reaches no queue, stream
    or subscriber fails in one line (exit 1) instead of vanishing; nothing is stored."""
    async with connect(broker.url) as tc:
        await tc.declare_queue("cli-nr", bind=["cli-nr.placed"])
        for extra in (["--msg-id", "o-2"], ["--confirm"]):
            r = await cli("pub", "cli-nr.placd", "x", *extra, "--url", broker.url)
            assert "no" in r.one_line_failure(1).lower(), r.err
        r = await cli("pub", "cli-nr.placed", "y", "--confirm", "--url", broker.url)
        assert r.code == 0 and "stored in 1 queue" in r.out, (r.out, r.err)
        assert (await tc.queue_info("cli-nr"))["depth"] == 1


async def test_pub_priority_orders_a_priority_queue(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("cli-prio", bind=["cli-prio.>"], max_priority=9)
        for data, prio in (("low", "1"), ("high", "9")):
            r = await cli("pub", "cli-prio.x", data, "--priority", prio, "--url", broker.url)
            assert r.code == 0, r.err
        async with tc.consume("cli-prio") as deliveries:
            got = [await deliveries.next(timeout=WAIT) for _ in range(2)]
        assert [d.payload for d in got] == [b"high", b"low"]


async def test_pub_prints_the_confirm_with_key_msg_id_headers_and_stdin(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("cliq", bind=["cliq.>"])
        await tc.declare_stream("clis", partitions=3, bind=["clis.>"])
        r = await cli("pub", "cliq.a", "hello", "--msg-id", "o-1", "-H", "k=v", "--header", "n=2",
                      "--url", broker.url)
        assert r.code == 0, r.err
        assert r.out.startswith("confirmed cliq.a: message ") and r.out.strip().endswith("stored in 1 queue"), r.out
        r = await cli("pub", "cliq.a", "hello", "--msg-id", "o-1", "--url", broker.url)  # the same id again
        assert "duplicate" in r.out, r.out
        binary = b"\xff\x00\x1b[2Jnot text\n"
        r = await cli("pub", "cliq.b", "-", "--url", broker.url, "--json", stdin=binary)
        assert r.code == 0, r.err
        assert json.loads(r.out)["queues"] == 1
        r = await cli("pub", "clis.x", "keyed", "--key", "user-7", "--url", broker.url)
        assert r.code == 0, r.err
        words = r.out.split()
        part, offset = int(words[words.index("partition") + 1]), int(words[words.index("offset") + 1])
        assert "stream clis" in r.out and offset == 0, r.out

        async with tc.consume("cliq") as deliveries:
            first = await deliveries.next(timeout=WAIT)
            assert (first.payload, first.msg_id, first.headers) == (b"hello", "o-1", {"k": "v", "n": "2"})
            await first.ack()
            second = await deliveries.next(timeout=WAIT)
            assert second.payload == binary  # stdin is sent as bytes, not decoded
            await second.ack()
        got = [m async for m in tc.read_stream("clis", part, "earliest")]
        assert [(m.key, m.payload, m.offset) for m in got] == [("user-7", b"keyed", 0)]


# ------------------------------------------------------------- queues peek


async def test_queues_peek_leaves_the_messages_for_a_consumer(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_queue("peeked", bind=["peeked.>"])
        for i in range(3):
            await tc.publish("peeked.x", f"m{i}".encode(), msg_id=f"p-{i}")
        await tc.publish("peeked.x", b"\xfe\xff")
        r = await cli("queues", "peek", "peeked", "-n", "2", "--url", broker.url, "--json")
        assert r.code == 0, r.err
        shown = json.loads(r.out)
        assert [m["payload"] for m in shown["messages"]] == ["m0", "m1"]
        r = await cli("queues", "peek", "peeked", "--offset", "3", "--url", broker.url)
        assert r.code == 0, r.err
        assert "peeked: 1 message from #4, left in the queue" in r.out and "payload: base64:/v8=" in r.out, r.out
        assert (await tc.queue_info("peeked"))["depth"] == 4
        async with tc.consume("peeked") as deliveries:
            got = []
            for _ in range(4):
                d = await deliveries.next(timeout=WAIT)
                got.append((d.payload, d.delivery_count))
                await d.ack()
    assert got == [(b"m0", 1), (b"m1", 1), (b"m2", 1), (b"\xfe\xff", 1)]  # none was delivered before


# ------------------------------------------------------------ streams read


async def test_streams_read_from_earliest_an_offset_a_time_and_follow(broker) -> None:
    async with connect(broker.url) as tc:
        await tc.declare_stream("readme", partitions=1, bind=["readme.>"])
        acks = [await tc.publish("readme.e", f"e{i}".encode()) for i in range(3)]
        assert [a.offset for a in acks if a is not None] == [0, 1, 2]
        r = await cli("streams", "read", "readme", "--url", broker.url)
        assert r.code == 0, r.err
        assert r.out.splitlines() == ["0:0 [readme.e] e0", "0:1 [readme.e] e1", "0:2 [readme.e] e2"]
        r = await cli("streams", "read", "readme", "--from", "1", "-n", "1", "--url", broker.url)
        assert r.out.splitlines() == ["0:1 [readme.e] e1"]
        r = await cli("streams", "read", "readme", "--json", "--url", broker.url)
        stamps = [json.loads(line)["timestamp_ms"] for line in r.out.splitlines()]
        when = dt.datetime.fromtimestamp(stamps[2] / 1000, dt.timezone.utc).isoformat()
        r = await cli("streams", "read", "readme", "--from", when, "--url", broker.url)
        assert r.code == 0, r.err
        # a time selects by publish time: every message from the last one's millisecond on
        expected = [f"0:{i} [readme.e] e{i}" for i, ms in enumerate(stamps) if ms >= stamps[2]]
        assert r.out.splitlines() == expected
        r = await cli("streams", "read", "readme", "--from", "latest", "--url", broker.url)
        assert r.code == 0 and r.out == "", (r.out, r.err)
        r = await cli("streams", "read", "readme", "--from", "never", "--url", broker.url)
        assert r.code == 2 and "earliest, latest, an offset" in r.err and "Traceback" not in r.err

        async with await anyio.open_process(
                [*CLI, "streams", "read", "readme", "--follow", "-n", "4", "--url", broker.url],
                env=clean_env(), stdin=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            out = b""
            with anyio.fail_after(WAIT):
                while out.count(b"\n") < 3:  # the three stored ones: the reader is registered
                    out += await proc.stdout.receive()
                await tc.publish("readme.e", b"e3")
                async for chunk in proc.stdout:
                    out += chunk
                assert await proc.wait() == 0
    assert out.decode().splitlines()[-1] == "0:3 [readme.e] e3"


# ------------------------------------------------------------- credentials


async def test_environment_credentials_and_url_on_every_command_and_flags_win(start_broker, tmp_path: Path) -> None:
    from securitytools import PASSWORDS, user, write_config

    token = "tok-" + "x" * 40
    conf = write_config(tmp_path / "tidings.toml",
                        users={**user("admin", publish=[">"], subscribe=[">"], admin=[">"], consume=[">"]),
                               **user("bot", tokens=[token], publish=["env.>"], consume=["envq", "envs"],
                                      admin=["envq", "envs"]),
                               **user("reader", tokens=["reader-" + "y" * 40], consume=["envq"])})
    b = start_broker("--config", str(conf))
    async with connect(b.url, user="admin", password=PASSWORDS["admin"]) as tc:
        await tc.declare_queue("envq", bind=["env.q"])
        await tc.declare_stream("envs", bind=["env.s"])
    host_port = b.url.split("://", 1)[1]  # TIDINGS_URL without the scheme works too
    by_token = clean_env(TIDINGS_URL=host_port, TIDINGS_TOKEN=token)
    by_password = clean_env(TIDINGS_URL=b.url, TIDINGS_USER="admin", TIDINGS_PASSWORD=PASSWORDS["admin"])
    for args in (["pub", "env.q", "one"], ["pub", "env.s", "two", "--key", "k"], ["queues", "peek", "envq"],
                 ["queues", "info", "envq"], ["streams", "read", "envs"], ["streams", "info", "envs"]):
        r = await cli(*args, env=by_token)
        assert r.code == 0, (args, r.err)
    r = await cli("queues", "peek", "envq", env=clean_env(TIDINGS_URL=b.url, TIDINGS_TOKEN="reader-" + "y" * 40))
    assert r.code == 0 and "one" in r.out, r.err  # peeking needs consume only
    r = await cli("queues", env=by_token)  # listing every queue needs admin on '>'
    assert "permission denied" in r.one_line_failure()
    r = await cli("queues", env=by_password)
    assert r.code == 0 and "envq" in r.out, r.err
    wrong = clean_env(TIDINGS_URL=b.url, TIDINGS_USER="admin", TIDINGS_PASSWORD="wrong")
    r = await cli("stats", "--once", "--interval", "0.01", env=wrong)
    r.one_line_failure()
    r = await cli("stats", "--once", "--interval", "0.01", "--password", PASSWORDS["admin"], env=wrong)
    assert r.code == 0, r.err  # the flag wins over the environment


# ------------------------------------------------------------ bad input


async def test_subscribe_and_bind_patterns_of_other_brokers_are_refused_with_the_hint(broker) -> None:
    for pattern in ("orders.#", "orders/created", "sensors.+.temp"):
        r = await cli("sub", pattern, "--url", broker.url)
        assert HINT in r.one_line_failure(), pattern
    r = await cli("queues", "declare", "mqttish", "--bind", "orders/#", "--url", broker.url)
    assert HINT in r.one_line_failure()  # refused by the broker
    async with connect(broker.url) as tc:
        with pytest.raises(InvalidSubjectError, match="for the rest"):
            await tc.subscribe("a.#")
        with pytest.raises(InvalidArgumentError, match="for the rest"):
            await tc.declare_stream("mqttish", bind=["a.+"])
    from rawclient import RawClient

    from tidings.protocol import frames as F

    async with RawClient.open(broker.host, broker.port) as rc:  # the broker checks SUB itself
        await rc.hello()
        rid = rc.next_rid()
        await rc.send_wire([F.Op.SUB, rid, 1, "a.#", None])
        err = await rc.read_until(lambda f: isinstance(f, F.Err), timeout=WAIT)
        assert isinstance(err, F.Err) and HINT in err.message, err


async def test_bad_urls_say_what_a_url_looks_like_and_no_scheme_works(broker) -> None:
    for url in ("http://x", "tidings://host:port", "tidings://[::1", "tidings://h:1/path"):
        r = await cli("sub", "x", "--url", url)
        assert "tidings://HOST:PORT" in r.one_line_failure(1), url
    async with connect(broker.url.split("://", 1)[1]) as tc:  # "127.0.0.1:PORT"
        assert tc.server_info


async def test_non_utf8_payloads_print_escaped(broker) -> None:
    async with connect(broker.url) as tc:
        async with await anyio.open_process(
                [*CLI, "sub", "bin.>", "--count", "2", "--url", broker.url],
                env=clean_env(PYTHONIOENCODING="ascii"), stdin=subprocess.DEVNULL) as proc:
            with anyio.fail_after(WAIT):
                while (await tc.call("stats"))["subscriptions"] < 1:
                    await tc.flush()
            await tc.publish("bin.a", b"\xff\xfe\x1b[2J")  # not UTF-8, and a terminal escape
            await tc.publish("bin.b", "grüße")  # UTF-8, on a stdout that is ASCII
            await tc.flush()
            assert proc.stdout is not None and proc.stderr is not None
            with anyio.fail_after(WAIT):
                out = b"".join([chunk async for chunk in proc.stdout])
                err = b"".join([chunk async for chunk in proc.stderr])
                assert await proc.wait() == 0, err
    assert out.decode("ascii").splitlines() == ["[bin.a] \\xff\\xfe\\x1b[2J", "[bin.b] gr\\xfc\\xdfe"]


# ------------------------------------------------------- not a tidings broker


@asynccontextmanager
async def fake_server(greeting: bytes | None) -> AsyncIterator[int]:
    """A loopback server that is not a tidings broker: it sends ``greeting`` (like
    NATS's INFO line) or nothing (like Redis waiting for a command) and keeps the
    connection open. Yields its port."""
    async def handle(stream: SocketStream) -> None:
        async with stream:
            if greeting is not None:
                await stream.send(greeting)
            try:
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


async def test_a_server_that_is_not_a_tidings_broker_is_named() -> None:
    async with fake_server(NATS_INFO) as port:
        with pytest.raises(NotABrokerError, match=r"is not a tidings broker \(it sent 'INFO \{"):
            async with connect(f"127.0.0.1:{port}", reconnect=False):
                pass
        for cmd in (["pub", "x", "y"], ["sub", "x"], ["queues"]):
            r = await cli(*cmd, "--url", f"tidings://127.0.0.1:{port}")
            line = r.one_line_failure()
            assert f"127.0.0.1:{port} is not a tidings broker (it sent 'INFO {{" in line, line
    async with fake_server(b"\x15\x03\x03\x00\x02\x02\x46") as port:  # a TLS alert: plain text to a TLS port
        with pytest.raises(NotABrokerError, match=r"speaks TLS: use a tidings\+tls:// URL"):
            async with connect(f"127.0.0.1:{port}", reconnect=False):
                pass
    async with fake_server(None) as port:  # silent: the handshake timeout says so
        with pytest.raises(ConnectError, match="is a tidings broker listening there"):
            async with connect(f"127.0.0.1:{port}", timeout=0.2):
                pass
        r = await cli("pub", "x", "y", "--url", f"127.0.0.1:{port}", "--timeout", "0.2")
        assert "no answer to the tidings handshake" in r.one_line_failure()


# ------------------------------------------------------------------- serve


def test_a_second_broker_on_a_locked_data_dir_is_one_line(broker) -> None:
    r = run_cli("serve", "--port", "0", "--data-dir", str(broker.data_dir))
    res = Result(r.returncode, r.stdout.decode(), r.stderr.decode())
    assert "is locked: another tidings process is using this data directory" in res.one_line_failure()


def test_an_http_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--http-port", str(port))
    res = Result(r.returncode, r.stdout.decode(), r.stderr.decode())
    assert f"cannot listen on 127.0.0.1:{port} for HTTP" in res.one_line_failure()


def test_serve_flag_typos_show_the_usage_of_serve() -> None:
    r = run_cli("serve", "--prot", "7421")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("usage: tidings serve") and "tidings serve: error: unrecognized arguments: --prot" in err
    r = run_cli("queues", "declare", "q", "--bnid", "x")
    assert r.stderr.decode().startswith("usage: tidings queues declare")


# ------------------------------------------------------------------ passwd


def test_passwd_without_a_terminal_says_use_stdin() -> None:
    r = run_cli("passwd", start_new_session=True)  # a new session has no controlling terminal
    res = Result(r.returncode, r.stdout.decode(), r.stderr.decode())
    assert "--stdin" in res.one_line_failure()


def test_passwd_ctrl_c_at_the_prompt_exits_130_quietly() -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: `tidings passwd` on the pty as its terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job may have inherited it ignored
        os.execve(sys.executable, [*CLI, "passwd"], clean_env())
    out = b""
    try:
        with _bounded(RUN_TIMEOUT):
            while b"Password:" not in out:
                out += os.read(fd, 1024)
            os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT
            while True:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:  # the child closed the pty
                    break
                if not chunk:
                    break
                out += chunk
    except BaseException:
        os.kill(pid, signal.SIGKILL)  # ours; it would otherwise wait at the prompt forever
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, out
    assert b"Traceback" not in out and b"KeyboardInterrupt" not in out, out


class _bounded:
    """A SIGALRM bound on blocking reads from the pty (no event loop here)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def expire(signum: int, frame: object) -> None:
            raise TimeoutError(f"no answer from the pty within {self.seconds}s")

        self.old: Callable[..., object] | int | None = signal.signal(signal.SIGALRM, expire)  # type: ignore[assignment]
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)  # type: ignore[arg-type]


# ----------------------------------------------------------------- Ctrl-C


async def test_ctrl_c_ends_sub_quietly(broker) -> None:
    async with connect(broker.url) as tc:
        async with await anyio.open_process([*CLI_WITH_SIGINT, "sub", "quiet.>", "--url", broker.url],
                                            env=clean_env(), stdin=subprocess.DEVNULL) as proc:
            with anyio.fail_after(WAIT):
                while (await tc.call("stats"))["subscriptions"] < 1:
                    await tc.flush()
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            try:
                with anyio.fail_after(WAIT):
                    err = b"".join([chunk async for chunk in proc.stderr])
                    assert await proc.wait() == 0
            except BaseException:
                proc.kill()  # ours; leaving the block would wait for it forever
                raise
    assert err == b""


# -------------------------------------------------------------- completion


@pytest.mark.parametrize("line, expected", [
    ("tidings qu", ["queues"]),
    ("tidings queues pe", ["peek"]),
    ("tidings streams read --fo", ["--follow"]),
])
def test_shell_completion_completes_commands_and_options(line: str, expected: list[str]) -> None:
    """What bash asks through `eval "$(register-python-argcomplete tidings)"`: the hook
    (argcomplete) answers on file descriptor 8."""
    rfd, wfd = os.pipe()
    env = clean_env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)), _ARGCOMPLETE_IFS="\n")
    r = subprocess.run([*CLI], env=env, capture_output=True, timeout=RUN_TIMEOUT, check=False,
                       stdin=subprocess.DEVNULL, preexec_fn=lambda: os.dup2(wfd, 8), pass_fds=(wfd, 8))
    os.close(wfd)
    with os.fdopen(rfd) as answer:
        words = answer.read().split()
    assert r.returncode == 0, r.stderr
    assert words == expected, (words, r.stderr)
