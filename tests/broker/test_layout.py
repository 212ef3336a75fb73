"""The house rules, read from the source: arrows point one way.

Every module under broker/, client/ and protocol/ is parsed with ``ast``
(nothing is imported) and every import it makes is collected: top level,
under ``if TYPE_CHECKING:``, inside functions. Files map to module names
through pyproject's ``[tool.setuptools.package-dir]`` (client/ is
``tidings``, client/client ``tidings.client``, client/cli ``tidings.cli``,
broker/ ``tidings.broker``, protocol/ ``tidings.protocol``). The rules:

* no import cycle among the modules of tidings.broker, nor among those of
  the client side (tidings, tidings.client, tidings.cli);
* no module imports a private name (``_x``, not a dunder) of another
  project module, nor reaches one through an imported module (``mod._x``);
* tidings.broker imports nothing of the client side (tidings, tidings.client,
  tidings.cli): the daemon does not need the client library;
* the durable layer imports neither the network layer (broker.net) nor the
  composition root (broker.app, broker.serve); ops, security and http do not
  import the composition root either: they get narrow ports (docs/ARCHITECTURE.md).

An edge goes to the module named in the import (``from pkg import mod`` goes to
``pkg.mod`` when that is a module); the implicit import of a parent package's
``__init__`` is not an edge, so a package that re-exports its modules is not
a cycle by itself.

KNOWN_VIOLATIONS lists what other branches of this wave are fixing, one line
each with its owner. An entry that no longer occurs fails the test too, so the
list only ever shrinks: remove the line when its fix is merged.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: violation (as the checks below spell it) -> who removes it. Emptied by the coordinator
#: as the branches fixing them are merged.
KNOWN_VIOLATIONS: dict[str, str] = {}

BROKER = "tidings.broker"
CLIENT_SIDE = ("tidings.client", "tidings.cli")  # and the bare package `tidings` (client/__init__.py)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a submodule when `from pkg import mod` names one)
    names: tuple[str, ...]  # names taken from the target (`from target import a, b`), () for `import x`
    line: int


def package_dirs(root: Path) -> dict[str, Path]:
    """pyproject's package-dir mapping: package name -> folder."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = data["tool"]["setuptools"]["package-dir"]
    return {pkg: root / folder for pkg, folder in mapping.items()}


