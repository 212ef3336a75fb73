"""The audit log: one JSON line per security event, never a secret or a payload.

Events (field ``event``) and their fields besides ``ts``, ``user``, ``peer``:

* ``auth_ok``           method ("password", "token" or "certificate"), connection
* ``auth_failed``       method, reason (unknown_user, bad_password, bad_token, malformed,
                        cert_user_mismatch, cert_ambiguous, ...)
* ``auth_throttled``    retry_after (seconds)
* ``permission_denied`` action, name
* ``admin``             method, target, outcome ("ok" or an error code name): every CALL
                        except those reading only counters and settings (broker/net/dispatch.py
                        UNAUDITED_CALLS), so dlq.list and backup too; and ``group.join``
                        (a stream CONSUME with a group; target "stream/group")
* ``limit_refused``     limit (e.g. "max_connections", "user.max_connections"), details
* ``suppressed``        of (the event), the key fields, suppressed (count), and what the
                        suppressed lines would have said: ``peers`` and (where the event
                        has them) ``names``/``reasons``, each a list of [value, count]
                        pairs (at most ``MAX_DISTINCT``, first seen first), with
                        ``others`` counting per field the lines whose value was not kept
* ``audit_dropped``     dropped (lines lost because the writer queue was full)

``ts`` is UTC wall time (``2024-05-01T12:00:00.123Z``); ``user`` is "" for
no-users mode or before login (for ``auth_failed`` it is the claimed name,
cut to 64 characters); ``peer`` is "host:port". Strings are cut to 256
characters and JSON-escaped, and every character some reader takes for a
line break is written as a ``\\uXXXX`` escape (``\\n``, ``\\r``, ``\\x0b``,
``\\x0c``, ``\\x1c``-``\\x1e``, U+0085, U+2028, U+2029: Python's
``str.splitlines()`` splits on all of them), so a hostile name cannot forge
or split a line. Keys
that name secrets (password, token, auth, payload, ...) are redacted and
bytes are logged only as their length, whatever a caller passes.

Flood control: the noisy events (denials, auth failures, throttled and
limit refusals) are limited to ``limit`` lines per key per ``window``
seconds; the key is (event, user, action or limit). What a window
suppressed is reported in one ``suppressed`` line (its count, and the
distinct peer addresses, names and reasons of the suppressed lines with a
count each) when the key is next seen
after the window or when :meth:`AuditLog.flush` runs (every window, from
:meth:`AuditLog.run_flusher`). At most ``max_keys`` keys are tracked.

Where lines go: :class:`AuditFile` appends them to a file (mode 0600, e.g.
``<data_dir>/audit.log``) from a writer thread fed by a bounded queue, so
the event loop never waits for the disk. Each batch the thread takes is
written and flushed to the OS (not fsynced: a power loss can lose the last
lines). If the queue is full a line is dropped and counted, and the count
is written as an ``audit_dropped`` line. :func:`logger_sink` sends lines
to the ``tidings.audit`` logger instead (for deployments that ship logs).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Final

import anyio
from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

LOGGER_NAME: Final = "tidings.audit"
LIMIT: Final = 5  # lines per key per window: enough to see a pattern, not enough to flood the disk
WINDOW: Final = 1.0  # seconds
MAX_KEYS: Final = 10_000  # rate-limit keys tracked at once: bounds memory under a spray of user names
MAX_QUEUE: Final = 10_000  # lines waiting for the writer thread (~2 MB); beyond it lines are dropped, counted
MAX_BATCH: Final = 1_000  # lines per write() by the writer thread
MAX_FIELD: Final = 256  # characters kept of any string field
# Distinct values (peers, names, reasons) one summary keeps per field, each with its count; the rest are
# only counted ("others"): enough to see who was behind a flood, bounded under a spray of names.
MAX_DISTINCT: Final = 32
SUMMARY_FIELDS: Final = (("peer", "peers"), ("name", "names"), ("reason", "reasons"))
RATE_LIMITED: Final = frozenset({"permission_denied", "auth_failed", "auth_throttled", "limit_refused"})
SECRET_KEYS: Final = frozenset({"password", "token", "tokens", "auth", "secret", "credentials", "payload",
                                "password_hash", "key"})
REDACTED: Final = "[redacted]"
# JSON leaves these raw inside strings (ensure_ascii=False), yet splitlines() and some log shippers end a
# line at each of them; the C0 separators (\n \r \x0b \x0c \x1c-\x1e) json.dumps escapes itself.
_LINE_BREAKS: Final = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def escape_line(line: str) -> str:
    """``line`` (one JSON document) with every line separator JSON-escaped:
    afterwards ``line.splitlines()`` is ``[line]``."""
    return line.translate(_LINE_BREAKS)


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_FIELD]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k)[:MAX_FIELD]: REDACTED if str(k).lower() in SECRET_KEYS else _clean(v)
                for k, v in list(value.items())[:32]}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value[:32]]
    return str(value)[:MAX_FIELD]


class _Window:
    __slots__ = ("start", "count", "suppressed", "fields", "seen", "others")

    def __init__(self, start: float, fields: dict[str, Any]) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.fields = fields
        self.seen: dict[str, dict[str, int]] = {}  # summary field -> value -> suppressed lines with it
        self.others: dict[str, int] = {}  # summary field -> suppressed lines whose value was not kept

    def suppress(self, peer: str, details: dict[str, Any]) -> None:
        self.suppressed += 1
        for src, dst in SUMMARY_FIELDS:
            value = peer if src == "peer" else details.get(src)
            if value is None:
                continue
            value = str(value)[:MAX_FIELD]
            counts = self.seen.setdefault(dst, {})
            if value in counts:
                counts[value] += 1
            elif len(counts) < MAX_DISTINCT:
                counts[value] = 1
            else:
                self.others[dst] = self.others.get(dst, 0) + 1


class AuditLog:
    """Formats audit events and hands each line to ``sink`` (never blocks
    if the sink does not). Owned by the event loop thread.

    ``clock``: monotonic seconds for the rate-limit windows; ``wall``:
    epoch seconds for ``ts``. Both injectable for tests.
    """

    def __init__(self, sink: Callable[[str], object], *, limit: int = LIMIT, window: float = WINDOW,
                 max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self.wall = wall
        self._windows: dict[tuple[str, ...], _Window] = {}  # insertion order = window start order

    # ------------------------------------------------------------ events

    def auth_ok(self, user: str, peer: str, method: str, connection: int | None = None) -> None:
        self.event("auth_ok", user, peer, method=method, connection=connection)

    def auth_failed(self, user: str | None, peer: str, method: str, reason: str) -> None:
        self.event("auth_failed", (user or "")[:64], peer, method=method, reason=reason)

    def auth_throttled(self, peer: str, retry_after: float) -> None:
        self.event("auth_throttled", "", peer, retry_after=round(retry_after, 3))

    def permission_denied(self, user: str, peer: str, action: str, name: str) -> None:
        self.event("permission_denied", user, peer, action=action, name=name)

    def admin(self, user: str, peer: str, method: str, target: str | None, outcome: str = "ok") -> None:
        self.event("admin", user, peer, method=method, target=target, outcome=outcome)

    def limit_refused(self, user: str, peer: str, limit: str, **details: Any) -> None:
        self.event("limit_refused", user, peer, limit=limit, **details)

    def event(self, event: str, user: str, peer: str, **details: Any) -> None:
        """Write one event line (subject to flood control for RATE_LIMITED events)."""
        if event in RATE_LIMITED:
            key = (event, user, str(details.get("action") or details.get("limit") or ""))
            if not self._admit(key, event, user, peer, details):
                return
        self._write(event, user, peer, details)

    def _write(self, event: str, user: str, peer: str, details: dict[str, Any]) -> None:
        doc: dict[str, Any] = {"ts": _ts(self.wall()), "event": event,
                               "user": _clean(user), "peer": _clean(peer)}
        for k, v in details.items():
            doc[k] = REDACTED if k.lower() in SECRET_KEYS else _clean(v)
        self.sink(escape_line(json.dumps(doc, ensure_ascii=False)))

    # ----------------------------------------------------- flood control

    def _admit(self, key: tuple[str, ...], event: str, user: str, peer: str, details: dict[str, Any]) -> bool:
        now = self.clock()
        w = self._windows.get(key)
        if w is not None and now - w.start >= self.window:
            del self._windows[key]
            self._summarise(w, key)
            w = None
        if w is None:
            if len(self._windows) >= self.max_keys:
                self.flush()
                while len(self._windows) >= self.max_keys:
                    old_key = next(iter(self._windows))
                    self._summarise(self._windows.pop(old_key), old_key)
            fields: dict[str, Any] = {"user": user}
            for f in ("action", "limit"):
                if f in details:
                    fields[f] = details[f]
            w = self._windows[key] = _Window(now, fields)
        if w.count < self.limit:
            w.count += 1
            return True
        w.suppress(peer, details)
        return False

    def _summarise(self, w: _Window, key: tuple[str, ...]) -> None:
        if w.suppressed:
            fields = dict(w.fields)
            user = fields.pop("user")
            summary: dict[str, Any] = {"of": key[0], **fields, "suppressed": w.suppressed,
                                       "window_s": self.window}
            for name, counts in w.seen.items():
                summary[name] = [[v, n] for v, n in counts.items()]  # pairs: a value is never taken for a key
            if w.others:
                summary["others"] = dict(w.others)
            self._write("suppressed", user, "", summary)

    def flush(self) -> int:
        """Close every ended window, writing its ``suppressed`` line if it
        suppressed anything; return how many lines that wrote."""
        now = self.clock()
        written = 0
        while self._windows:
            key, w = next(iter(self._windows.items()))
            if now - w.start < self.window:
                break  # windows are in start order: the rest are younger
            del self._windows[key]
            if w.suppressed:
                written += 1
            self._summarise(w, key)
        return written

    async def run_flusher(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Call :meth:`flush` every window until cancelled (start it in the root task group)."""
        task_status.started()
        while True:
            await anyio.sleep(self.window)
            self.flush()


