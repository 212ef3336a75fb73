"""Run the real broker as a subprocess on port 0, for integration tests.

    async def test_x(broker):            # one fresh broker per test
        async with connect(broker.url) as tc: ...

    def test_y(start_broker):            # custom settings / several brokers
        b = start_broker("--durability", "normal", env={"TIDINGS_MAX_PENDING_BYTES": "65536"})

    def test_z(module_broker):           # one broker shared by a module's tests (see its docstring)
        b = module_broker(env={"TIDINGS_FRAME_TIMEOUT": "1"})

A broker is started with `python -m tidings serve --port 0 --data-dir <tmp>`
and is ready when it prints its "tidings listening on HOST:PORT" line (no
sleeps). ``restart()`` starts it again on the same port and data dir
(after ``kill()`` for crash tests). Only the processes started here are
stopped at teardown.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

READY = re.compile(r"tidings listening on (\S+):(\d+)")
START_TIMEOUT = 20.0


class BrokerProcess:
    def __init__(self, data_dir: Path, args: tuple[str, ...], env: dict[str, str] | None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stderr_path = data_dir.parent / f"{data_dir.name}-stderr.log"
        self.extra_lines: list[str] = []

    @property
    def url(self) -> str:
        return f"tidings://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, port: int | None = None) -> "BrokerProcess":
        p = self.port if port is None else port
        cmd = [sys.executable, "-m", "tidings", "serve", "--port", str(p), "--data-dir", str(self.data_dir),
               "--log-level", "debug", *self.args]
        env = {**os.environ, **self.env}
        env.pop("TIDINGS_CONFIG", None)
        err = open(self.stderr_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        err.close()
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                sel.close()
                self.kill()
                raise RuntimeError(f"broker did not become ready; stderr:\n{self.stderr()}")
            line = self.proc.stdout.readline()
            if not line:
                sel.close()
                self.proc.wait()
                self._close_pipe()
                raise RuntimeError(f"broker exited with {self.proc.wait()}; stderr:\n{self.stderr()}")
            m = READY.search(line)
            if m:
                self.host, self.port = m.group(1).strip("[]"), int(m.group(2))
                break
            self.extra_lines.append(line)
        sel.close()
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None and self.proc.poll() is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL (a crash: no flush, no goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipe()

    def restart(self) -> "BrokerProcess":
        """Start again on the same port and data directory."""
        return self.start(self.port)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []
    counter = [0]

    def start(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> BrokerProcess:
        counter[0] += 1
        d = data_dir or tmp_path / f"broker{counter[0]}"
        b = BrokerProcess(d, args, env)
        started.append(b)
        return b.start(0)

    yield start
    for b in started:
        if b.alive():
            try:
                b.terminate()
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return start_broker()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., BrokerProcess]]:
    """``module_broker(*args, env=...)``: one broker per settings for the whole test module,
    started by the first test that asks and stopped after the module's last test. Only for
    tests that cannot disturb each other through it (their own subjects and names, nothing
    that changes the broker's state for the next test: what hostile-client tests check is
    exactly that a bad client disturbs nobody else). A broker that died is started again."""
    started: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], BrokerProcess] = {}

    def get(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        key = (args, tuple(sorted((env or {}).items())))
        b = started.get(key)
        if b is None:
            b = started[key] = BrokerProcess(tmp_path_factory.mktemp("module-broker") / "data", args, env)
            return b.start(0)
        return b if b.alive() else b.start(0)

    yield get
    for b in started.values():
        if b.alive():
            try:
                b.terminate()
            except subprocess.TimeoutExpired:
                pass
