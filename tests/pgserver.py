"""A throwaway PostgreSQL server for the tests, from Debian's `postgresql` package.

    def test_x(pg_url):             # a fresh, empty database on the session's server
        store = PostgresStore(pg_url)

`pg_server` (session scope) runs `initdb` in a temporary directory and starts the
server with `pg_ctl` on a free loopback port (listen_addresses=127.0.0.1, its unix
socket in the same directory, fsync on: the durability the store claims), and stops
it at the end of the session (`pg_ctl stop -m immediate`: the data is thrown away).
`pg_url` gives each test a database of its own. When the binaries are absent the
tests that use them are skipped with the package to install.

As root, PostgreSQL refuses to run: the server then runs as Debian's `postgres`
system user (`runuser -u postgres --`), which owns the temporary directory. As any
other user it runs as that user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SKIP_REASON = "PostgreSQL tests need Debian's postgresql package: apt-get install postgresql"
#: How long initdb and a server start or stop may take on a loaded machine (a hang bound).
PG_TIMEOUT = 120
#: The superuser the tests connect as (initdb -U), with trust authentication on loopback.
PG_USER = "tidings"


def find_bin_dir() -> str | None:
    """The directory holding initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin
    (Debian keeps them off PATH), else wherever PATH finds initdb."""
    def version(d: str) -> float:
        try:
            return float(Path(d).parent.name)
        except ValueError:
            return 0.0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL server in a temporary directory; see the module docstring."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = bin_dir
        self.tmp = tempfile.mkdtemp(prefix="tidings-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = PG_USER
        self._as: list[str] = []
        self._names = itertools.count(1)
        self.running = False
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: hand the directory to the postgres user.
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root needs runuser (util-linux) to start PostgreSQL")
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.tmp, "postgres", "postgres")
        os.chmod(self.tmp, 0o700)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=PG_TIMEOUT,
                              cwd=self.tmp, check=False)

    def _check(self, *args: str) -> None:
        done = self._run(*args)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self._check(os.path.join(self.bin_dir, "initdb"), "-D", self.data, "-U", self.user,
                    "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions")
        self.restart()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast, immediate). Idempotent."""
        if self.running:
            self._check(os.path.join(self.bin_dir, "pg_ctl"), "stop", "-D", self.data, "-w",
                        "-t", str(PG_TIMEOUT), "-m", mode)
            self.running = False

    def restart(self) -> None:
        """Start the (initialised, stopped) server, on the same port with the same data."""
        opts = (f"-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories={self.tmp}"
                " -c fsync=on -c synchronous_commit=on -c max_connections=200")
        self._check(os.path.join(self.bin_dir, "pg_ctl"), "start", "-D", self.data, "-w",
                    "-t", str(PG_TIMEOUT), "-l", os.path.join(self.tmp, "server.log"), "-o", opts)
        self.running = True

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run one SQL command through psql (as the test superuser); its output."""
        done = subprocess.run(
            [os.path.join(self.bin_dir, "psql"), "-h", self.host, "-p", str(self.port), "-U", self.user,
             "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, timeout=PG_TIMEOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr}")
        return done.stdout

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def pids(self) -> list[int]:
        """The server's processes (the postmaster and its children: backends, writers)."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as fh:
                master = int(fh.readline())
        except (OSError, ValueError):
            return []
        out = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        if int(fh.read().rsplit(")", 1)[1].split()[1]) == master:
                            out.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        return out

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (skips the test when PostgreSQL is not installed)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL tests run as root need the postgres system user: apt-get install postgresql")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """postgresql://... of a fresh, empty database on the session's server."""
    if not pg_server.running:  # a test that stopped it and failed before starting it again
        pg_server.restart()
    return pg_server.new_database()
