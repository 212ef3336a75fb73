"""Prometheus metrics and the readiness check, served on the HTTP port (broker/http/ops.py).

    metrics = install_hooks(broker)      # histograms fed by the store and the publish path
    body, content_type = await metrics.render(accept)
    readiness(broker)                    # {"ready": ..., "listener": ..., "storage": ...}

Endpoints (broker/http/ops.py; GET or HEAD):

- ``/metrics``: every metric in the Prometheus text format (or OpenMetrics,
  if the scraper asks for it in ``Accept``). Names start with ``tidings_``;
  docs/OPERATIONS.md lists them.
- ``/healthz``: liveness, 200 whenever the event loop answers at all.
- ``/readyz``: readiness, 200 once storage is open and recovered and the
  client listener is bound, 503 before that, from the start of shutdown, and
  while a storage transaction runs past ``store_stall_timeout``.

How the numbers are gathered, and what they cost: almost everything is
read from the broker's own counters at scrape time (``BrokerCollector``),
so serving messages costs nothing extra. The three histograms are fed per
*batch*, never per message: the storage actor observes commit time and
batch size once per transaction (``SqliteStore.on_commit``), and the
publish path observes admission-to-confirm latency once per committed
publish batch (``Admission.on_confirm_latency``). A scrape copies the numbers
it needs on the event loop with no await in between (one consistent
instant, and no actor's state is read from another thread: ~0.5 ms per
1,000 queues); building the metric families and the text, which costs
~20x more, happens in a worker thread, so a broker with many queues does
not stall the loop while it is scraped.

The exposition format and histogram semantics come from prometheus-client
rather than being written by hand: escaping, ``_bucket``/``_sum``/``_count``
with cumulative ``le`` buckets, ``+Inf``, OpenMetrics negotiation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

import anyio
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from tidings.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from tidings.broker.ops.view import BrokerView

CONFIRM_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                         1.0, 2.5)
BATCH_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000)

#: Per-queue gauges: (metric suffix, help). Values come from _queue_row, in this order.
_QUEUE_GAUGES: Final = (
    ("depth", "Messages stored in the queue (ready, delayed and in flight)."),
    ("in_flight", "Messages delivered and not yet acked, nacked or rejected."),
    ("consumers", "Consumers attached to the queue."),
    ("memory_messages", "Messages of the queue's backlog held in memory."),
)
#: Per-queue counters: QueueActor attribute = metric suffix (+ _total), help.
_QUEUE_COUNTERS: Final = (
    ("published", "Messages committed into the queue (publishes, dead-letter moves, redrives)."),
    ("delivered", "Deliveries to consumers, redeliveries included."),
    ("redelivered", "Deliveries of a message that had been delivered before."),
    ("acked", "Messages acked."),
    ("nacked", "Messages nacked (returned for a retry)."),
    ("rejected", "Messages rejected by a consumer (sent to the dead-letter queue)."),
    ("dead_lettered", "Messages moved from the queue to its dead-letter queue, for any reason."),
    ("expired", "Messages whose time to live ran out in the queue."),
    ("store_failures", "Store writes changing the queue's messages (acks, nacks, moves) that failed;"
                       " the messages were restored and are delivered again."),
)
_queue_counters = attrgetter(*(name for name, _ in _QUEUE_COUNTERS))
_STORE_COUNTERS: Final = (
    ("commits", "Storage transactions committed."),
    ("committed_ops", "Write operations committed (a publish batch, an ack batch, ...)."),
    ("committed_messages", "Messages written by committed transactions."),
    ("failed_transactions", "Storage transactions rolled back."),
    ("failed_ops", "Write operations that failed (their publishers got an error)."),
    ("stalls", "Storage transactions that ran longer than store_stall_timeout (each logged with stacks)."),
)
#: Gauges of the batch being committed right now (0 between transactions).
_STORE_INFLIGHT: Final = (
    ("inflight_ops", "Write operations in the storage transaction being committed."),
    ("inflight_messages", "Messages in the storage transaction being committed."),
    ("inflight_bytes", "Payload bytes in the storage transaction being committed."),
    ("transaction_seconds", "How long the storage transaction being committed has run (lock wait included)."),
)


def _limits(monitor: Any) -> dict[str, float]:
    """The resource monitor's flags (broker/ops/limits.py), where the broker has one."""
    if monitor is None:
        return {}
    return {"memory_high": int(bool(monitor.memory_high)), "disk_low": int(bool(monitor.disk_low)),
            "paused_readers": monitor.paused_readers, "pauses": monitor.pauses}


