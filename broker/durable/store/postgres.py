"""PostgresStore: the durable state in a PostgreSQL database, through asyncpg.

    tidings serve --store postgresql://USER@HOST:PORT/DB

The same actor as SqliteStore: callers put write operations in a bounded
mailbox; the actor takes everything pending (up to BATCH_MAX_MESSAGES), runs it
as ONE transaction on its writer connection (group commit; each stage of the
batch is a handful of set-based statements, see pg_sql.py), commits, and only
then calls every covered operation's `on_done`. A transaction that fails
because of some operation's data (a duplicate key) is retried in halves until
the bad operation fails alone; a full disk fails the operations that need space;
anything else (the connection lost, the server gone, a timeout) fails the whole
batch with StorageUnavailable, a retriable StorageError: publishers are refused
with STORAGE_ERROR and resend. A COMMIT whose answer was lost is reported as
failed although it may have committed: never a confirm without a commit (a
resend with its msg_id is then answered as a duplicate).

The database going away: the writer connection is dropped and reconnected by
the next batch, no sooner than a backoff after the last failed attempt
(RECONNECT_MIN..RECONNECT_MAX, doubling), so a dead server costs one connect
attempt per backoff and not one per publish; meanwhile batches fail at once.
Reads go through a small pool (pg_reads.py), which reconnects on its own.

One broker per database: the writer connection holds a session advisory lock
(BROKER_LOCK) for as long as it lives; a second broker on the same database
fails to open. If the connection is lost the lock goes with it and is taken
again on reconnect; if another broker took it meanwhile, writes fail until it
is given back. (Several brokers on one database are issue 13's later items;
docs/SCALING.md says what they need.) The data directory, if given, still holds
the lock file (`tidings.db.lock`, whatever the store) and the local files.

`durability="full"`: synchronous_commit=on (a confirm survives the database
server's power loss, as PostgreSQL is configured to ensure); `"normal"`:
synchronous_commit=off (a confirm survives a broker crash; the database may
lose its last few hundred milliseconds of commits if it crashes itself).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from tidings.broker.durable.store import pg_claims, pg_sql
from tidings.broker.durable.store.base import (
    DURABILITIES,
    DeleteMessages,
    DeleteQueue,
    DeleteStream,
    Durability,
    SchemaTooNew,
    StorageClosed,
    StorageError,
    StorageFull,
    Store,
    StoredMessage,
    PutQueue,
    PutStream,
    WriteOp,
)
from tidings.broker.durable.store.batch import Item, plan
from tidings.broker.durable.store.lockfile import LockFile
from tidings.broker.durable.store.pg_cluster import PgCluster, allocate_offsets
from tidings.broker.durable.store.pg_reads import PgReads, recover_delivery_marks

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

#: The URL schemes that select this store (`store = "postgresql://..."`).
SCHEMES: Final = ("postgresql", "postgres")
#: The lock file in the data directory: the same name as SQLite's, so one data directory
#: serves one broker whichever store it uses.
LOCK_FILENAME: Final = "tidings.db.lock"

#: Mailbox and batch bounds: as SqliteStore's (sqlite.py gives the reasons).
MAILBOX_MAX_MESSAGES: Final = 50_000
MAILBOX_MAX_BYTES: Final = 64 * 1024 * 1024
BATCH_MAX_MESSAGES: Final = 20_000
#: A batch running longer than this is a stall (logged, /readyz fails meanwhile): as SQLite.
STALL_TIMEOUT: Final = 5.0
WATCH_CHECKS_PER_TIMEOUT: Final = 4
#: Connecting (TCP, TLS, login) may take this long before it counts as failed: long
#: enough for a loaded server, short enough that a start against a dead address ends.
CONNECT_TIMEOUT: Final = 10.0
#: A statement that has not answered after this long fails its batch (and the
#: connection is dropped): a server that hangs must not hold the confirms forever.
#: Well above STALL_TIMEOUT, so a slow commit is reported as a stall first.
COMMAND_TIMEOUT: Final = 60.0
#: Reconnect backoff after a failed attempt: first wait, and the most it doubles to.
RECONNECT_MIN: Final = 0.1
RECONNECT_MAX: Final = 5.0
#: Read connections beside the writer: the reads of recovery, paging and admin calls
#: overlap; four keep them from queueing behind each other without loading the server.
READ_POOL_SIZE: Final = 4
#: In cluster mode the pool also carries every shared queue's claims and settlements
#: (pg_claims.py): a few more connections, so a queue's claim does not wait behind
#: another queue's settlement or a long read.
CLUSTER_POOL_SIZE: Final = 8
#: The write operations that change the catalog (queues, bindings, streams): in cluster
#: mode their transaction bumps tidings_meta.catalog_version, which every broker polls.
CATALOG_OPS: Final = (PutQueue, DeleteQueue, PutStream, DeleteStream)
#: pg_try_advisory_lock key held by the broker using the database ("TIDG").
BROKER_LOCK: Final = 0x54494447

_SYNCHRONOUS_COMMIT: Final = {"full": "on", "normal": "off"}


class StorageUnavailable(StorageError):
    """The database cannot be reached (or failed as a whole); nothing of the operation
    was confirmed. Retry: the store reconnects by itself."""

    retriable = True


def is_postgres_url(value: str) -> bool:
    return urllib.parse.urlsplit(value).scheme in SCHEMES


def display_url(url: str) -> str:
    """`postgresql://user@host:port/db`: the URL without its password or query (for logs
    and errors: it never shows the password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        port = parts.port or 5432
    except ValueError:
        return "postgresql://(unparsable URL)"
    user = f"{urllib.parse.unquote(parts.username)}@" if parts.username else ""
    return f"postgresql://{user}{host}:{port}{parts.path or '/'}"


def _asyncpg() -> Any:
    """asyncpg, imported on first use: the default (SQLite) install never needs it."""
    try:
        import asyncpg
    except ImportError as exc:
        raise StorageError("the PostgreSQL store needs asyncpg: pip install 'tidings[postgresql]'") from exc
    return asyncpg


def _op_specific(exc: BaseException) -> bool:
    """Whether `exc` comes from some op's data (a duplicate key, a value PostgreSQL
    refuses or asyncpg cannot encode) rather than from the database or the connection:
    a server error of class 22 (data) or 23 (integrity), asyncpg's client-side
    DataError, or a plain Python error (TypeError, ValueError...) raised while encoding.
    Anything else asyncpg raises (a lost connection, a protocol state it cannot leave)
    and every OS-level error is about the connection."""
    asyncpg = _asyncpg()
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state[:2] in ("22", "23")
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return True
    if type(exc).__module__.startswith("asyncpg"):
        return False
    return not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError))


