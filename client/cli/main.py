# PYTHON_ARGCOMPLETE_OK (tells argcomplete's shell hook that `tidings` completes itself)
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
(options, runner, exit statuses, output) is in common.py. No failure shows
a traceback: it is one line on stderr (common.failure), Ctrl-C exits 130.

Shell completion: argcomplete (``eval "$(register-python-argcomplete
tidings)"``); its hook runs only when the shell asks (``_ARGCOMPLETE`` is
set), so an ordinary run does not even import it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tidings.client import Client
    from tidings.client.results import PublishAck

STDIN: Final = "-"  # `tidings pub SUBJECT -`: the payload is standard input, as bytes
INTERRUPTED: Final = 130  # 128 + SIGINT (common.INTERRUPTED; Ctrl-C may come while common is imported)


def _serve(ns: argparse.Namespace) -> int:
    from tidings.broker import serve

    return serve.run(ns)


def _header(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _confirm_line(subject: str, ack: PublishAck) -> str:
    """What `tidings pub` prints for a confirmed publish."""
    where = []
    if ack.queues:
        where.append(f"{ack.queues} queue{'s' if ack.queues != 1 else ''}")
    if ack.stream is not None:
        where.append(f"stream {ack.stream} partition {ack.partition} offset {ack.offset}")
    for name, partition, offset in ack.raw.get("streams") or []:
        where.append(f"stream {name} partition {partition} offset {offset}")
    dup = " (a duplicate msg-id: stored once, before)" if ack.duplicate else ""
    return f"confirmed {subject}: message {ack.id} stored in {', '.join(where) or 'nothing'}{dup}"


async def _pub(tc: Client, ns: argparse.Namespace) -> None:
    headers = dict(ns.header or [])
    data: bytes = sys.stdin.buffer.read() if ns.data == STDIN else ns.data.encode()
    for _ in range(ns.count):
        ack = await tc.publish(ns.subject, data, headers=headers or None, key=ns.key, msg_id=ns.msg_id,
                               priority=ns.priority, confirm=True if ns.confirm else None)
        if ack is not None:  # the subject is bound to a queue or stream, or --key/--msg-id asked for a confirm
            print(json.dumps(ack.raw, sort_keys=True) if ns.json else _confirm_line(ns.subject, ack), flush=True)
    await tc.flush()


async def _sub(tc: Client, ns: argparse.Namespace) -> None:
    from tidings.cli.common import payload_json, printable

    sub = await tc.subscribe(ns.pattern, group=ns.group)
    n = 0
    async for m in sub:
        if ns.json:
            headers = {k: (printable(v) if isinstance(v, bytes) else v) for k, v in (m.headers or {}).items()}
            print(json.dumps({"subject": m.subject, **payload_json(m.payload), "headers": headers,
                              "reply": m.reply}), flush=True)
        else:
            print(f"[{m.subject}] {printable(m.payload)}", flush=True)
        n += 1
        if ns.count and n >= ns.count:
            return


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tidings")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"tidings {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top, so that Ctrl-C while they load is caught by main().
    from tidings.broker import serve
    from tidings.cli import ops, passwd, queues, run, schemas, streams
    from tidings.cli.common import add_options, runner

    p = argparse.ArgumentParser(prog="tidings", description="tidings: a message broker with pub/sub, durable "
                                "queues, ordered streams and dead-letter queues.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sp = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sp.add_parser("serve", help="run the broker", description=serve.DESCRIPTION)
    serve.add_arguments(s)
    s.set_defaults(fn=_serve)

    s = sp.add_parser("pub", help="publish a message",
                      description="Publish DATA (UTF-8 text; `-` reads the payload from stdin, as bytes) to "
                      "SUBJECT. When the broker confirms it (the subject is bound to a queue or stream, or "
                      "--key or --msg-id is given) the confirm is printed: the message id, how many queues "
                      "stored it, and the stream partition and offset.")
    s.add_argument("subject")
    s.add_argument("data", help="the payload, or - to read it from stdin")
    s.add_argument("--header", "-H", action="append", type=_header, metavar="KEY=VALUE",
                   help="add a header (repeatable)")
    s.add_argument("--key", help="stream partition key (messages with one key stay in order)")
    s.add_argument("--msg-id", help="message id: the broker stores a repeated id once (de-duplication)")
    s.add_argument("--priority", type=int, metavar="P",
                   help="message priority (0..255; a priority queue orders by it, up to its max_priority)")
    s.add_argument("--confirm", action="store_true",
                   help="wait for the broker's confirm even without --key/--msg-id; a subject that "
                   "reaches no queue, stream or subscriber then fails (no route) instead of vanishing")
    s.add_argument("--count", type=int, default=1, help="publish the message this many times")
    add_options(s, json_help="print each confirm as JSON (for scripts)")
    s.set_defaults(fn=runner(_pub))

    s = sp.add_parser("sub", help="print messages as they arrive",
                      description="Subscribe to PATTERN (`*` matches one token, `>` the rest) and print each "
                      "message as it arrives, until interrupted or --count messages. Payloads that are not "
                      "UTF-8 print with \\xNN escapes (--json: base64, with payload_encoding).")
    s.add_argument("pattern")
    s.add_argument("--group", help="join a queue group (each message goes to one member)")
    s.add_argument("--count", type=int, default=0, help="exit after this many messages")
    add_options(s, json_help="print one JSON object per message")
    s.set_defaults(fn=runner(_sub, reconnect=True, interrupted=0))

    queues.register(sp)
    passwd.register(sp)
    streams.register(sp)
    schemas.register(sp)
    ops.register(sp)
    run.register(sp)
    return p


def _chosen(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)command parser ``ns`` was parsed by, so its usage is shown for its errors."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(ns, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up: no traceback
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (and the hook exits)
        import argcomplete

        argcomplete.autocomplete(parser)
    for stream in (sys.stdout, sys.stderr):  # a payload never crashes a terminal that is not UTF-8
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from tidings.broker.config import ConfigError
    from tidings.cli.common import failure

    try:
        ns, extra = parser.parse_known_args(argv)
        if extra:  # `tidings serve --prot 1`: the usage of serve, not of `tidings`
            _chosen(parser, ns).error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(ns, "fn", None):
            parser.print_help()
            return 2
        return int(ns.fn(ns))
    except ConfigError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    except SystemExit:
        raise
    except BaseException as exc:  # one line, never a traceback (common.failure)
        return failure(exc, interrupted=INTERRUPTED)
