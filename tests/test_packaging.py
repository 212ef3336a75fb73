"""tidings installs one import name, ``tidings``, and keeps working next to
other distributions that ship generic top-level names (issue 11, item 1).

Built and installed as a user would: a wheel of this checkout into a fresh
virtual environment, next to a second distribution that ships its own
top-level ``client`` and ``protocol`` packages, run from a directory that
holds a ``client.py`` of its own. The environment gets no index: tidings'
dependencies come from this test's own environment on PYTHONPATH (a plain
directory there runs no .pth file, so the editable checkout stays out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300  # seconds: building a wheel and a venv on a busy 2-core machine

pytestmark = pytest.mark.timeout(600)


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = BUILD_TIMEOUT) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("packaging")
    wheels = tmp / "wheels"
    wheels.mkdir()
    # this checkout, built as pip builds it for a user; from a copy, so that no build/ or
    # egg-info is left in the checkout
    src = tmp / "tidings-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("broker", "client", "protocol"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
         str(src)], cwd=tmp)
    (ours,) = wheels.glob("tidings-*.whl")
    # a distribution with generic top-level names, like the ones that broke tidings before
    other = tmp / "other"
    for pkg in ("client", "protocol"):
        (other / pkg).mkdir(parents=True)
        (other / pkg / "__init__.py").write_text(f"WHO = 'other-{pkg}'\n")
    (other / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "other-generic-names"
        version = "1.0"
        [tool.setuptools]
        packages = ["client", "protocol"]
        """))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
         str(other)], cwd=tmp)
    (theirs,) = wheels.glob("other_generic_names-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    for wheel in (ours, theirs):
        run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    # a service's own client.py in the working directory
    (work / "client.py").write_text("raise ImportError('the local client.py was imported')\n")
    return {"tmp": tmp, "ours": ours, "py": py, "site": site, "work": work, "pip": pip}


def deps_env(env: dict[str, Any]) -> dict[str, str]:
    """Run in the new venv, with tidings' dependencies from this environment's site-packages."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(env["site"]) + os.pathsep + sysconfig.get_paths()["purelib"]
    e.pop("PYTHONHOME", None)
    return e


def test_the_wheel_installs_exactly_one_top_level_name(env: dict[str, Any]) -> None:
    with zipfile.ZipFile(env["ours"]) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"tidings"}, sorted(tops)
    with zipfile.ZipFile(env["ours"]) as z:
        names = set(z.namelist())
    # the parts a user needs are there; the benchmarks are not installed
    for path in ("tidings/__init__.py", "tidings/client/__init__.py", "tidings/cli/main.py",
                 "tidings/broker/app.py", "tidings/broker/durable/store/sqlite.py",
                 "tidings/protocol/frames.py", "tidings/py.typed"):
        assert path in names, path
    assert not any(n.startswith("benchmarks/") or "/benchmarks/" in n for n in names)


def test_the_wheel_ships_the_web_console(env: dict[str, Any]) -> None:
    """The console's page is package data: every file of its static/ folder is in the wheel."""
    static = ROOT / "broker" / "http" / "console" / "static"
    files = sorted(p.name for p in static.iterdir() if p.is_file())
    assert {"index.html", "login.html", "console.js", "console.css", "login.js"} <= set(files)
    with zipfile.ZipFile(env["ours"]) as z:
        names = set(z.namelist())
        assert "tidings/broker/http/console/web.py" in names
        for name in files:
            path = f"tidings/broker/http/console/static/{name}"
            assert path in names, path
            assert z.read(path) == (static / name).read_bytes(), path


def test_tidings_imports_and_runs_next_to_other_generic_packages(env: dict[str, Any]) -> None:
    script = textwrap.dedent("""\
        import protocol  # the other distribution's
        assert protocol.WHO == "other-protocol"
        import tidings
        from tidings import connect, Client
        from tidings.client import Worker
        from tidings.protocol import frames
        import tidings.broker.app, tidings.cli.main
        assert tidings.__file__.startswith(SITE), tidings.__file__
        print("ok", tidings.broker.app.log.name)
        """).replace("SITE", repr(str(env["site"])))
    out = run([str(env["py"]), "-c", script], cwd=env["work"], env=deps_env(env))
    assert out.split() == ["ok", "tidings.broker.app"]
    # the other distribution's top-level client is installed and untouched (outside work/,
    # whose client.py would win: that is Python's rule, and no longer tidings' problem)
    out = run([str(env["py"]), "-c", "import client, tidings; print(client.WHO)"], cwd=env["tmp"],
              env=deps_env(env))
    assert out.strip() == "other-client"


def test_the_installed_broker_serves_the_installed_client(env: dict[str, Any]) -> None:
    """``python -m tidings.broker`` from the wheel, and a round trip through the
    installed client, from a directory with a local client.py."""
    data = env["tmp"] / "data"
    e = deps_env(env)
    e.setdefault("TIDINGS_LOG_LEVEL", "info")
    proc = subprocess.Popen([str(env["py"]), "-m", "tidings.broker", "--port", "0", "--data-dir", str(data)],
                            cwd=env["work"], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        assert proc.stdout is not None
        for _ in range(200):  # bounded: the ready line comes within the first few lines
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                break
        assert port, "the broker did not report its port"
        script = textwrap.dedent(f"""\
            import anyio
            from tidings import connect

            async def main():
                async with connect("tidings://127.0.0.1:{port}") as tc:
                    await tc.declare_queue("pkg", bind=["pkg.>"])
                    await tc.publish("pkg.a", b"hello", confirm=True)
                    async with tc.consume("pkg") as ds:
                        d = await ds.next(timeout=30)
                        await d.ack()
                        print(d.payload.decode())

            anyio.run(main)
            """)
        out = run([str(env["py"]), "-c", script], cwd=env["work"], env=e, timeout=120)
        assert out.strip() == "hello"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)  # drains and closes the pipe


def test_uninstalling_the_other_distribution_leaves_tidings_whole(env: dict[str, Any]) -> None:
    run([*env["pip"], "uninstall", "-q", "-y", "other-generic-names"], cwd=env["tmp"])
    out = run([str(env["py"]), "-c", "from tidings import connect; import tidings.broker.app; print('ok')"],
              cwd=env["work"], env=deps_env(env))
    assert out.strip() == "ok"
