"""`tidings passwd`: make the secrets for the ``[users]`` config section.

    tidings passwd            prompt twice for a password (no echo); print its scrypt hash
    tidings passwd --stdin    read the password as one line from stdin (scripts)
    tidings passwd --token    print a new random token (for the client) and its hash (for the config)

The work is done by :func:`tidings.broker.security.auth.passwd_main` (it
needs no broker running, so nothing from common.py); this module only
registers the command on the `tidings` parser (``register(subparsers)``,
called from main.py). Exit status 0, or 1 for a refused password (empty,
too long, the two entries differ).
"""

from __future__ import annotations

import argparse
from typing import Any


def _passwd(ns: argparse.Namespace) -> int:
    from tidings.broker.security.auth import passwd_main

    argv = []
    if ns.stdin:
        argv.append("--stdin")
    if ns.token:
        argv.append("--token")
    return passwd_main(argv)


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