class PostgresStore(PgReads, PgCluster):
    """The durable store in a PostgreSQL database. Lifecycle as SqliteStore:

        store = PostgresStore("postgresql://tidings@db:5432/tidings", data_dir=...)
        await store.open()                  # connect, lock, migrate; reads work from here
        await tg.start(store.run)           # the actor: writes commit from here
        ...
        await store.close()                 # commits what is pending, then disconnects

    The password comes from the URL, PGPASSWORD or ~/.pgpass (asyncpg reads them); it
    never appears in a log line or an error. Metrics and watchdog as SqliteStore's.
    """

    def __init__(self, url: str, durability: Durability = "full", *, data_dir: str | os.PathLike[str] | None = None,
                 mailbox_max_messages: int = MAILBOX_MAX_MESSAGES,
                 mailbox_max_bytes: int = MAILBOX_MAX_BYTES,
                 batch_max_messages: int = BATCH_MAX_MESSAGES,
                 stall_timeout: float = STALL_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT,
                 cluster: bool = False) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if not is_postgres_url(url):
            raise ValueError(f"not a postgresql:// URL: {display_url(url)}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be positive, not {stall_timeout!r}")
        self.url = url
        self.path = display_url(url)
        self.durability: Durability = durability
        self.mailbox_max_messages = mailbox_max_messages
        self.mailbox_max_bytes = mailbox_max_bytes
        self.batch_max_messages = batch_max_messages
        self.stall_timeout = stall_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        # Several brokers share the database (docs/SCALING.md): no exclusive broker lock.
        self.cluster = cluster
        self._password = urllib.parse.urlsplit(url).password
        self._lockfile = LockFile(os.path.join(os.fspath(data_dir), LOCK_FILENAME)) if data_dir is not None else None
        self._writer: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._opened = False
        self._retry_at = 0.0  # monotonic time before which no reconnect is tried
        self._backoff = RECONNECT_MIN
        self._down_reason = ""  # why the last connect or batch failed as a whole
        self._mailbox: deque[Item] = deque()
        self._pending_messages = 0
        self._pending_bytes = 0
        self._wakeup = anyio.Event()
        self._space: anyio.Event | None = None
        self._stopped = anyio.Event()
        self._running = False
        self._idle = False
        self._closing = False
        self._max_id = 0
        self._actor_task: asyncio.Task[Any] | None = None
        self.inflight_ops = 0
        self.inflight_messages = 0
        self.inflight_bytes = 0
        self._batch_started: float | None = None
        self._batch_serial = 0
        self._reported_serial = 0
        self.transaction_phase = "idle"
        self.commits = 0
        self.committed_ops = 0
        self.committed_messages = 0
        self.failed_ops = 0
        self.failed_transactions = 0
        self.last_commit_seconds = 0.0
        self.commit_seconds_total = 0.0
        self.last_batch_ops = 0
        self.last_batch_messages = 0
        self.stalls = 0
        self.reconnects = 0  # writer connections made after the first
        self.on_commit: Callable[[float, int], None] | None = None

    # --- errors and connections -------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """`text` without the URL's password (as written, or percent-decoded)."""
        if self._password:
            for secret in {self._password, urllib.parse.unquote(self._password)}:
                if secret:
                    text = text.replace(secret, "***")
        return text

    def _translate(self, exc: BaseException) -> StorageError:
        """An asyncpg/OS error as a StorageError (StorageFull for a full disk,
        StorageUnavailable for a lost or refused connection), chained to it."""
        asyncpg = _asyncpg()
        reason = self._scrub(str(exc) or type(exc).__name__)
        err: StorageError
        if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) == "53100":
            err = StorageFull(f"storage full: {reason}")
        elif _op_specific(exc):
            err = StorageError(f"storage error: {reason}")
        else:
            err = StorageUnavailable(f"database {self.path} unavailable: {reason}")
        err.__cause__ = exc
        return err

    async def _connect(self) -> asyncpg.Connection:
        """A new connection with the store's session settings. Raises StorageUnavailable."""
        asyncpg = _asyncpg()
        try:
            return await asyncpg.connect(
                self.url, timeout=self.connect_timeout, command_timeout=self.command_timeout,
                server_settings={"application_name": "tidings",
                                 "synchronous_commit": _SYNCHRONOUS_COMMIT[self.durability]})
        except Exception as exc:
            raise StorageUnavailable(
                f"cannot connect to {self.path}: {self._scrub(str(exc) or type(exc).__name__)}") from exc

    async def _lock(self, conn: asyncpg.Connection) -> None:
        """Take the broker lock on `conn` (held until it closes). Raises StorageError.
        In a cluster the brokers share the database: nothing to take."""
        if self.cluster:
            return
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", BROKER_LOCK):
            raise StorageError(
                f"{self.path} is in use by another tidings broker (it holds the broker lock); "
                "several brokers on one database are not supported yet (docs/SCALING.md)")

    async def _writer_conn(self) -> asyncpg.Connection:
        """The actor's connection, reconnected (and re-locked) if it was lost, no sooner
        than the backoff allows. Raises StorageUnavailable or StorageError."""
        conn = self._writer
        if conn is not None and not conn.is_closed():
            return conn
        self._writer = None
        now = time.monotonic()
        if now < self._retry_at:
            raise StorageUnavailable(f"database {self.path} unavailable ({self._down_reason}); "
                                     f"reconnecting in {self._retry_at - now:.1f} s")
        self.transaction_phase = "connect"
        try:
            conn = await self._connect()
            try:
                await self._lock(conn)
            except BaseException:
                conn.terminate()
                raise
        except StorageError as exc:
            self._down(str(exc))
            raise
        except Exception as exc:
            err = self._translate(exc)
            self._down(str(err))
            raise err from exc
        self.reconnects += 1
        self._backoff = RECONNECT_MIN
        self._down_reason = ""
        self._writer = conn
        log.warning("store %s: reconnected to the database", self.path)
        return conn

    def _down(self, reason: str) -> None:
        if not self._down_reason or self._backoff == RECONNECT_MIN:
            log.error("store %s: %s; durable writes fail (retriable) until it is back", self.path, reason)
        self._down_reason = reason
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(RECONNECT_MAX, self._backoff * 2)

    def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # --- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Connect, take the broker lock (and the data directory's lock file), create or
        migrate the schema, load the id high-water mark and open the read pool.
        Raises StorageError ("cannot connect to postgresql://user@host:port/db: why"),
        SchemaTooNew if a newer tidings wrote the database."""
        if self._opened or self._closing:
            raise StorageError("open() may be called once per PostgresStore")
        asyncpg = _asyncpg()
        if self._lockfile is not None:
            self._lockfile.acquire()
        conn = pool = None
        try:
            conn = await self._connect()
            await self._lock(conn)
            await migrate(conn, self.path)
            # Fresh planner statistics: a backlog that grew since the last autovacuum must not
            # look like an empty queue (acks would then scan it instead of using the key).
            try:
                await conn.execute(f"ANALYZE {', '.join(pg_sql.ANALYZED)}")
            except asyncpg.PostgresError as exc:  # not the tables' owner: autovacuum's statistics serve
                log.warning("store %s: ANALYZE at open failed (%s); planning with older statistics",
                            self.path, exc)
            recovered = await recover_delivery_marks(conn)  # delivery counts (store.base.MarkDelivered)
            if recovered:
                log.info("store %s: %d messages delivered before the restart count one delivery",
                         self.path, recovered)
            self._max_id = int(await conn.fetchval("SELECT value FROM tidings_meta WHERE key = 'max_message_id'"))
            try:
                pool = await asyncpg.create_pool(
                    self.url, min_size=1, max_size=CLUSTER_POOL_SIZE if self.cluster else READ_POOL_SIZE,
                    timeout=self.connect_timeout, command_timeout=self.command_timeout,
                    # in cluster mode claims and acks commit here too: at the store's durability
                    server_settings={"application_name": "tidings-read",
                                     "synchronous_commit": _SYNCHRONOUS_COMMIT[self.durability]})
            except Exception as exc:
                raise StorageUnavailable(
                    f"cannot connect to {self.path}: {self._scrub(str(exc) or type(exc).__name__)}") from exc
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if pool is not None:
                    pool.terminate()
                if conn is not None:
                    conn.terminate()
            if self._lockfile is not None:
                self._lockfile.release()
            if isinstance(exc, Exception) and not isinstance(exc, StorageError):
                raise self._translate(exc) from exc
            raise
        self._writer, self._pool, self._opened = conn, pool, True
        log.info("store %s open (durability=%s, max message id %d)", self.path, self.durability, self._max_id)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The storage actor (as SqliteStore.run)."""
        if not self._opened or self._pool is None:
            raise StorageClosed("open() the store before running it")
        if self._running:
            raise RuntimeError("the store actor is already running")
        self._running = True
        self._stopped = anyio.Event()
        try:
            self._actor_task = asyncio.current_task()
        except RuntimeError:
            self._actor_task = None
        task_status.started()
        try:
            while True:
                if not self._mailbox:
                    if self._closing:
                        return
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    self._wakeup = anyio.Event()
                    continue
                with anyio.CancelScope(shield=True):
                    await self._commit_next()
                await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._running = False
            self._stopped.set()

    async def close(self) -> None:
        """Refuse new work, commit (or fail) everything already submitted, disconnect.
        Idempotent and shielded from cancellation."""
        if not self._opened or self._pool is None:
            return
        self._closing = True
        self._wakeup.set()
        if self._space is not None:
            self._space.set()
        with anyio.CancelScope(shield=True):
            if self._running:
                await self._stopped.wait()
            self._retry_at = 0.0  # one last attempt to reach the database for what is left
            while self._mailbox:
                await self._commit_next()
            pool, self._pool = self._pool, None
            writer, self._writer = self._writer, None
            if writer is not None and not writer.is_closed():
                try:
                    with anyio.fail_after(self.connect_timeout):
                        await writer.close()
                except Exception:
                    writer.terminate()
            try:
                with anyio.fail_after(self.connect_timeout):
                    await pool.close()
            except Exception:
                pool.terminate()
            if self._lockfile is not None:
                self._lockfile.release()
        log.info("store %s closed", self.path)

    async def max_message_id(self) -> int:
        if self._pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        return self._max_id

    # --- several brokers (cluster mode, pg_claims.py) ------------------------------

    async def _on_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        pool = self._pool
        if pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        try:
            async with pool.acquire() as conn:
                return await fn(conn, *args)
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    async def allocate_ids(self, n: int) -> int:
        """Reserve ``n`` message ids for this broker: returns the last of the block
        (last - n, last]; no other broker (nor a restart) gets them. Raises StorageError."""
        return int(await self._on_pool(lambda c: c.fetchval(pg_claims.ALLOCATE_IDS, n)))

    async def catalog_version(self) -> int:
        """The catalog version (bumped by every queue/stream declare, update, delete)."""
        return int(await self._on_pool(lambda c: c.fetchval(pg_claims.CATALOG_VERSION)) or 0)

    async def claim(self, queue: str, n: int, deadline_ms: int, broker: str) -> list[StoredMessage]:
        """Claim up to ``n`` due messages of ``queue`` for ``broker`` until the database's
        now + ``deadline_ms`` (pg_claims.CLAIM); their ``deliveries`` is the fence of
        every later change. Raises StorageError."""
        return list(await self._on_pool(pg_claims.claim, queue, n, deadline_ms, broker))

    async def settle_claims(self, queue: str, broker: str, deletes: list[tuple[int, int]],
                            releases: list[tuple[int, int, int, int, str | None]],
                            extends: list[tuple[int, int]], extend_ms: int) -> set[int]:
        """Fenced acks, releases and extensions in one transaction (pg_claims.settle);
        returns the ids whose extension found the claim lost. Raises StorageError."""
        return set(await self._on_pool(pg_claims.settle, queue, broker, deletes, releases, extends, extend_ms))

    async def backup(self, path: str) -> None:
        """Not done by the broker on PostgreSQL: the database is backed up by its own
        tools (pg_dump, pg_basebackup, continuous archiving). Raises StorageError."""
        if self._pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        raise StorageError(f"the store is the PostgreSQL database {self.path}: back it up with pg_dump "
                           "(or pg_basebackup / WAL archiving), not with the broker's backup call")

    # --- the mailbox (as SqliteStore's) ----------------------------------------------

    @property
    def is_open(self) -> bool:
        """Open, not closing, and the database reachable as far as the last attempt
        knows (readiness fails while it is away; the watchdog probes it meanwhile)."""
        return self._pool is not None and not self._closing and not self._down_reason

    @property
    def pending_ops(self) -> int:
        return len(self._mailbox)

    @property
    def pending_messages(self) -> int:
        return self._pending_messages

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _full(self) -> bool:
        return (self._pending_messages >= self.mailbox_max_messages
                or self._pending_bytes >= self.mailbox_max_bytes)

    def submit_nowait(self, op: WriteOp) -> None:
        if self._closing or self._pool is None:
            raise StorageClosed(f"store {self.path} is closed")
        if self._full():
            raise anyio.WouldBlock
        self._enqueue(pg_sql.prepare(op))

    async def submit(self, op: WriteOp) -> None:
        it = pg_sql.prepare(op)
        while True:
            if self._closing or self._pool is None:
                raise StorageClosed(f"store {self.path} is closed")
            if not self._full():
                self._enqueue(it)
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def wait_for_space(self) -> None:
        while True:
            if self._closing or self._pool is None:
                raise StorageClosed(f"store {self.path} is closed")
            if not self._full():
                return
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    async def write(self, op: WriteOp) -> None:
        done = anyio.Event()
        outcome: list[Exception | None] = []
        chained = op.on_done

        def on_done(error: Exception | None) -> None:
            outcome.append(error)
            done.set()
            if chained is not None:
                chained(error)

        op.on_done = on_done
        await self.submit(op)
        await done.wait()
        error = outcome[0]
        if error is not None:
            raise type(error)(*error.args) from error.__cause__

    def _enqueue(self, it: Item) -> None:
        self._mailbox.append(it)
        self._pending_messages += it.messages
        self._pending_bytes += it.nbytes
        if self._idle:
            self._idle = False
            self._wakeup.set()

    def _take_batch(self) -> list[Item]:
        mailbox, cap = self._mailbox, self.batch_max_messages
        batch: list[Item] = []
        n = nbytes = 0
        while mailbox and (n == 0 or n + mailbox[0].messages <= cap):
            it = mailbox.popleft()
            batch.append(it)
            n += it.messages
            nbytes += it.nbytes
        self._pending_messages -= n
        self._pending_bytes -= nbytes
        self.inflight_ops, self.inflight_messages, self.inflight_bytes = len(batch), n, nbytes
        self._batch_serial += 1
        self._batch_started = time.monotonic()
        if self._space is not None and not self._full():
            self._space.set()
            self._space = None
        return batch

    async def _commit_next(self) -> None:
        batch = self._take_batch()
        try:
            await self._execute(batch)
        finally:
            if self._reported_serial == self._batch_serial:
                log.warning("store: the stalled batch (%d ops) ended after %.1f s", len(batch),
                            self.transaction_seconds)
            self.inflight_ops = self.inflight_messages = self.inflight_bytes = 0
            self._batch_started = None
            self.transaction_phase = "idle"

    # --- the watchdog -----------------------------------------------------------

    @property
    def transaction_seconds(self) -> float:
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def stalled(self) -> bool:
        return self.transaction_seconds > self.stall_timeout

    async def watchdog(self) -> None:
        """Report each stalled batch once (as SqliteStore's), and probe a database that
        is away when no write would (see is_open). Runs until cancelled."""
        interval = min(1.0, self.stall_timeout / WATCH_CHECKS_PER_TIMEOUT)
        while True:
            await anyio.sleep(interval)
            if (self._down_reason and self._running and not self._mailbox and self._batch_started is None
                    and time.monotonic() >= self._retry_at):
                # Nothing to write, but the database is known away: an empty operation makes
                # the actor try to reconnect, so readiness comes back without traffic.
                try:
                    self.submit_nowait(DeleteMessages("", []))
                except (StorageError, anyio.WouldBlock):
                    pass
            serial = self._batch_serial
            if self.stalled and self._reported_serial != serial:
                self._reported_serial = serial
                self.stalls += 1
                log.error("store: a transaction has run %.1f s (stall_timeout %.1f s), phase %s, "
                          "%d ops / %d messages / %d bytes in flight, %d ops pending; "
                          "the broker is not ready until it ends\n%s",
                          self.transaction_seconds, self.stall_timeout, self.transaction_phase,
                          self.inflight_ops, self.inflight_messages, self.inflight_bytes,
                          self.pending_ops, self.stack_report())

    def stack_report(self) -> str:
        """The storage actor's stack (where the transaction waits on the database)."""
        out = io.StringIO()
        task = self._actor_task
        if task is None:
            out.write("storage actor task: unknown\n")
        else:
            out.write(f"storage actor task {task!r}:\n")
            task.print_stack(file=out)
        return out.getvalue()

    # --- the transaction --------------------------------------------------------

    async def _execute(self, items: list[Item]) -> None:
        """Commit `items`, or fail them (as SqliteStore._execute: a group that failed
        because of some op's data is retried in halves; a full disk fails the ops that
        need space; the database failing as a whole fails them all)."""
        error = await self._transaction(items)
        if error is None:
            self._resolve(items, None)
            return
        if len(items) == 1:
            self.failed_ops += 1
            self._resolve(items, error)
            return
        if isinstance(error, StorageFull):
            growing = [it for it in items if it.grows]
            if growing and len(growing) < len(items):
                self.failed_ops += len(growing)
                self._resolve(growing, error)
                await self._execute([it for it in items if not it.grows])
                return
            self.failed_ops += len(items)
            self._resolve(items, error)
            return
        cause = error.__cause__
        if isinstance(error, StorageUnavailable) or cause is None or not _op_specific(cause):
            # The database failing (or refusing) as a whole fails every op alike.
            self.failed_ops += len(items)
            self._resolve(items, error)
            return
        mid = len(items) // 2
        await self._execute(items[:mid])
        await self._execute(items[mid:])

    async def _transaction(self, items: list[Item]) -> StorageError | None:
        """Run `items` as one transaction. None once committed, else the error
        (after a rollback, or with the connection dropped)."""
        started = time.perf_counter()
        try:
            conn = await self._writer_conn()
        except StorageError as exc:
            self.failed_transactions += 1
            return exc
        try:
            self.transaction_phase = "BEGIN"
            await conn.execute("BEGIN")
            self.transaction_phase = "write"
            if self.cluster:  # stream offsets come from the partitions' counter rows (pg_cluster.py)
                await allocate_offsets(conn, items)
            # cluster: de-dup entries are inserted, not upserted (one broker stores a msg_id)
            now_ms = int(time.time() * 1000) if self.cluster else None
            for stage in plan(items):
                await pg_sql.execute_stage(conn, stage, now_ms=now_ms)
            max_id = max(it.max_id for it in items)
            if self.cluster:
                # ids come from blocks already counted in max_message_id (allocate_ids)
                if any(isinstance(it.op, CATALOG_OPS) for it in items):
                    await conn.execute(pg_claims.BUMP_CATALOG)
            elif max_id > self._max_id:
                await conn.execute(pg_sql.RAISE_MAX_ID, max_id)
            self.transaction_phase = "COMMIT"
            await conn.execute("COMMIT")
        except Exception as exc:
            self.failed_transactions += 1
            err = self._translate(exc)
            if isinstance(err, StorageUnavailable):
                self._drop_writer()  # a connection in an unknown state is not reused
                self._down(str(err))
            elif not isinstance(exc, _asyncpg().PostgresError):
                # Refused by the client (an op's value it could not encode), perhaps in the
                # middle of a COPY: the next batch starts on a fresh connection, at once.
                self._drop_writer()
            else:
                await self._rollback(conn)
            log.debug("transaction of %d ops failed: %s", len(items), err)
            return err
        self._down_reason = ""
        self._max_id = max(self._max_id, max_id)
        self.last_commit_seconds = time.perf_counter() - started
        self.commit_seconds_total += self.last_commit_seconds
        self.last_batch_ops = len(items)
        self.last_batch_messages = sum(it.messages for it in items)
        self.commits += 1
        self.committed_ops += len(items)
        self.committed_messages += self.last_batch_messages
        if self.on_commit is not None:
            self.on_commit(self.last_commit_seconds, self.last_batch_messages)
        return None

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or not conn.is_in_transaction():
            return
        self.transaction_phase = "ROLLBACK"
        try:
            await conn.execute("ROLLBACK")
        except Exception:
            log.exception("store rollback failed; the connection is dropped")
            self._drop_writer()

    @staticmethod
    def _resolve(items: list[Item], error: StorageError | None) -> None:
        for it in items:
            cb = it.op.on_done
            if cb is None:
                continue
            try:
                cb(error)
            except Exception:  # actor boundary: a faulty callback must not stop the store
                log.exception("store on_done callback raised (op %s)", type(it.op).__name__)


