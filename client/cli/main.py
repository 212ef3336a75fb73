"""The `tidings` command: the parser, and the commands that are not admin tools.

Where each command lives:

    tidings serve                    runs the broker: tidings.broker.serve (registered here)
    tidings pub, tidings sub         here
    tidings queues, tidings dlq      queues.py
    tidings streams                  streams.py
    tidings schemas                  schemas.py
    tidings stats, tidings backup    ops.py
    tidings passwd                   passwd.py
    tidings run                      run.py (an App's handlers)

:func:`build_parser` asks each module to ``register`` its commands;
:func:`main` parses and calls the chosen command's ``fn``, whose return
value is the exit status. What the commands that talk to a broker share
(options, runner, exit statuses, output) is in common.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tidings.broker import serve
from tidings.broker.config import ConfigError
from tidings.cli import ops, passwd, queues, run, schemas, streams
from tidings.cli.common import add_credentials, add_url, runner

if TYPE_CHECKING:
    from tidings.client import Client


def _serve(ns: argparse.Namespace) -> int:
    return serve.run(ns)


async def _pub(tc: Client, ns: argparse.Namespace) -> None:
    headers = {}
    for h in ns.header or []:
        k, _, v = h.partition("=")
        headers[k] = v
    data = ns.data.encode()
    for _ in range(ns.count):
        await tc.publish(ns.subject, data, headers=headers or None)
    await tc.flush()


async def _sub(tc: Client, ns: argparse.Namespace) -> None:
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
    add_url(s)
    add_credentials(s)
    s.set_defaults(fn=runner(_pub, reconnect=True, interrupted=0))

    s = sp.add_parser("sub", help="print messages as they arrive",
                      description="Subscribe to PATTERN (`*` matches one token, `>` the rest) and print each "
                      "message as it arrives, until interrupted or --count messages.")
    s.add_argument("pattern")
    s.add_argument("--group", help="join a queue group (each message goes to one member)")
    s.add_argument("--count", type=int, default=0, help="exit after this many messages")
    s.add_argument("--json", action="store_true", help="print one JSON object per message")
    add_url(s)
    add_credentials(s)
    s.set_defaults(fn=runner(_sub, reconnect=True, interrupted=0))

    queues.register(sp)
    passwd.register(sp)
    streams.register(sp)
    schemas.register(sp)
    ops.register(sp)
    run.register(sp)
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
