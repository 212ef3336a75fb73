"""Broker settings: a frozen dataclass built from defaults < TOML < env < flags.

Building a Config has no side effects: it reads the file it is given and
the environment mapping it is given, validates everything, and returns.
Unknown keys anywhere are an error (a typo must not silently fall back to
a default). Every limit is a named setting with its reason in
docs/OPERATIONS.md.

The security sections of the TOML file (``auth``, ``[users.*]``, ``[tls]``;
see broker/security/auth.py) are validated by :func:`auth.load_security` and kept
as ``Config.security``; they have no environment variables or flags
(secrets and certificate paths belong in a file). Without users the broker
(client port and HTTP port) only listens on a loopback address unless
``allow_open`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from tidings.protocol.vocabulary import DEFAULT_PORT  # the port the client dials by default too

from tidings.broker.security.auth import Security, SecurityConfigError, load_security, split_security

ENV_PREFIX = "TIDINGS_"
# TIDINGS_* variables that belong to the client-side commands, not to the server.
CLIENT_ENV = frozenset({"TIDINGS_CONFIG", "TIDINGS_URL", "TIDINGS_USER", "TIDINGS_PASSWORD", "TIDINGS_TOKEN",
                        "TIDINGS_CA_FILE"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
NOT_SETTINGS = frozenset({"security"})  # Config fields that only come from their own TOML sections


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "tidings")


class ConfigError(Exception):
    """The settings are invalid; the broker refuses to start and says why."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = dataclasses.field(default_factory=default_data_dir)
    # Where durable state lives: "" = SQLite in data_dir (the default); a
    # postgresql://USER@HOST:PORT/DB URL = that PostgreSQL database (needs tidings[postgresql];
    # the data directory still holds the lock file and the audit log). docs/SCALING.md.
    store: str = ""
    # Several brokers on one PostgreSQL database form one service (docs/SCALING.md): each
    # registers itself with a lease and shares the database with the others. Needs a
    # postgresql:// store; off, a second broker on the same database is refused (it holds
    # the broker lock) so that nobody shares a database by accident.
    cluster: bool = False
    # The host:port other brokers and clients use to reach this one ("" = host:port as
    # listened on; set it when listening on 0.0.0.0 or behind NAT).
    cluster_address: str = ""
    server_name: str = "tidings"
    # durability: "full" (synchronous=FULL: a confirm survives power loss) or
    # "normal" (synchronous=NORMAL: survives a process crash only).
    durability: str = "full"
    # limits
    max_connections: int = 10_000
    # per authenticated user, unless [users.NAME] sets its own max_connections (one leaked
    # client loop must not take every slot of the global max_connections)
    max_connections_per_user: int = 1000
    # Connections that have not completed HELLO (TLS handshake included), in total and per source
    # address. They are counted apart from max_connections, so silent sockets cannot take the slots
    # of real clients; at either cap the oldest such connection is closed to make room (a real
    # client says HELLO at once, a silent one only waits to be evicted or to hit hello_timeout).
    max_pending_handshakes: int = 512
    max_pending_handshakes_per_ip: int = 128
    max_payload: int = 1024 * 1024
    # Bind patterns per queue or stream, and across all of them: every client receives the
    # patterns it may publish into after WELCOME and after every change, and each costs router
    # memory; a declare beyond either cap is refused (INVALID_ARGUMENT / OVERLOADED).
    max_bind_patterns: int = 64
    max_bindings: int = 10_000
    hello_timeout: float = 5.0
    frame_timeout: float = 30.0
    max_pending_bytes: int = 16 * 1024 * 1024  # per-connection outbound buffer
    slow_consumer: str = "drop"  # "drop" (count + notice) or "disconnect"
    # What one connection / one user may hold in the broker's memory (issue 10: 50,000
    # consumers on one connection were accepted; a subscription with a 32-token pattern
    # costs about 14 KiB of router memory). Per-user caps apply when users are configured.
    max_subscriptions_per_connection: int = 10_000
    max_subscriptions_per_user: int = 50_000
    max_consumers_per_connection: int = 1_000  # queue consumers, group memberships and stream readers
    max_consumers_per_user: int = 10_000
    # Consumer groups one stream may have (each is an actor with state per partition, its
    # offsets are stored, and stream.info lists them all).
    max_groups_per_stream: int = 1_000
    heartbeat: float = 20.0  # server PINGs a silent client this often; 2 missed -> close
    dedup_window: float = 300.0
    max_db_pages: int = 0  # cap the store's size in SQLite pages (4 KiB); 0 = no cap beyond the disk
    # A storage transaction running longer than this (seconds) is a stall: logged as an ERROR
    # with the stacks of the storage actor and the SQLite thread, /readyz fails while it lasts.
    store_stall_timeout: float = 5.0
    # Above this resident set size (bytes) the broker stops reading from connections that
    # publish, until it is below again; consumers, acks and admin calls keep flowing. 0 = off.
    memory_high_water: int = GIB
    # Below this much free space on the data directory's disk (bytes), durable publishes are
    # refused with STORAGE_FULL (pub/sub still works), so SQLite never hits ENOSPC mid-commit. 0 = off.
    min_free_disk: int = 256 * MIB
    # Bytes of message payload that the in-memory windows of all queues, consumer groups and
    # stream readers hold together (paged in from disk, awaiting delivery), shared fairly among
    # the active ones. A quarter of memory_high_water's default: backlogs paged in for delivery
    # alone never push RSS to the mark that pauses publishers.
    window_memory: int = 256 * MIB
    resource_check_interval: float = 0.5  # seconds between RSS / free-disk checks (cheap: one /proc read, one statvfs)
    # Audit log (JSON lines: logins, denials, admin operations, limit refusals): a file path,
    # "" for <data_dir>/audit.log, or "-" for the "tidings.audit" logger (stderr with the rest).
    audit_log: str = ""
    # Where the `backup` call writes its copies: "" for <data_dir>/backups. Clients name a file
    # in it, never a path (the broker writes as its own OS user, so a path would let any admin
    # overwrite any file that user can write).
    backup_dir: str = ""
    allow_open: bool = False  # permit binding a non-loopback host without authentication
    log_level: str = "info"
    log_format: str = "text"
    # The HTTP port (broker/http/): /metrics, /healthz, /readyz and the publish gateway
    # (POST /v1/publish/SUBJECT): -1 = off, 0 = a free port (printed), e.g. 9421.
    http_host: str = "127.0.0.1"
    http_port: int = -1
    # Open HTTP connections. Idle keep-alive connections and clients still sending their
    # request head (or not reading their answer) are closed oldest-first to make room, so
    # silent sockets never lock probes out; this only bounds the descriptors HTTP may hold.
    http_max_connections: int = 256
    # Seconds a client gets to send a complete request head (a slow-loris sender dripping a
    # byte at a time is answered 408 and closed), and to send a request body.
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    # Largest body POST /v1/publish accepts (413 beyond); 0 = max_payload, the TCP limit.
    http_max_body: int = 0
    # With users configured /metrics needs a login (bearer token or basic auth of a user with
    # admin on every name, like the stats call): it names every queue, stream and group.
    # True serves it to anyone who reaches the port (a scraper without credentials).
    metrics_public: bool = False
    # Old names of http_host / http_port (deprecated: a warning at start-up). "" and -1 = unset.
    metrics_host: str = ""
    metrics_port: int = -1
    # users, permissions and TLS from the config file's auth/[users]/[tls] sections
    # (see broker/security/auth.py)
    security: Security = dataclasses.field(default_factory=Security)

    def __post_init__(self) -> None:
        # metrics_host/metrics_port are the old names of http_host/http_port: they keep working.
        for old, new, unset in (("metrics_host", "http_host", ""), ("metrics_port", "http_port", -1)):
            value = getattr(self, old)
            if value == unset:
                continue
            default = Config.__dataclass_fields__[new].default
            current = getattr(self, new)
            if current != default and current != value:
                raise ConfigError(f"{old} is the old name of {new}: set {new} only (they differ: "
                                  f"{value!r} and {current!r})")
            object.__setattr__(self, new, value)

    @property
    def deprecations(self) -> list[str]:
        """Warnings about old setting names in use (logged at start-up)."""
        return [f"{old} is deprecated: it is now {new} (TIDINGS_{new.upper()}, --{new.replace('_', '-')}); "
                "the old name keeps working for now"
                for old, new, unset in (("metrics_host", "http_host", ""), ("metrics_port", "http_port", -1))
                if getattr(self, old) != unset]

    @property
    def http_body_limit(self) -> int:
        """The largest body POST /v1/publish accepts: http_max_body, or max_payload when 0."""
        return self.http_max_body or self.max_payload

    @property
    def audit_path(self) -> str | None:
        """The audit log file, or None when audit lines go to the logger."""
        if self.audit_log == "-":
            return None
        return self.audit_log or os.path.join(self.data_dir, "audit.log")

    @property
    def backup_path(self) -> str:
        """The directory backups are written to."""
        return self.backup_dir or os.path.join(self.data_dir, "backups")

    def validate(self) -> "Config":
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, not {self.port}")
        if not -1 <= self.http_port <= 65535:
            name = "metrics_port" if self.metrics_port != -1 else "http_port"
            raise ConfigError(f"{name} must be -1 (off) or 0..65535, not {self.http_port}")
        if not 0 <= self.http_max_body <= self.max_payload:
            raise ConfigError(f"http_max_body must be 0 (= max_payload) up to max_payload ({self.max_payload}): "
                              "a larger body could not be stored as one message")
        if self.durability not in ("full", "normal"):
            raise ConfigError("durability must be 'full' or 'normal'")
        if self.slow_consumer not in ("drop", "disconnect"):
            raise ConfigError("slow_consumer must be 'drop' or 'disconnect'")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be 'text' or 'json'")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        if self.max_db_pages < 0:
            raise ConfigError("max_db_pages must be >= 0")
        if self.store:
            scheme = self.store.split("://", 1)[0] if "://" in self.store else ""
            if scheme not in ("postgresql", "postgres"):
                # the value is not echoed: it may hold a password
                raise ConfigError("store must be empty (SQLite in data_dir) or a postgresql://USER@HOST:PORT/DB URL"
                                  f"{f', not a {scheme}:// URL' if scheme else ''}")
            if self.max_db_pages:
                raise ConfigError("max_db_pages caps the SQLite store only; it cannot be set with a PostgreSQL store")
        if self.cluster and not self.store:
            raise ConfigError("cluster = true needs a shared postgresql://USER@HOST:PORT/DB store "
                              "(brokers form one service through the database they share)")
        if self.cluster and self.security.tls is not None:
            raise ConfigError("cluster = true with [tls] is not supported yet: routes between brokers use the "
                              "client port without TLS (docs/SCALING.md)")
        for name in ("memory_high_water", "min_free_disk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns the check off)")
        for name in ("max_connections", "max_connections_per_user", "max_payload", "max_pending_bytes",
                     "max_subscriptions_per_connection", "max_subscriptions_per_user",
                     "max_consumers_per_connection", "max_consumers_per_user", "max_groups_per_stream",
                     "max_pending_handshakes", "max_pending_handshakes_per_ip", "max_bind_patterns",
                     "max_bindings", "window_memory", "http_max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        if self.max_payload > 32 * 1024 * 1024:
            raise ConfigError("max_payload may be at most 32 MiB")
        for name in ("hello_timeout", "frame_timeout", "heartbeat", "dedup_window", "resource_check_interval",
                     "store_stall_timeout", "http_header_timeout", "http_body_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not is_loopback(self.host) and not self.allow_open and not self.security.auth_enabled:
            raise ConfigError(
                f"refusing to listen on {self.host!r} with no users configured: add [users] to the config "
                "file, or set allow_open = true (TIDINGS_ALLOW_OPEN=1, --allow-open) to run an open broker "
                "on the network")
        if (self.http_port >= 0 and not is_loopback(self.http_host) and not self.allow_open
                and not self.security.auth_enabled):
            # Without users nothing on the HTTP port has a login: /metrics names every queue,
            # stream and group, and the gateway publishes anywhere.
            raise ConfigError(
                f"refusing to serve metrics on {self.http_host!r} with no users configured: the HTTP "
                "port (/metrics, the publish gateway) has no login without users, and /metrics shows "
                "every queue, stream and group name to whoever can reach it; use a loopback http_host, "
                "add [users], or set allow_open = true")
        return self


def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach ("localhost", 127/8, ::1)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


FIELD_TYPES: dict[str, type] = {f.name: type(f.default) if f.default is not dataclasses.MISSING else str
                                for f in fields(Config) if f.name not in NOT_SETTINGS}


def _coerce(name: str, value: Any, source: str) -> Any:
    if name not in FIELD_TYPES:
        raise ConfigError(f"unknown setting {name!r} in {source}")
    want = FIELD_TYPES[name]
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if want is bool:
                low = text.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if want is int:
                return int(text)
            if want is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"setting {name!r} in {source}: {value!r} is not a valid {want.__name__}") from None
    if want is float and type(value) is int:
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"setting {name!r} in {source} must be a {want.__name__}, not {type(value).__name__}")
    return value


def load(config_file: str | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Config:
    """Build a validated Config: defaults < TOML file < TIDINGS_* env < flags.

    Raises ConfigError for unknown keys, bad types and invalid values,
    including every security-section error (fail closed: the broker must
    not start with users, permissions or TLS it did not understand).
    """
    values: dict[str, Any] = {}
    security = Security()
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
        data, sections = split_security(data)
        try:
            security = load_security(sections, base_dir=os.path.dirname(os.path.abspath(config_file)),
                                     source=os.path.abspath(config_file))
        except SecurityConfigError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        for k, v in data.items():
            values[k] = _coerce(k, v, f"config file {config_file}")
    for k, v in (env or {}).items():
        if k.startswith(ENV_PREFIX) and k not in CLIENT_ENV:
            name = k[len(ENV_PREFIX):].lower()
            values[name] = _coerce(name, v, f"environment variable {k}")
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = _coerce(k, v, f"flag --{k.replace('_', '-')}")
    for name in ("data_dir", "backup_dir"):
        if values.get(name):
            values[name] = str(Path(values[name]).expanduser())
    return Config(**values, security=security).validate()