def module_files(dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Every module name -> its file. A folder mounted as its own package elsewhere
    (broker/ inside no other, but client/client under client/) is named by the
    deepest mapping that holds it."""
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([pkg, *parts])
            # a nested mapped folder wins over its parent's view of it
            owner = max((p for p, f in dirs.items() if path.is_relative_to(f)),
                        key=lambda p: len(str(dirs[p])))
            if owner == pkg:
                out[name] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def read_imports(module: str, path: Path, known: Iterable[str]) -> list[Import]:
    """Every import ``module`` makes, wherever it sits in the file."""
    known = set(known)
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module or "")
            plain: list[str] = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.append(Import(module, sub, (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(module, target, tuple(plain), node.lineno))
    return found


def module_aliases(path: Path, module: str, known: set[str]) -> dict[str, str]:
    """Local names bound to project modules in ``path`` (``import a.b as m``, ``from a import b``)."""
    tree = ast.parse(path.read_text(), str(path))
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, path.name == "__init__.py", node.level, node.module)
                      if node.level else node.module or "")
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out[alias.asname or alias.name] = f"{target}.{alias.name}"
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def graph(imports: Iterable[Import], modules: set[str]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            g[imp.source].add(imp.target)
    return g


def strongly_connected(g: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every component of more than one module (a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp: list[str] = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def one_cycle(g: Mapping[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete cycle through the component's first module, for the message."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _client_side(module: str) -> bool:
    return module == "tidings" or any(_within(module, p) for p in CLIENT_SIDE)


def violations(root: Path) -> dict[str, str]:
    """Every rule broken under ``root`` (a checkout): violation -> where (for the message)."""
    files = module_files(package_dirs(root))
    modules = set(files)
    imports = [imp for m, p in sorted(files.items()) for imp in read_imports(m, p, modules)]
    found: dict[str, str] = {}

    g = graph(imports, modules)
    sides = {"broker": [m for m in modules if _within(m, BROKER)],
             "client": [m for m in modules if _client_side(m)]}
    for members in sides.values():
        sub = {m: g[m] & set(members) for m in members}
        for comp in strongly_connected(sub):
            found["cycle: " + ", ".join(comp)] = " -> ".join(one_cycle(sub, comp))

    for imp in imports:
        where = f"{files[imp.source].relative_to(root)}:{imp.line}"
        if imp.target in modules and imp.target != imp.source:
            for name in imp.names:
                if is_private(name):
                    found[f"private: {imp.source} imports {imp.target}.{name}"] = where
        src, dst = imp.source, imp.target
        if _within(src, BROKER) and _client_side(dst):
            found[f"broker imports the client side: {src} -> {dst}"] = where
        if _within(src, f"{BROKER}.durable") and (
                _within(dst, f"{BROKER}.net") or dst in (f"{BROKER}.app", f"{BROKER}.serve")):
            found[f"durable imports net/app: {src} -> {dst}"] = where
        if any(_within(src, f"{BROKER}.{p}") for p in ("ops", "security", "http")) and dst in (
                f"{BROKER}.app", f"{BROKER}.serve"):
            found[f"ops/security/http imports app: {src} -> {dst}"] = where

    for m, path in sorted(files.items()):
        aliases = module_aliases(path, m, modules)
        if not aliases:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and is_private(node.attr)):
                target = aliases[node.value.id]
                if target != m:
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    found[f"private: {m} uses {target}.{node.attr}"] = where
    return found


def _report(title: str, items: Mapping[str, str]) -> str:
    return title + "\n" + "\n".join(f"  {k}\n      at {v}" for k, v in sorted(items.items()))


def test_the_house_rules_hold() -> None:
    found = violations(ROOT)
    new = {k: v for k, v in found.items() if k not in KNOWN_VIOLATIONS}
    stale = {k: f"listed for {v}; no longer occurs: remove the line" for k, v in KNOWN_VIOLATIONS.items()
             if k not in found}
    assert not new and not stale, "\n".join(
        s for s in (_report("layout rules broken:", new) if new else "",
                    _report("KNOWN_VIOLATIONS entries that are fixed:", stale) if stale else "") if s)


def test_every_module_is_read() -> None:
    """The mapping finds the modules the wheel installs (not a vacuous pass)."""
    files = module_files(package_dirs(ROOT))
    for name in ("tidings", "tidings.client.client", "tidings.cli.main", "tidings.broker.app",
                 "tidings.broker.net.connection", "tidings.broker.durable.core",
                 "tidings.broker.durable.store.sqlite", "tidings.protocol.frames"):
        assert name in files, name
    assert files["tidings.client.client"] == ROOT / "client" / "client" / "client.py"
    assert files["tidings"] == ROOT / "client" / "__init__.py"


def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"tidings" = "client"\n"tidings.broker" = "broker"\n')
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A synthetic project breaking each rule: every break is reported, with a cycle path."""
    root = _tree(tmp_path, {
        "client/__init__.py": "",
        "client/client/__init__.py": "",
        "client/client/x.py": "",
        "broker/__init__.py": "",
        "broker/app.py": "from tidings.broker.net.conn import Actor\n",
        "broker/net/__init__.py": "",
        # a cycle only through TYPE_CHECKING and a function-level import
        "broker/net/conn.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from tidings.broker.durable import core\nclass Actor: ...\n"),
        "broker/durable/__init__.py": "",
        "broker/durable/core.py": ("def f():\n    from tidings.broker.net import conn\n"
                                   "    from tidings.broker import app\n"),
        "broker/ops/__init__.py": "",
        "broker/ops/m.py": ("from tidings.broker.app import Broker\n"
                            "from tidings.broker.durable.core import _x\n"
                            "from tidings.broker.durable import core as c\nc._y\n"),
        "broker/security/__init__.py": "",
        "broker/security/a.py": "import tidings.client.x\n",
    })
    found = violations(root)
    cycles = [k for k in found if k.startswith("cycle: ")]
    assert cycles == ["cycle: tidings.broker.app, tidings.broker.durable.core, tidings.broker.net.conn"]
    assert found[cycles[0]] == ("tidings.broker.app -> tidings.broker.net.conn -> tidings.broker.durable.core"
                                " -> tidings.broker.app")
    assert "private: tidings.broker.ops.m imports tidings.broker.durable.core._x" in found
    assert "private: tidings.broker.ops.m uses tidings.broker.durable.core._y" in found
    assert "broker imports the client side: tidings.broker.security.a -> tidings.client.x" in found
    assert "durable imports net/app: tidings.broker.durable.core -> tidings.broker.net.conn" in found
    assert "durable imports net/app: tidings.broker.durable.core -> tidings.broker.app" in found
    assert "ops/security/http imports app: tidings.broker.ops.m -> tidings.broker.app" in found


def test_a_clean_project_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "client/__init__.py": "from tidings.client.x import connect\n",
        "client/client/__init__.py": "",
        "client/client/x.py": "def connect(): ...\n",
        "broker/__init__.py": "",
        "broker/app.py": ("from tidings.broker.net import conn\n"
                          "from tidings.broker.durable.core import __all__\n"),
        "broker/net/__init__.py": "",
        "broker/net/conn.py": "from tidings.broker.durable import core\n",
        "broker/durable/__init__.py": "",
        "broker/durable/core.py": "__all__ = []\n",
    })
    assert violations(root) == {}


def test_the_daemon_does_not_load_the_client_library() -> None:
    """The arrows at run time too: the broker lives under the ``tidings`` package,
    whose root offers the client's names; they are imported on first use only."""
    import subprocess
    import sys

    code = ("import sys, tidings.broker.app, tidings.broker.serve; "
            "print(sorted(m for m in sys.modules if m.startswith(('tidings.client', 'tidings.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
