"""`tidings run MODULE:APP`: run a :class:`tidings.App`'s handlers until SIGTERM/SIGINT.

The first SIGTERM or SIGINT shuts down gracefully (App.run: no new work,
running handlers get ``--grace`` seconds, the rest are handed back to the
queue at once) and the
command exits 0; a second one cuts the grace period short. Failures (a
module that does not import, a broker that cannot be reached, a missing
queue) are one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any, Final

import anyio

from tidings.broker.serve import run_loop
from tidings.cli.common import FAILED, USAGE

DESCRIPTION = ("Run the handlers of a tidings.App (MODULE:ATTRIBUTE, e.g. `myservice.app:app`; ATTRIBUTE "
               "defaults to `app`) until SIGTERM or SIGINT, then shut down gracefully: take no new work, give "
               "running handlers --grace seconds, nack the rest, exit 0.")


#: What --help says of --grace's default: tidings.client.app.DEFAULT_GRACE, spelt out so that building
#: the parser (every command, `tidings serve` too) does not import the client library for it
#: (tests/integration/test_app.py checks that the two agree).
GRACE_HELP: Final = "seconds running handlers get to finish at shutdown (default 30)"


def register(sp: Any) -> None:
    s = sp.add_parser("run", help="run an App's handlers (MODULE:APP)", description=DESCRIPTION)
    s.add_argument("target", metavar="MODULE:APP")
    s.add_argument("--grace", type=float, default=None, help=GRACE_HELP)  # None: App.run's DEFAULT_GRACE
    s.add_argument("--url", help="broker URL, instead of the one the App was given")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=_run)


def load_app(target: str) -> Any:
    """``module:attr`` -> the App; raises LookupError with a one-line reason."""
    from tidings.client.app import App

    module, _, attr = target.partition(":")
    if not module:
        raise LookupError(f"{target!r} is not MODULE:APP (e.g. myservice.app:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise LookupError(f"cannot import {module!r}: {exc}") from None
    app = getattr(mod, attr or "app", None)
    if not isinstance(app, App):
        raise LookupError(f"{module}:{attr or 'app'} is not a tidings.App (found {type(app).__name__})")
    return app


def _run(ns: argparse.Namespace) -> int:
    from tidings.client import TidingsError
    from tidings.client.app import DEFAULT_GRACE

    grace = DEFAULT_GRACE if ns.grace is None else ns.grace

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = load_app(ns.target)
    except LookupError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return USAGE
    if ns.url:
        app.url = ns.url

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    n = 0
                    async for sig in received:
                        n += 1
                        if n == 1:
                            print(f"tidings: {signal.Signals(sig).name}: stopping (at most {grace:g} s for "
                                  "running handlers; again to stop now)", file=sys.stderr, flush=True)
                            app.stop()
                        else:
                            tg.cancel_scope.cancel()  # the messages of handlers cut short go back to the queue

            tg.start_soon(signals)
            await app.run(grace=grace)
            tg.cancel_scope.cancel()

    try:
        run_loop(main)
    except TidingsError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:  # a Ctrl-C before the signal receiver was installed
        return 0
    except BaseExceptionGroup as eg:
        first = _first(eg)
        if isinstance(first, TidingsError):
            print(f"tidings: {first}", file=sys.stderr)
            return FAILED
        raise
    return 0


def _first(eg: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