def _queue_row(q: Any) -> tuple[Any, ...]:
    return (q.name, q.count, len(q.inflight), len(q.consumers), len(q.ready), *_queue_counters(q))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The broker's numbers at one instant: plain data, safe to hand to another thread."""

    server_name: str
    durability: str
    ready: bool
    uptime: float
    stats: dict[str, int]
    errors: list[tuple[int, int]]
    queues: list[tuple[Any, ...]]
    streams: list[dict[str, Any]]
    store: dict[str, float]
    limits: dict[str, float]
    histograms: list[Metric]
    schemas: tuple[tuple[str, int, int, int], ...] = ()  # (schema, valid, invalid, dead_lettered)


class BrokerCollector:
    """Turns the broker's state into metric families in two steps: ``snapshot()``
    on the event loop thread (it reads actor state, which only that thread may
    touch; plain attribute reads, no await, so one consistent instant), then
    ``families(snapshot)`` anywhere (building the families costs ~20x the
    reads, so it runs in the formatting thread, off the loop)."""

    def __init__(self, broker: BrokerView, histograms: CollectorRegistry | None = None) -> None:
        self.broker = broker
        self.histograms = histograms

    def snapshot(self) -> Snapshot:
        b = self.broker
        s = b.stats
        d = b.durable
        st = d.store
        return Snapshot(
            server_name=b.config.server_name, durability=b.config.durability, ready=readiness(b)["ready"],
            uptime=time.time() - s.started,
            stats={"connections": len(b.connections), "connections_total": s.connections_total,
                   "connections_refused": s.connections_refused, "subscriptions": b.subscription_count,
                   "published": s.published, "dropped": s.dropped, "slow_disconnects": s.slow_disconnects,
                   "confirmed": d.confirmed, "duplicates": d.duplicates,
                   "state_failures": d.state_failures, "read_errors": d.read_errors},
            errors=sorted(s.errors.items()),
            queues=[_queue_row(q) for q in d.queues.values()],
            streams=[x.info() for x in d.streams.streams.values()],
            store={**{name: getattr(st, name) for name, _ in _STORE_COUNTERS},
                   **{name: getattr(st, name) for name, _ in _STORE_INFLIGHT},
                   "stalled": int(st.stalled),
                   "pending_messages": st.pending_messages, "pending_bytes": st.pending_bytes},
            limits=_limits(getattr(b, "monitor", None)),
            histograms=list(self.histograms.collect()) if self.histograms is not None else [],
            schemas=tuple(reg.counters()) if (reg := getattr(b, "schemas", None)) is not None else ())

    def collect(self) -> Iterator[Metric]:
        """Both steps at once (on the event loop thread)."""
        return self.families(self.snapshot())

    @classmethod
    def families(cls, snap: Snapshot) -> Iterator[Metric]:
        yield from cls._broker_families(snap)
        yield from cls._queue_families(snap)
        yield from cls._stream_families(snap)
        yield from cls._store_families(snap)
        yield from cls._limit_families(snap)
        yield from cls._schema_families(snap)
        yield from snap.histograms

    @staticmethod
    def _schema_families(snap: Snapshot) -> Iterator[Metric]:
        fam = CounterMetricFamily("tidings_schema_messages",
                                  "Publishes to schema-bound subjects, by schema and outcome: valid (passed), "
                                  "invalid (refused or dead-lettered), dead_lettered (of the invalid).",
                                  labels=["schema", "outcome"])
        for name, valid, invalid, dead in snap.schemas:
            fam.add_metric([name, "valid"], valid)
            fam.add_metric([name, "invalid"], invalid)
            fam.add_metric([name, "dead_lettered"], dead)
        yield fam

    @staticmethod
    def _broker_families(snap: Snapshot) -> Iterator[Metric]:
        s = snap.stats
        info = GaugeMetricFamily("tidings_info", "Constant 1, labelled with the broker's settings.",
                                 labels=["server_name", "durability"])
        info.add_metric([snap.server_name, snap.durability], 1)
        yield info
        yield GaugeMetricFamily("tidings_ready", "1 when the broker is ready (see /readyz), else 0.",
                                value=1 if snap.ready else 0)
        yield GaugeMetricFamily("tidings_uptime_seconds", "Seconds since the broker started.", value=snap.uptime)
        yield GaugeMetricFamily("tidings_connections", "Client connections open now.", value=s["connections"])
        yield CounterMetricFamily("tidings_connections_opened", "Client connections accepted (refused ones included).",
                                  value=s["connections_total"])
        yield CounterMetricFamily("tidings_connections_refused", "Connections refused at max_connections.",
                                  value=s["connections_refused"])
        yield GaugeMetricFamily("tidings_subscriptions", "Pub/sub subscriptions registered now.",
                                value=s["subscriptions"])
        yield CounterMetricFamily("tidings_messages_published", "Messages received from publishers (all kinds).",
                                  value=s["published"])
        yield CounterMetricFamily("tidings_pubsub_dropped", "Pub/sub messages dropped for slow consumers.",
                                  value=s["dropped"])
        yield CounterMetricFamily("tidings_slow_consumer_disconnects",
                                  "Connections closed for exceeding their outbound buffer.",
                                  value=s["slow_disconnects"])
        yield CounterMetricFamily("tidings_publish_confirmed",
                                  "Durable publishes committed and confirmed to their publisher.",
                                  value=s["confirmed"])
        yield CounterMetricFamily("tidings_publish_duplicates",
                                  "Publishes dropped as duplicates of an earlier message id.",
                                  value=s["duplicates"])
        yield CounterMetricFamily("tidings_store_state_failures",
                                  "Store writes changing a message's state (ack, nack, dead-letter move, offset"
                                  " commit) that failed; the state was restored in memory.",
                                  value=s["state_failures"])
        yield CounterMetricFamily("tidings_store_read_errors",
                                  "Store reads (queue refills, group and reader replays, DLQ listings) that"
                                  " failed; refills and replays are retried with back-off.",
                                  value=s["read_errors"])
        errors = CounterMetricFamily("tidings_errors", "ERR frames sent to clients, by error code.",
                                     labels=["code", "name"])
        for code, n in snap.errors:
            try:
                name = ErrorCode(code).name
            except ValueError:
                name = "UNKNOWN"
            errors.add_metric([str(code), name], n)
        yield errors

    @staticmethod
    def _queue_families(snap: Snapshot) -> Iterator[Metric]:
        rows = snap.queues
        for col, (name, doc) in enumerate(_QUEUE_GAUGES, start=1):
            fam = GaugeMetricFamily(f"tidings_queue_{name}", doc, labels=["queue"])
            for r in rows:
                fam.add_metric([r[0]], r[col])
            yield fam
        for col, (name, doc) in enumerate(_QUEUE_COUNTERS, start=1 + len(_QUEUE_GAUGES)):
            cfam = CounterMetricFamily(f"tidings_queue_{name}", doc, labels=["queue"])
            for r in rows:
                cfam.add_metric([r[0]], r[col])
            yield cfam

    @staticmethod
    def _stream_families(snap: Snapshot) -> Iterator[Metric]:
        infos = snap.streams
        part_labels = ["stream", "partition"]
        messages = GaugeMetricFamily("tidings_stream_messages", "Messages retained in the partition.",
                                     labels=part_labels)
        first = GaugeMetricFamily("tidings_stream_first_offset", "Lowest retained offset of the partition.",
                                  labels=part_labels)
        nxt = GaugeMetricFamily("tidings_stream_next_offset", "Offset the next committed message gets.",
                                labels=part_labels)
        published = CounterMetricFamily("tidings_stream_published", "Messages committed into the stream.",
                                        labels=["stream"])
        dead = CounterMetricFamily("tidings_stream_dead_lettered", "Stream messages sent to a dead-letter queue.",
                                   labels=["stream"])
        trimmed = CounterMetricFamily("tidings_stream_trimmed", "Messages removed by retention.",
                                      labels=["stream"])
        readers = GaugeMetricFamily("tidings_stream_readers", "Replaying/following readers (not groups) now.",
                                    labels=["stream"])
        glabels = ["stream", "group", "partition"]
        lag = GaugeMetricFamily("tidings_stream_group_lag",
                                "Committed messages of the partition the group has not committed yet.",
                                labels=glabels)
        committed = GaugeMetricFamily("tidings_stream_group_committed_offset",
                                      "The group's committed offset in the partition (next to process).",
                                      labels=glabels)
        ginflight = GaugeMetricFamily("tidings_stream_group_in_flight",
                                      "Deliveries of the partition awaiting the group member's ack.",
                                      labels=glabels)
        members = GaugeMetricFamily("tidings_stream_group_members", "Members (consumers) of the group.",
                                    labels=["stream", "group"])
        gdelivered = CounterMetricFamily("tidings_stream_group_delivered", "Deliveries to the group's members.",
                                         labels=["stream", "group"])
        gredelivered = CounterMetricFamily("tidings_stream_group_redelivered",
                                           "Deliveries of a message the group had been given before.",
                                           labels=["stream", "group"])
        for st in infos:
            name = st["name"]
            for p in st["partitions"]:
                labels = [name, str(p["partition"])]
                messages.add_metric(labels, p["messages"])
                first.add_metric(labels, p["first"])
                nxt.add_metric(labels, p["next"])
            published.add_metric([name], st["published"])
            dead.add_metric([name], st["dead_lettered"])
            trimmed.add_metric([name], st["trimmed"])
            readers.add_metric([name], st["readers"])
            for gname, g in sorted(st["groups"].items()):
                members.add_metric([name, gname], len(g["members"]))
                gdelivered.add_metric([name, gname], g["delivered"])
                gredelivered.add_metric([name, gname], g["redelivered"])
                for p in g["partitions"]:
                    labels = [name, gname, str(p["partition"])]
                    lag.add_metric(labels, p["lag"])
                    committed.add_metric(labels, p["committed"])
                    ginflight.add_metric(labels, p["in_flight"])
        yield from (messages, first, nxt, published, dead, trimmed, readers, lag, committed, ginflight, members,
                    gdelivered, gredelivered)

    @staticmethod
    def _store_families(snap: Snapshot) -> Iterator[Metric]:
        for name, doc in _STORE_COUNTERS:
            yield CounterMetricFamily(f"tidings_store_{name}", doc, value=snap.store[name])
        yield GaugeMetricFamily("tidings_store_pending_messages", "Messages waiting in the storage mailbox.",
                                value=snap.store["pending_messages"])
        yield GaugeMetricFamily("tidings_store_pending_bytes", "Payload bytes waiting in the storage mailbox.",
                                value=snap.store["pending_bytes"])
        for name, doc in _STORE_INFLIGHT:
            yield GaugeMetricFamily(f"tidings_store_{name}", doc, value=snap.store[name])
        yield GaugeMetricFamily("tidings_store_stalled", "1 while a storage transaction runs longer than "
                                "store_stall_timeout (the broker is then not ready).",
                                value=snap.store["stalled"])

    @staticmethod
    def _limit_families(snap: Snapshot) -> Iterator[Metric]:
        lim = snap.limits
        if not lim:
            return
        yield GaugeMetricFamily("tidings_memory_high", "1 while RSS is above memory_high_water (publishers paused).",
                                value=lim["memory_high"])
        yield GaugeMetricFamily("tidings_disk_low", "1 while free disk is below min_free_disk (durable "
                                "publishes refused).", value=lim["disk_low"])
        yield GaugeMetricFamily("tidings_paused_readers", "Publishing connections paused by memory_high now.",
                                value=lim["paused_readers"])
        yield CounterMetricFamily("tidings_reader_pauses", "Times a publishing connection was paused by "
                                  "memory_high.", value=lim["pauses"])


