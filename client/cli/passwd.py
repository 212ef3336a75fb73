"""`tidings passwd`: make the secrets for the ``[users]`` config section.

    tidings passwd            prompt twice for a password (no echo); print its scrypt hash
    tidings passwd --stdin    read the password as one line from stdin (scripts)
    tidings passwd --token    print a new random token (for the client) and its hash (for the config)

The work is done by :func:`tidings.broker.security.auth.passwd_main` (it
needs no broker running, so nothing from common.py); this module only
registers the command on the `tidings` parser (``register(subparsers)``,
called from main.py). Exit status 0, or 1 for a refused password (empty,
too long, the two entries differ) or no terminal to prompt on (one line
saying to use --stdin), 130 for Ctrl-C at the prompt.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Final

TTY: Final = "/dev/tty"  # where getpass prompts (without echo); stdin may be a pipe
NO_TERMINAL: Final = ("tidings passwd: no terminal to prompt on; pipe the password in with "
                      "`tidings passwd --stdin`")


def _has_terminal() -> bool:
    """Can getpass prompt without echo? Without a terminal it would fall back to reading
    stdin with the password echoed (and a warning), which is never what was meant."""
    try:
        with open(TTY, "rb"):
            return True
    except OSError:
        return False


def _passwd(ns: argparse.Namespace) -> int:
    from tidings.broker.security.auth import passwd_main

    if not ns.stdin and not ns.token and not _has_terminal():
        print(NO_TERMINAL, file=sys.stderr)
        return 1
    argv = []
    if ns.stdin:
        argv.append("--stdin")
    if ns.token:
        argv.append("--token")
    try:
        return passwd_main(argv)
    except KeyboardInterrupt:  # Ctrl-C at the prompt: end the prompt's line, no traceback
        print(file=sys.stderr)
        return 130
    except EOFError:  # Ctrl-D at the prompt, or an empty stdin
        print("\ntidings passwd: no password given", file=sys.stderr)
        return 1


def register(sp: Any) -> None:
    """Add the `passwd` command to the `tidings` subparsers ``sp``."""
    s = sp.add_parser(
        "passwd", help="hash a password (or make a token) for the config file",
        description="Print a password hash (scrypt) for a [users.NAME] password = \"...\" entry, or with "
                    "--token a new random token and, on the second line, its hash for tokens = [\"...\"]. "
                    "Only hashes go in the config file; the broker never stores a plaintext secret.")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--stdin", action="store_true", help="read the password as one line from stdin (for scripts)")
    mode.add_argument("--token", action="store_true", help="generate a random token; print it and its hash")
    s.set_defaults(fn=_passwd)
