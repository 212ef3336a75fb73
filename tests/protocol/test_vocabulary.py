"""The protocol owns the wire vocabulary (protocol/vocabulary.py): NOTICE kinds,
the broker's header names and the default port are written there once, the
specification lists the same NOTICE kinds, and the broker and the client
library spell none of them as literals of their own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tidings.protocol import vocabulary as V

ROOT = Path(__file__).resolve().parent.parent.parent
# The code that speaks the protocol (the CLI only calls the client library).
SPEAKERS = [*sorted((ROOT / "broker").rglob("*.py")), *sorted((ROOT / "client" / "client").glob("*.py")),
            ROOT / "client" / "__init__.py"]
HEADER_NAMES = {v for k, v in vars(V).items() if k.startswith("H_")}


def _trees() -> list[tuple[Path, ast.AST]]:
    assert len(SPEAKERS) > 20, SPEAKERS  # the layout moved: this test must still see the code
    return [(p, ast.parse(p.read_text(), str(p))) for p in SPEAKERS]


def test_header_names_share_the_reserved_prefix() -> None:
    assert len(HEADER_NAMES) >= 10
    for name in HEADER_NAMES:
        assert name.startswith(V.RESERVED_HEADER_PREFIX) and name == name.lower()


def test_the_specification_lists_exactly_the_notice_kinds() -> None:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    section = text.split("## 9. NOTICE kinds", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert documented == V.NOTICE_KINDS


def test_broker_and_client_write_no_notice_kind_literal() -> None:
    """A NOTICE is built as ``[F.Op.NOTICE, V.NOTICE_..., info]`` and a kind is
    compared with ``V.NOTICE_...``, never with a string of its own."""
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.List) and len(node.elts) >= 2 and isinstance(node.elts[0], ast.Attribute) \
                    and node.elts[0].attr == "NOTICE" and isinstance(node.elts[1], ast.Constant):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind" \
                    and any(isinstance(c, ast.Constant) for c in node.comparators):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"NOTICE kinds spelled as literals (use tidings.protocol.vocabulary): {found}"


def test_broker_and_client_write_no_header_name_or_port_literal() -> None:
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant):
                continue
            v = node.value
            if (isinstance(v, str) and (v == V.RESERVED_HEADER_PREFIX or v in HEADER_NAMES
                                        or v.startswith(V.RESERVED_HEADER_PREFIX + "dlq-"))) \
                    or (type(v) is int and v == V.DEFAULT_PORT):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {v!r}")
    assert not found, f"wire names spelled outside tidings.protocol.vocabulary: {found}"


def test_broker_and_client_share_the_default_port() -> None:
    from tidings.broker import config
    from tidings.client import client

    assert config.DEFAULT_PORT == client.DEFAULT_PORT == V.DEFAULT_PORT
    assert client.DEFAULT_URL.endswith(f":{V.DEFAULT_PORT}")
