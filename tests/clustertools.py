"""Several real brokers on one PostgreSQL database (`--store URL --cluster`), for the
several-brokers tests (issue 13).

    def test_x(start_cluster):
        a, b, c = start_cluster(3)                 # three brokers, one fresh database
        d = start_cluster.add()                    # one more on the same database
        a.kill(); a.restart()                      # BrokerProcess as in tests/brokerproc.py

Each broker has its own data directory (lock file, audit log) and port; the test
skips with an install hint when PostgreSQL is absent (tests/pgserver.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.brokerproc import BrokerProcess


class Cluster:
    def __init__(self, start_broker: Callable[..., BrokerProcess], url: str) -> None:
        self.url = url  # the database
        self._start = start_broker
        self.brokers: list[BrokerProcess] = []
        self.args: tuple[str, ...] = ()
        self.env: dict[str, str] | None = None

    def __call__(self, n: int, *args: str, env: dict[str, str] | None = None) -> list[BrokerProcess]:
        """Start `n` brokers with the same extra `args`/`env`; returns them in start order."""
        self.args, self.env = args, env
        return [self.add() for _ in range(n)]

    def add(self, *args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        b = self._start("--store", self.url, "--cluster", *(args or self.args), env=env or self.env)
        self.brokers.append(b)
        return b

    def urls(self) -> str:
        """One tidings:// URL naming every broker: tidings://h:p,h:p,..."""
        return "tidings://" + ",".join(f"{b.host}:{b.port}" for b in self.brokers)


@pytest.fixture
def start_cluster(start_broker: Callable[..., BrokerProcess], pg_url: str) -> Iterator[Cluster]:
    yield Cluster(start_broker, pg_url)
