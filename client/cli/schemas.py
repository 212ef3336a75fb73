"""`tidings schemas`: the schema registry from the command line.

    tidings schemas [ls] [--json]                   schemas: latest version, mode, bindings, counts
    tidings schemas show NAME [--version N]         one version's document (JSON)
    tidings schemas register NAME FILE [--compatibility MODE]
    tidings schemas check NAME FILE [--compatibility MODE]
    tidings schemas bind PATTERN NAME [--dead-letter QUEUE]
    tidings schemas unbind PATTERN
    tidings schemas bindings [--json]

FILE is a JSON Schema draft 2020-12 document (``-`` reads standard input).
`check` exits with status 1 when the document would be refused. Like the
other admin commands they use common.py's options, runner and exit statuses;
:func:`register` adds them to the `tidings` parser (main.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

from tidings.cli.common import add_options, print_json, runner, table

MODES: Final = ("none", "backward", "forward", "full",
                "backward_transitive", "forward_transitive", "full_transitive")


class _Refused(Exception):
    """`schemas check` found the document incompatible (exit status 1, reasons printed)."""


def _read_document(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tidings: cannot read a JSON schema from {path}: {exc}") from None


async def _ls(tc: Any, ns: argparse.Namespace) -> None:
    schemas = await tc.list_schemas()
    if ns.json:
        print_json(schemas)
        return
    if not schemas:
        print("no schemas")
        return
    print(table([[s["name"], str(s["latest"]), s["compatibility"], ", ".join(s["bindings"]) or "-",
                  str(s["valid"]), str(s["invalid"]), str(s["dead_lettered"])] for s in schemas],
                ["SCHEMA", "LATEST", "COMPATIBILITY", "BOUND TO", "VALID", "INVALID", "DEAD-LETTERED"]))


async def _show(tc: Any, ns: argparse.Namespace) -> None:
    got = await tc.get_schema(ns.name, ns.version)
    if ns.json:
        print_json(got)
        return
    print(f"# {got['name']} version {got['version']} of {got['versions']} (compatibility {got['compatibility']})")
    print(json.dumps(got["schema"], indent=2))


async def _register(tc: Any, ns: argparse.Namespace) -> None:
    version = await tc.register_schema(ns.name, _read_document(ns.file), compatibility=ns.compatibility)
    print_json({"name": ns.name, "version": version}) if ns.json else print(f"{ns.name} version {version}")


async def _check(tc: Any, ns: argparse.Namespace) -> None:
    report = await tc.check_schema(ns.name, _read_document(ns.file), compatibility=ns.compatibility)
    if ns.json:
        print_json(report)
    elif report["compatible"]:
        print(f"compatible ({report['compatibility']}): it would be {ns.name} version {report['version']}")
    else:
        print(f"not compatible ({report['compatibility']}):")
        for r in report["reasons"]:
            print(f"  {r}")
    if not report["compatible"]:
        raise _Refused


async def _bind(tc: Any, ns: argparse.Namespace) -> None:
    b = await tc.bind_schema(ns.pattern, ns.name, on_invalid="dead_letter" if ns.dead_letter else "reject",
                             dead_letter_queue=ns.dead_letter)
    if ns.json:
        print_json(b)
    else:
        then = f"dead-lettered to {b['dead_letter']}" if b["dead_letter"] else "refused"
        print(f"publishes to {b['pattern']} are validated against {b['schema']}; invalid ones are {then}")


async def _unbind(tc: Any, ns: argparse.Namespace) -> None:
    b = await tc.unbind_schema(ns.pattern)
    print_json(b) if ns.json else print(f"unbound {b['pattern']} (was {b['schema']})")


async def _bindings(tc: Any, ns: argparse.Namespace) -> None:
    rows = await tc.list_schema_bindings()
    if ns.json:
        print_json(rows)
    elif not rows:
        print("no schema bindings")
    else:
        print(table([[b["pattern"], b["schema"], b["on_invalid"], b["dead_letter"] or "-"] for b in rows],
                    ["PATTERN", "SCHEMA", "ON INVALID", "DEAD-LETTER QUEUE"]))


def _check_runner(ns: argparse.Namespace) -> int:
    try:
        return runner(_check)(ns)
    except _Refused:
        return 1


def register(sp: Any) -> None:
    """Add the `schemas` command to the `tidings` subparsers ``sp``."""
    q = sp.add_parser(
        "schemas", help="register, check, show and bind event schemas",
        description="The broker's schema registry: JSON Schema (draft 2020-12) documents with numbered "
        "versions and a compatibility mode, bound to subject patterns so that every publish there is "
        "validated before it is routed or stored. Without a subcommand: list the schemas.")
    add_options(q)
    q.set_defaults(fn=runner(_ls))
    qs = q.add_subparsers(dest="schemas_command", metavar="SUBCOMMAND")

    s = qs.add_parser("ls", help="list schemas (the default)", description="List every schema.")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_ls))

    s = qs.add_parser("show", help="print a schema version", description="Print version N (default: the "
                      "latest) of schema NAME.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--version", type=int, metavar="N")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_show))

    for name, fn, text in (("register", runner(_register), "register FILE as the next version of NAME"),
                           ("check", _check_runner, "tell whether FILE would be accepted as the next version "
                                                    "of NAME (exit status 1 if not), registering nothing")):
        s = qs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". FILE is a JSON "
                          "Schema draft 2020-12 document; - reads standard input.")
        s.add_argument("name", metavar="NAME")
        s.add_argument("file", metavar="FILE")
        s.add_argument("--compatibility", choices=MODES,
                       help="the mode from this version on (default: the name's mode; backward for a new name)")
        add_options(s, leaf=True)
        s.set_defaults(fn=fn)

    s = qs.add_parser("bind", help="validate publishes to a subject pattern against a schema",
                      description="Validate every publish to subjects matching PATTERN against schema NAME. "
                      "Invalid messages are refused, or stored in --dead-letter QUEUE with the violation "
                      "in their headers.")
    s.add_argument("pattern", metavar="PATTERN")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--dead-letter", metavar="QUEUE", help="store invalid messages in QUEUE instead of refusing them")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_bind))

    s = qs.add_parser("unbind", help="stop validating a subject pattern", description="Remove PATTERN's binding.")
    s.add_argument("pattern", metavar="PATTERN")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_unbind))

    s = qs.add_parser("bindings", help="list schema bindings", description="List every schema binding.")
    add_options(s, leaf=True)
    s.set_defaults(fn=runner(_bindings))
