"""What every `tidings` command that talks to a broker shares.

    add_url, add_credentials  --url; --user/--password/--token/--ca-file (defaults from $TIDINGS_URL/_USER/...)
    add_options               both, plus --json and --timeout: the set every admin command takes
    run, runner, failure      connect, run one command on uvloop, turn errors into one line and an exit status
    print_json, jsonable, text_or_base64, printable, payload_json, table    output for people and scripts

The default URL is the client library's (:data:`tidings.client.DEFAULT_URL`, defined in
:mod:`tidings.protocol.vocabulary`).
Exit statuses: 0 done, 1 the broker or the connection said no (one line on
stderr, ``tidings: ...``, never a traceback: :func:`failure`; a malformed URL
too), 2 a bad command line (argparse's usage error), 130 interrupted by Ctrl-C (0 for the
commands that run until interrupted).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from tidings.broker.serve import run_loop
from tidings.protocol.vocabulary import DEFAULT_URL  # not the client library: `tidings serve` needs none

if TYPE_CHECKING:
    from tidings.client import Client

FAILED: Final = 1  # the broker refused, or could not be reached
USAGE: Final = 2  # argparse's status for a bad command line
INTERRUPTED: Final = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
BASE64_MARKER: Final = "base64:"  # prefixes a payload or header value that is not UTF-8 text
CLIENT_NAME: Final = "tidings-cli"  # how the broker lists the command's connection

#: A command: runs against a connected client, prints its result.
Command = Callable[["Client", argparse.Namespace], Awaitable[Any]]


# ---------------------------------------------------------------- options


def add_url(p: argparse.ArgumentParser, *, leaf: bool = False) -> None:
    """--url, defaulting to $TIDINGS_URL or the client's default URL.

    ``leaf`` is for a sub-subcommand's parser (`tidings queues declare`): its
    defaults are SUPPRESS, so an option given before the leaf name (`tidings
    queues --url U declare X`) is kept instead of being reset by the leaf's default."""
    p.add_argument("--url", default=argparse.SUPPRESS if leaf else os.environ.get("TIDINGS_URL", DEFAULT_URL),
                   help=f"broker URL; the brokers of one service as several HOST:PORT, comma-separated "
                   f"(default: $TIDINGS_URL or {DEFAULT_URL})")


def add_credentials(p: argparse.ArgumentParser, *, leaf: bool = False) -> None:
    """--user/--password/--token, defaulting to $TIDINGS_USER/_PASSWORD/_TOKEN, and --ca-file
    ($TIDINGS_CA_FILE), the CA that verifies a tidings+tls:// broker (``leaf``: see add_url)."""
    env = os.environ

    def default(name: str) -> Any:
        return argparse.SUPPRESS if leaf else env.get(name)

    p.add_argument("--user", default=default("TIDINGS_USER"), help="user name (default: $TIDINGS_USER)")
    p.add_argument("--password", default=default("TIDINGS_PASSWORD"),
                   help="password (default: $TIDINGS_PASSWORD; the environment keeps it out of `ps`)")
    p.add_argument("--token", default=default("TIDINGS_TOKEN"), help="access token (default: $TIDINGS_TOKEN)")
    p.add_argument("--ca-file", default=default("TIDINGS_CA_FILE"), metavar="PEM",
                   help="CA certificates that verify a tidings+tls:// broker (default: $TIDINGS_CA_FILE, "
                   "else the system's)")


def add_options(p: argparse.ArgumentParser, *, leaf: bool = False, timeout: float = 10.0,
                json_help: str = "print the broker's full answer as JSON (for scripts)") -> None:
    """--url, --json, --timeout (default ``timeout`` seconds) and the credentials (``leaf``: see add_url)."""
    add_url(p, leaf=leaf)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if leaf else False, help=json_help)
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS if leaf else timeout,
                   help=f"seconds to wait for the broker (default {timeout:g})")
    add_credentials(p, leaf=leaf)


# ----------------------------------------------------------------- runner


def run(ns: argparse.Namespace, command: Command, *, reconnect: bool = False,
        interrupted: int = INTERRUPTED) -> int:
    """Connect to ``ns.url`` with ``ns``'s credentials and timeout, run
    ``command(client, ns)`` on uvloop, and return the exit status.

    ``reconnect``: ride through a broker restart (for `sub`, which runs until
    interrupted); an admin command fails fast instead. ``interrupted`` is the
    status for Ctrl-C. Every failure is one line on stderr (:func:`failure`)."""
    from tidings.client import connect

    options: dict[str, Any] = {"reconnect": reconnect, "user": getattr(ns, "user", None),
                               "password": getattr(ns, "password", None), "token": getattr(ns, "token", None),
                               "ca_file": getattr(ns, "ca_file", None)}
    if getattr(ns, "timeout", None) is not None:
        options["timeout"] = ns.timeout  # also bounds the handshake: a silent non-tidings server fails in time

    async def go() -> Any:
        async with connect(ns.url, name=CLIENT_NAME, **options) as tc:
            return await command(tc, ns)

    try:
        run_loop(go)
    except BaseException as exc:  # every failure becomes one line and an exit status
        return failure(exc, interrupted=interrupted)
    return 0