# ------------------------------------------------------------------ sinks

_STOP: Final = object()


class AuditFile:
    """Appends lines to ``path`` from a daemon writer thread.

    The constructor opens (creating with mode 0600) the file and starts the
    thread; OSError if the file cannot be opened. :meth:`write` never
    blocks. :meth:`close` (or ``await aclose()`` from the loop) writes what
    is queued and stops the thread.
    """

    def __init__(self, path: str, *, max_queue: int = MAX_QUEUE) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8", opener=lambda p, flags: os.open(p, flags, 0o600))
        self._q: queue.Queue[object] = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._dropped = 0
        self.dropped_total = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tidings-audit", daemon=True)
        self._thread.start()

    def write(self, line: str) -> bool:
        """Queue one line; False if it was dropped (queue full or closed)."""
        if not self._closed:
            try:
                self._q.put_nowait(line)
                return True
            except queue.Full:
                pass
        with self._lock:
            self._dropped += 1
            self.dropped_total += 1
        return False

    __call__ = write

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._q.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            lines = [x for x in batch if x is not _STOP]
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(json.dumps({"ts": _ts(time.time()), "event": "audit_dropped",
                                         "user": "", "peer": "", "dropped": dropped}))
            if lines:
                try:
                    self._fh.write("\n".join(lines) + "\n")  # type: ignore[arg-type]
                    self._fh.flush()
                except OSError as exc:
                    log.error("audit log %s: write failed, %d lines lost: %s", self.path, len(lines), exc)
        self._fh.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking lines, write the queued ones, stop the thread (blocking, up to ``timeout``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("audit log %s: writer stuck, not all lines written", self.path)
            return
        self._thread.join(timeout)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> AuditFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def logger_sink(logger: logging.Logger | None = None) -> Callable[[str], None]:
    """A sink that logs each line at INFO on ``tidings.audit`` (its handlers decide where it goes)."""
    lg = logger if logger is not None else logging.getLogger(LOGGER_NAME)

    def sink(line: str) -> None:
        lg.info("%s", line)

    return sink
