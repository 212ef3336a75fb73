"""The client library's arrows point one way: no import circles among its modules
(imports under TYPE_CHECKING count too), no private names imported across
modules, and the durable API is composed onto the client (``tc.durable``) with
the client's forwarding methods keeping its exact signatures."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from tidings.client.admin import Durable
from tidings.client.client import Client

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tidings.client": ROOT / "client" / "client", "tidings.protocol": ROOT / "protocol"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every absolute import, wherever it is (TYPE_CHECKING blocks too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _ in _imports(path):
            for t in [target, *(f"{target}.{n}" for n in names)]:
                # a package's __init__ importing its own modules is how a package is put together
                if t in mods and t != mod and not (path.name == "__init__.py" and t.startswith(mod + ".")):
                    graph[mod].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_client_and_protocol_modules_import_without_circles() -> None:
    graph = _graph()
    assert "tidings.client.client" in graph and graph["tidings.client.client"], graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_objects_the_client_hands_out_do_not_import_it() -> None:
    """Subscriptions, consumers, messages and the durable API get ports, not the client."""
    graph = _graph()
    for mod in ("admin", "consumer", "subscription", "message", "inbox", "results", "units", "errors"):
        assert "tidings.client.client" not in graph[f"tidings.client.{mod}"], mod


def test_no_private_name_is_imported_across_modules() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {target}.{n}"
             for path in _modules().values() for target, names, line in _imports(path)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, found


def test_the_durable_api_is_composed_and_forwarded_unchanged() -> None:
    tc = Client()
    assert isinstance(tc.durable, Durable)
    public = [n for n, f in vars(Durable).items() if not n.startswith("_") and callable(f)]
    assert len(public) >= 15, public
    for name in public:
        ours, theirs = inspect.signature(getattr(Client, name)), inspect.signature(getattr(Durable, name))
        assert ours == theirs, f"Client.{name}{ours} differs from Durable.{name}{theirs}"
