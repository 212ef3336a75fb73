"""Run the broker daemon: ``python -m tidings.broker [serve] [--port ...]``.

``tidings serve`` (tidings.cli) registers the same arguments with
:func:`add_arguments` and calls :func:`run`; the daemon does not import the
command line, the command line imports this.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from tidings.broker.config import DEFAULT_PORT, ConfigError, load
from tidings.broker.durable.store.base import StorageError

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
    s.add_argument("--durability", choices=["full", "normal"], help="full: confirms survive power loss (default); "
                   "normal: confirms survive a process crash only")
    s.add_argument("--allow-open", action="store_true", help="allow a non-loopback --host without authentication")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", choices=["text", "json"])
    s.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port "
                   "(0 picks a free one; default off)")
    s.add_argument("--metrics-host", help="address for the metrics port (default 127.0.0.1)")


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
             "durability": ns.durability,
             "log_level": ns.log_level, "log_format": ns.log_format,
             "allow_open": True if ns.allow_open else None,
             "metrics_host": ns.metrics_host, "metrics_port": ns.metrics_port}
    try:
        cfg = load(ns.config or os.environ.get("TIDINGS_CONFIG"), os.environ, flags)
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, cfg.log_format)
    # Everything the broker creates (data directory, database, WAL, lock, audit log,
    # backups) is for its own OS user only; the store also restricts what older versions left.
    os.umask(0o077)
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
    except OSError as exc:
        print(f"tidings: cannot create data directory {cfg.data_dir}: {exc}", file=sys.stderr)
        return 2
    broker = Broker(cfg)
    try:
        run_loop(broker.serve)
    except BaseExceptionGroup as group:  # raised from the broker's task group while starting
        storage, rest = group.split(StorageError)
        if storage is None or rest is not None:
            raise
        first: BaseException = storage
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"tidings: cannot open the store: {first}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tidings: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        args = args[1:]  # `python -m tidings.broker serve ...` reads like `tidings serve ...`
    p = argparse.ArgumentParser(prog="python -m tidings.broker", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(args))