async def migrate(conn: asyncpg.Connection, where: str, steps: tuple[str, ...] | None = None) -> int:
    """Bring the schema to `len(steps)` (default: pg_sql.MIGRATIONS), one step per
    transaction with its version bump, under an advisory lock so that brokers starting
    together migrate one after the other. Returns the version.

    Raises SchemaTooNew if the database is newer, StorageError if it holds tidings tables
    but no version (not made by tidings) or a step fails (the failed step leaves no trace)."""
    if steps is None:
        steps = pg_sql.MIGRATIONS
    target = len(steps)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", pg_sql.MIGRATION_LOCK)
        version = await _version(conn, where)
    if version > target:
        raise SchemaTooNew(
            f"{where} has schema version {version}, but this tidings understands versions up to {target}; "
            "it was written by a newer tidings. Refusing to use it: upgrade tidings.")
    for v in range(version, target):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", pg_sql.MIGRATION_LOCK)
            if await _version(conn, where) != v:  # another broker migrated meanwhile
                continue
            log.info("migrating %s from schema version %d to %d", where, v, v + 1)
            await conn.execute(steps[v])
            await conn.execute("UPDATE tidings_meta SET value = $1 WHERE key = 'schema_version'", v + 1)
    return target


async def _version(conn: asyncpg.Connection, where: str) -> int:
    if await conn.fetchval("SELECT to_regclass('tidings_meta') IS NULL"):
        present = await conn.fetch("SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                   " WHERE n.nspname = ANY(current_schemas(false)) AND relname = ANY($1::text[])",
                                   list(pg_sql.TABLES))
        if present:
            raise StorageError(f"{where} has tidings tables ({', '.join(sorted(r[0] for r in present))}) but no "
                               "tidings_meta: not a database tidings made; refusing to touch it")
        return 0
    value = await conn.fetchval("SELECT value FROM tidings_meta WHERE key = 'schema_version'")
    return int(value or 0)


if TYPE_CHECKING:
    _: type[Store] = PostgresStore  # mypy checks that PostgresStore meets the whole contract