def failure(exc: BaseException, *, interrupted: int = INTERRUPTED) -> int:
    """Print ``exc`` as one line on stderr (``tidings: ...``) and return its exit status:
    1 for the broker's or the connection's errors and a malformed URL,
    ``interrupted`` for Ctrl-C (nothing printed), 0 when the reader of our
    output left (`tidings queues | head`). Anything else is a bug: still one line,
    with the exception's type, so a user can report it."""
    from tidings.client import TidingsError

    err = _unwrap(exc)
    if isinstance(err, KeyboardInterrupt):
        return interrupted
    if isinstance(err, BrokenPipeError):  # the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if isinstance(err, SystemExit):  # argparse's own exit
        return err.code if isinstance(err.code, int) else FAILED
    if isinstance(err, TidingsError):
        print(f"tidings: {_one_line(err)}", file=sys.stderr)
        return FAILED
    if isinstance(err, ValueError):  # a malformed --url (parse_url says what a URL looks like)
        print(f"tidings: {_one_line(err)}", file=sys.stderr)
        return FAILED
    if isinstance(err, OSError):  # e.g. stdin or a file that cannot be read
        print(f"tidings: {_one_line(err)}", file=sys.stderr)
        return FAILED
    print(f"tidings: unexpected error ({type(err).__name__}): {_one_line(err)}", file=sys.stderr)
    return FAILED


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def runner(command: Command, *, reconnect: bool = False,
           interrupted: int = INTERRUPTED) -> Callable[[argparse.Namespace], int]:
    """``run`` bound to ``command``, for ``parser.set_defaults(fn=runner(command))``."""
    return lambda ns: run(ns, command, reconnect=reconnect, interrupted=interrupted)


def _unwrap(exc: BaseException) -> BaseException:
    """The first error inside (nested) ExceptionGroups: an error raised inside
    `async with connect()` leaves it wrapped by the client's task group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# ----------------------------------------------------------------- output


def add_bind_match(p: argparse.ArgumentParser, what: str) -> None:
    """``--bind-match PATTERN FILTER``: a binding with a content filter (docs/PROTOCOL.md §16)."""
    p.add_argument("--bind-match", nargs=2, action="append", metavar=("PATTERN", "FILTER"),
                   help=f"subject pattern to store in the {what} only where the content filter (JSON, "
                   "e.g. '{\"region\": [{\"prefix\": \"eu-\"}]}') matches (repeatable)")


def bind_entries(ns: argparse.Namespace) -> list[Any]:
    """``--bind`` patterns and ``--bind-match`` pairs as a declare's ``bind`` list; a FILTER
    that is not JSON raises ValueError (one line, exit status 1)."""
    out: list[Any] = list(ns.bind or [])
    for pattern, text in ns.bind_match or []:
        try:
            out.append({"subject": pattern, "match": json.loads(text)})
        except ValueError as exc:
            raise ValueError(f"--bind-match {pattern}: the filter is not JSON ({exc})") from None
    return out


def print_json(value: Any) -> None:
    """``value`` as indented JSON with sorted keys; bytes as :func:`text_or_base64`."""
    print(json.dumps(jsonable(value), indent=2, sort_keys=True))


def jsonable(v: Any) -> Any:
    """``v`` with bytes made text (:func:`text_or_base64`) and keys made strings, all the way down."""
    if isinstance(v, bytes):
        return text_or_base64(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def printable(b: bytes) -> str:
    """A payload for a terminal: UTF-8 text as is, other bytes as ``\\xNN`` escapes, and
    control characters (but newline and tab) escaped, so a payload cannot drive the terminal."""
    text = b.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def payload_json(payload: bytes) -> dict[str, str]:
    """``{"payload": text, "payload_encoding": "utf-8"}``, or base64 for bytes that are not UTF-8."""
    try:
        return {"payload": payload.decode("utf-8"), "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode("ascii"), "payload_encoding": "base64"}


def text_or_base64(b: bytes) -> str:
    """UTF-8 text as is; anything else as ``base64:<data>``."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return BASE64_MARKER + base64.b64encode(b).decode("ascii")


def table(rows: list[list[str]], head: list[str]) -> str:
    """Rows under a header, columns padded: the first (names) left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r) for r in [head, *rows])