class _FileSizes:
    """``tidings_store_file_bytes``: the database and its WAL on disk. Runs in
    the formatting thread (it stats files, which must not happen on the loop)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> list[Metric]:
        return []  # registering must not touch the disk (it runs on the loop)

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily("tidings_store_file_bytes", "Size of the database files on disk.",
                                labels=["file"])
        for label, suffix in (("db", ""), ("wal", "-wal")):
            try:
                fam.add_metric([label], os.stat(self.path + suffix).st_size)
            except OSError:
                pass
        yield fam


class _Scrape:
    """What one scrape formats, in the formatting thread: the families built from
    the loop's snapshot, then the off-loop ones (/proc reads and stat calls)."""

    def __init__(self, snap: Snapshot, offloop: CollectorRegistry) -> None:
        self.snap = snap
        self.offloop = offloop

    def collect(self) -> Iterable[Metric]:
        yield from BrokerCollector.families(self.snap)
        yield from self.offloop.collect()


class Metrics:
    """The histograms and registries of one broker (not the process-global
    registry: several brokers can live in one test process).

    ``histograms`` is read on the event loop together with the broker's
    counters, so one scrape's numbers agree (every commit counted in
    ``tidings_store_commits_total`` is in the commit-time histogram, and no
    other); ``offloop`` (process and file metrics) is read in the formatting
    thread.
    """

    def __init__(self, broker: BrokerView) -> None:
        self.broker = broker
        self.histograms = CollectorRegistry(auto_describe=True)
        self.offloop = CollectorRegistry(auto_describe=True)
        self.collector = BrokerCollector(broker, self.histograms)
        self.confirm_seconds = Histogram(
            "tidings_publish_confirm_seconds",
            "Durable publish batches: seconds from the broker receiving the batch to its confirms being "
            "queued for the publisher (one observation per batch, not per message).",
            buckets=CONFIRM_BUCKETS, registry=self.histograms)
        self.commit_seconds = Histogram(
            "tidings_store_commit_seconds", "Storage transactions: seconds from BEGIN to COMMIT returning.",
            buckets=COMMIT_BUCKETS, registry=self.histograms)
        self.batch_messages = Histogram(
            "tidings_store_batch_messages", "Storage transactions: messages written per transaction.",
            buckets=BATCH_BUCKETS, registry=self.histograms)
        # process_resident_memory_bytes & co, namespaced: read from /proc (Linux; absent elsewhere).
        ProcessCollector(namespace="tidings", registry=self.offloop)
        self.offloop.register(_FileSizes(broker.durable.store.path))

    def observe_commit(self, seconds: float, messages: int) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_messages.observe(messages)

    def observe_confirm(self, seconds: float) -> None:
        self.confirm_seconds.observe(seconds)

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text and its content type, for an ``Accept`` header."""
        snap = self.collector.snapshot()  # on the loop, no await: one consistent instant
        encoder, content_type = choose_encoder(accept)
        body = await anyio.to_thread.run_sync(encoder, _Scrape(snap, self.offloop))
        return body, content_type


def install_hooks(broker: BrokerView) -> Metrics:
    """Create the broker's Metrics and connect its histograms to the storage actor
    and the publish path. Idempotent in effect: a second call replaces the hooks."""
    metrics = Metrics(broker)
    broker.durable.store.on_commit = metrics.observe_commit
    broker.durable.admission.on_confirm_latency = metrics.observe_confirm
    return metrics


def readiness(broker: Any) -> dict[str, bool]:
    """Whether the broker should get traffic: its client listener is bound and it
    finished starting (storage open, every queue/stream/offset recovered: the
    ready event is set only after that), its store is open and no storage transaction
    has run past store_stall_timeout (durable publishes would not be confirmed), it is
    not shutting down."""
    listener = broker.ready.is_set() and broker.bound_address is not None
    store = broker.durable.store
    storage = bool(getattr(store, "is_open", False))
    stalled = bool(getattr(store, "stalled", False))
    shutting_down = bool(broker.shutting_down)
    return {"ready": listener and storage and not stalled and not shutting_down, "listener": listener,
            "storage": storage, "storage_stalled": stalled, "shutting_down": shutting_down}
