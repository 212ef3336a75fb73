"""Run the broker daemon: ``python -m tidings.broker [serve] [--port ...]``.

``tidings serve`` (tidings.cli) registers the same arguments with
:func:`add_arguments` and calls :func:`run`; the daemon does not import the
command line, the command line imports this.
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

import anyio

from tidings.broker.config import DEFAULT_PORT, Config, ConfigError, load

log = logging.getLogger(__name__)

_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})  # what binding a port raises

DESCRIPTION = ("Run the broker. Settings: defaults < TOML file (--config or TIDINGS_CONFIG) "
               "< TIDINGS_* environment variables < flags.")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="TOML settings file")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    s.add_argument("--data-dir", help="where durable data lives (default ~/.local/share/tidings)")
    s.add_argument("--store", help="where durable state lives: a postgresql://USER@HOST:PORT/DB URL "
                   "(needs tidings[postgresql]; prefer PGPASSWORD or ~/.pgpass to a password in the URL); "
                   "default: SQLite in the data directory")
    s.add_argument("--cluster", action="store_true", help="join the other brokers on the same --store "
                   "PostgreSQL database as one service (docs/SCALING.md)")
    s.add_argument("--durability", choices=["full", "normal"], help="full: confirms survive power loss (default); "
                   "normal: confirms survive a process crash only")
    s.add_argument("--allow-open", action="store_true", help="allow a non-loopback --host without authentication")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", choices=["text", "json"])
    s.add_argument("--http-port", type=int, help="serve HTTP on this port: /metrics, /healthz, /readyz and the "
                   "publish gateway (0 picks a free one; default off)")
    s.add_argument("--http-host", help="address for the HTTP port (default 127.0.0.1)")
    s.add_argument("--metrics-port", type=int, help="deprecated: the old name of --http-port")
    s.add_argument("--metrics-host", help="deprecated: the old name of --http-host")


#: Allocations between young collections in the daemon (CPython's default: 700). Costs at
#: most one threshold's worth of unreachable cycles held a little longer (benchmarks.backlog).
GC_GEN0_THRESHOLD: Final = 100_000


def run_loop(fn: Any, *args: Any) -> Any:
    """Run ``fn`` on uvloop through anyio (plain asyncio where uvloop is missing)."""
    try:
        import uvloop  # noqa: F401
        opts = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - Windows
        opts = {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=opts)


def run(ns: argparse.Namespace) -> int:
    """Load the settings (file < environment < the flags in ``ns``) and serve until
    SIGTERM/SIGINT. Returns the exit status."""
    from tidings.broker.app import Broker
    from tidings.broker.ops import logs

    flags = {"host": ns.host, "port": ns.port, "data_dir": ns.data_dir, "store": ns.store,
             "durability": ns.durability, "cluster": True if ns.cluster else None,
             "log_level": ns.log_level, "log_format": ns.log_format,
             "allow_open": True if ns.allow_open else None,
             "http_host": ns.http_host, "http_port": ns.http_port,
             "metrics_host": ns.metrics_host, "metrics_port": ns.metrics_port}
    try:
        cfg = load(ns.config or os.environ.get("TIDINGS_CONFIG"), os.environ, flags)
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, cfg.log_format)
    for warning in cfg.deprecations:
        logging.getLogger("tidings.broker").warning("%s", warning)
    # Everything the broker creates (data directory, database, WAL, lock, audit log,
    # backups) is for its own OS user only; the store also restricts what older versions left.
    os.umask(0o077)
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as exc:
        print(f"tidings: cannot create data directory {cfg.data_dir}: {exc}", file=sys.stderr)
        return 2
    # The durable path keeps tens of thousands of live objects per queue window: at the
    # default 700 allocations a young collection runs every few messages and promotes the
    # window toward full passes (measured: -13% broker CPU at full speed with 100,000).
    gc.set_threshold(GC_GEN0_THRESHOLD, 50, 100)
    broker = Broker(cfg)
    broker.freeze_gc_when_ready = True
    try:
        run_loop(broker.serve)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # one line on stderr, never a traceback (the log has it at debug level)
        message, status = _failure(exc, cfg)
        log.debug("the broker stopped on an error", exc_info=exc)
        print(f"tidings: {message}", file=sys.stderr)
        return status
    return 0


def _failure(exc: BaseException, cfg: Config) -> tuple[str, int]:
    """One line and the exit status for an error that stopped the broker while
    starting (or running): 2 for the settings, 1 for the rest."""
    from tidings.broker.durable.store.base import StorageError  # not at the top: `tidings pub` starts faster

    grouped = isinstance(exc, BaseExceptionGroup)
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # raised from the broker's task group
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConfigError):
        return f"configuration error: {text}", 2
    if isinstance(exc, StorageError):  # e.g. the data directory is locked by another broker
        return f"cannot open the store: {text}", 1
    if isinstance(exc, OSError):
        if not grouped:  # the client listener is bound before the task group starts (Broker.serve)
            return f"cannot listen on {cfg.host}:{cfg.port}: {text}", 1
        if exc.errno in _BIND_ERRNOS and cfg.http_port >= 0:  # the one listener bound inside it
            return f"cannot listen on {cfg.http_host}:{cfg.http_port} for HTTP (metrics, console): {text}", 1
        return f"cannot start: {text}", 1
    return f"the broker stopped on an unexpected error ({type(exc).__name__}): {text}", 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        args = args[1:]  # `python -m tidings.broker serve ...` reads like `tidings serve ...`
    p = argparse.ArgumentParser(prog="python -m tidings.broker", description=DESCRIPTION)
    add_arguments(p)
    try:
        return run(p.parse_args(args))
    except KeyboardInterrupt:  # Ctrl-C before the broker installed its signal handlers
        return 130
