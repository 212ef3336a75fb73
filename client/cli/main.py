"""The `tidings` command: `serve` runs the broker; the others are tools for people.

`pub` and `sub` live here; the queue and dead-letter admin commands
(`queues`, `dlq`) live in admin_cli.py and are registered from
build_parser.

Every command that talks to a running broker uses the normal protocol
through the client library, at ``--url`` (default: the local default
port).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import anyio

from tidings.cli import queues as admin_cli, ops as ops_cli, passwd as security_cli, streams as stream_cli
from tidings.broker.config import DEFAULT_PORT, ConfigError
from tidings.broker import serve

DEFAULT_URL = f"tidings://127.0.0.1:{DEFAULT_PORT}"


def _run(fn: Any, *args: Any) -> Any:
    return serve.run_loop(fn, *args)


def _serve(ns: argparse.Namespace) -> int:
    return serve.run(ns)


def _pub(ns: argparse.Namespace) -> int:
    from tidings.client import connect

    headers = {}
    for h in ns.header or []:
        k, _, v = h.partition("=")
        headers[k] = v

    async def go() -> None:
        async with connect(ns.url, name="tidings-cli") as tc:
            data = ns.data.encode()
            for _ in range(ns.count):
                await tc.publish(ns.subject, data, headers=headers or None)
            await tc.flush()

    return _run_client(go, ns.url)


def _run_client(go: Any, url: str) -> int:
    """Run a client coroutine; a broker or connection error is one line on stderr, exit 1."""
    from tidings.client import TidingsError

    try:
        _run(go)
    except TidingsError as exc:
        print(f"tidings: {url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _sub(ns: argparse.Namespace) -> int:
    from tidings.client import connect

    async def go() -> None:
        async with connect(ns.url, name="tidings-cli") as tc:
            sub = await tc.subscribe(ns.pattern, group=ns.group)
            n = 0
            async for m in sub:
                if ns.json:
                    print(json.dumps({"subject": m.subject, "payload": m.payload.decode("utf-8", "replace"),
                                      "headers": {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                                                  for k, v in (m.headers or {}).items()},
                                      "reply": m.reply}), flush=True)
                else:
                    print(f"[{m.subject}] {m.payload.decode('utf-8', 'replace')}", flush=True)
                n += 1
                if ns.count and n >= ns.count:
                    return

    return _run_client(go, ns.url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidings", description="tidings: a message broker with pub/sub, durable "
                                "queues, ordered streams and dead-letter queues.")
    sp = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sp.add_parser("serve", help="run the broker", description=serve.DESCRIPTION)
    serve.add_arguments(s)
    s.set_defaults(fn=_serve)

    s = sp.add_parser("pub", help="publish a message", description="Publish DATA (UTF-8 text) to SUBJECT.")
    s.add_argument("subject")
    s.add_argument("data")
    s.add_argument("--header", "-H", action="append", metavar="KEY=VALUE", help="add a header (repeatable)")
    s.add_argument("--count", type=int, default=1, help="publish the message this many times")
    s.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL), help=f"broker URL (default {DEFAULT_URL})")
    s.set_defaults(fn=_pub)

    s = sp.add_parser("sub", help="print messages as they arrive",
                      description="Subscribe to PATTERN (`*` matches one token, `>` the rest) and print each "
                      "message as it arrives, until interrupted or --count messages.")
    s.add_argument("pattern")
    s.add_argument("--group", help="join a queue group (each message goes to one member)")
    s.add_argument("--count", type=int, default=0, help="exit after this many messages")
    s.add_argument("--json", action="store_true", help="print one JSON object per message")
    s.add_argument("--url", default=os.environ.get("TIDINGS_URL", DEFAULT_URL), help=f"broker URL (default {DEFAULT_URL})")
    s.set_defaults(fn=_sub)

    admin_cli.register(sp)
    security_cli.register(sp)
    stream_cli.register(sp)
    ops_cli.register(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(ns.fn(ns))
    except ConfigError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
