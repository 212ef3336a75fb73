"""Shared test configuration: the --soak flag, the real-broker fixture, the TLS `certs` fixture,
the throwaway PostgreSQL server (`pg_server`, `pg_url`) and one bytecode cache for the
session's Python subprocesses."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest_plugins = ["tests.brokerproc", "tests.certs", "tests.pgserver", "tests.clustertools"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="also run long soak/chaos tests (marked 'soak')")


#: The environment's bytecode settings before pytest_configure changed them (restored at the end).
_SAVED_ENV: dict[str, str | None] = {}
_PYC_VARS = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")


def pytest_configure(config: pytest.Config) -> None:
    """The suite starts hundreds of Python subprocesses (`python -m tidings serve`, the CLI),
    each importing ~200 modules. Where the environment sets PYTHONDONTWRITEBYTECODE (many
    container and CI images do) every one of them compiled the package from source again,
    about half of a broker's start-up. They share one bytecode cache in a temporary
    directory instead (PYTHONPYCACHEPREFIX): the source tree still gets no __pycache__."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or _SAVED_ENV:
        return
    _SAVED_ENV.update({k: os.environ.get(k) for k in _PYC_VARS})
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="tidings-pyc-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _SAVED_ENV:
        return
    shutil.rmtree(os.environ["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    for k, v in _SAVED_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _SAVED_ENV.clear()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak/chaos run: use --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
