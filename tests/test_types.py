"""mypy strict on the wire protocol and the client library, in the suite so it stays strict.

The repository's folders become one import package through setuptools'
package-dir (client/ is ``tidings``, protocol/ is ``tidings.protocol``), which
mypy cannot follow. The test builds that package from symlinks in a temporary
directory (``tidings/__init__.py``, ``tidings/client``, ``tidings/protocol``:
the CLI and the broker are not part of it) and checks it with the settings in
pyproject.toml, whose ``[[tool.mypy.overrides]]`` make these modules strict
(the second test shows they do), plus ``--strict``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds: a cold mypy run takes ~15 s alone; the machine may be busy


def _package(tmp: Path) -> Path:
    pkg = tmp / "tidings"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").symlink_to(ROOT / "client" / "__init__.py")
    (pkg / "py.typed").symlink_to(ROOT / "client" / "py.typed")
    (pkg / "client").symlink_to(ROOT / "client" / "client", target_is_directory=True)
    (pkg / "sync.py").symlink_to(ROOT / "client" / "sync.py")  # tidings.sync: the blocking client's front door
    (pkg / "protocol").symlink_to(ROOT / "protocol", target_is_directory=True)
    (pkg / "_contracts.py").write_text(CONTRACTS)
    return tmp


# Structural promises no module of the package states itself (they would need an import
# against the arrows): checked along with it.
CONTRACTS = """
from tidings.client.admin import Durable
from tidings.client.client import Client
from tidings.client.message import Responder
from tidings.client.worker import ConsumerSource


def client_feeds_a_worker(c: Client) -> ConsumerSource:
    return c


def durable_feeds_a_worker(d: Durable) -> ConsumerSource:
    return d


def client_answers_requests(c: Client) -> Responder:
    return c
"""


def test_protocol_and_client_pass_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    top = _package(tmp_path / "src")
    # --strict as well as the config: whatever a newer mypy adds to --strict applies here too
    cmd = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "-p", "tidings"]
    proc = subprocess.run(cmd, cwd=top, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"mypy (strict on tidings.protocol and tidings.client):\n{proc.stdout}{proc.stderr}"


def test_the_checked_modules_are_strict(tmp_path: Path) -> None:
    """The overrides really apply: an untyped function in a checked module is an error."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    top = tmp_path / "src"
    (top / "tidings" / "protocol").mkdir(parents=True)
    (top / "tidings" / "__init__.py").write_text("")
    (top / "tidings" / "protocol" / "__init__.py").write_text("def untyped(x):\n    return x\n")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(tmp_path / "cache"), "-p", "tidings"]
    proc = subprocess.run(cmd, cwd=top, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1 and "no-untyped-def" in proc.stdout, proc.stdout + proc.stderr


def test_the_broker_and_the_cli_type_check(tmp_path: Path) -> None:
    """The daemon and the command line pass mypy with the project's settings (not
    strict: they are checked as annotated, so a wrong annotation or a call that does
    not fit its port is an error), with the whole package as mypy sees it installed."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    top = _package(tmp_path / "src")
    pkg = top / "tidings"
    (pkg / "broker").symlink_to(ROOT / "broker", target_is_directory=True)
    (pkg / "cli").symlink_to(ROOT / "client" / "cli", target_is_directory=True)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
           "-p", "tidings.broker", "-p", "tidings.cli"]
    proc = subprocess.run(cmd, cwd=top, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"mypy (tidings.broker and tidings.cli):\n{proc.stdout}{proc.stderr}"
