"""Shared test configuration: the --soak flag, the real-broker fixture, the TLS `certs` fixture
and the throwaway PostgreSQL server (`pg_server`, `pg_url`)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.brokerproc", "tests.certs", "tests.pgserver", "tests.clustertools"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="also run long soak/chaos tests (marked 'soak')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak/chaos run: use --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
