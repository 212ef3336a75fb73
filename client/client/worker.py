"""Run a handler over a queue or a stream group: the common consumer loop, done right.

    async def handle(d):                 # raise to fail the message
        ...

    worker = Worker(tc, handle, queue="jobs", concurrency=8)
    await worker.run()                   # until cancelled

Each delivery runs ``handler(delivery)`` with at most ``concurrency``
running at once. Success acks; an exception nacks with the error's type and
message (the queue's backoff decides when it comes back; after
max_deliveries, or after ``max_retries`` retries, it goes to the DLQ, whose
``tidings-last-error`` header then holds that text). ``raise Reject(reason)``,
or an exception of a type in ``non_retryable``, dead-letters the message at
once. Logs name the failure's type, subject and attempt, never the payload
or the error's text (which may quote it): that text goes to the DLQ only.
While a handler runs, its ack deadline is extended every ``extend_every``
seconds, so long handlers are not redelivered under them. After
``failure_threshold`` consecutive failures the circuit breaker opens: the
worker stops consuming (the broker returns its unsettled messages), waits
``cooldown`` seconds, then lets one message through (half-open); success
closes the breaker, failure opens it again. In a stream group, messages of
one partition are handled one at a time, in order.

Each handler runs in its message's trace context (``traceparent``: see
:mod:`tidings.client.tracing`), so what it publishes continues the trace; a
client connected with ``tracing="otel"`` also records a CONSUMER span.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import AbstractAsyncContextManager
from typing import Any, Awaitable, Callable, Protocol

import anyio

from tidings.protocol.frames import MAX_ERROR_TEXT

from tidings.client.consumer import Delivery, QueueConsumer, StreamMessage
from tidings.client.errors import TidingsError
from tidings.client.tracing import PROPAGATION, Propagation

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[Any]]


class Reject(Exception):
    """Raised by a handler: this message can never succeed (bad input), so it
    goes to the dead-letter queue at once, with ``reason`` as its last error."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


def describe(error: BaseException) -> str:
    """The failure as kept in ``tidings-last-error``: ``Type: message`` (a
    Reject's reason alone), cut to what the broker keeps."""
    if isinstance(error, Reject):
        text = error.reason
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:MAX_ERROR_TEXT]


class ConsumerSource(Protocol):
    """What a worker consumes through: a Client, or its ``durable``."""

    def consume(self, queue: str, *, prefetch: int = ...) -> AbstractAsyncContextManager[QueueConsumer[Delivery]]:
        ...

    def stream_consume(self, stream: str, group: str, *, window: int = ...,
                       start: str = ...) -> AbstractAsyncContextManager[QueueConsumer[StreamMessage]]:
        ...


class Worker:
    """See the module docstring. ``state`` is "closed" (normal), "open" or "half-open"."""

    def __init__(self, client: ConsumerSource, handler: Handler, *, queue: str | None = None,
                 stream: str | None = None, group: str | None = None, concurrency: int = 8,
                 prefetch: int | None = None, extend_every: float | None = None,
                 failure_threshold: int = 5, cooldown: float = 10.0,
                 on_state_change: Callable[[str], Any] | None = None, max_retries: int | None = None,
                 non_retryable: tuple[type[BaseException], ...] = ()) -> None:
        if (queue is None) == (stream is None):
            raise ValueError("give exactly one of queue= or stream= (with group=)")
        if stream is not None and group is None:
            raise ValueError("a stream worker needs a group")
        if concurrency < 1 or failure_threshold < 1 or cooldown < 0:
            raise ValueError("concurrency and failure_threshold must be >= 1, cooldown >= 0")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0 (None: the queue's max_deliveries decides)")
        self.max_retries = max_retries
        self.non_retryable = non_retryable
        self.rejected = 0
        self._stopping = False
        self._max_deliveries = 0  # a stream group's (CONSUME answer): its last failure is dead-lettered
        self.client = client
        self.handler = handler
        self.queue = queue
        self.stream = stream
        self.group = group
        self.concurrency = concurrency
        self.prefetch = prefetch or max(concurrency * 2, 1)
        self.extend_every = extend_every
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.on_state_change = on_state_change
        self.state = "closed"
        self.succeeded = 0
        self.failed = 0
        self.consecutive_failures = 0
        self.breaker_opened = 0
        self._trip = anyio.Event()
        self._slots = anyio.CapacityLimiter(concurrency)
        self._loop_scope = anyio.CancelScope()
        self._partitions: dict[int, Any] = {}
        self._void: dict[int, int] = {}
        # The client's tracing (W3C propagation, or OpenTelemetry spans once instrumented); a
        # source without one (e.g. tc.durable) propagates the W3C context.
        self._tracing: Propagation = getattr(client, "tracing", None) or PROPAGATION
        self._consumer_name = queue if queue is not None else f"{stream}/{group}"

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            log.info("worker on %s: circuit breaker %s", self.queue or self.stream, state)
            if self.on_state_change is not None:
                try:
                    self.on_state_change(state)
                except Exception:  # a user callback must not stop the worker
                    log.exception("on_state_change callback failed")

    def _consume(self) -> Any:
        if self.queue is not None:
            return self.client.consume(self.queue, prefetch=self.prefetch)
        assert self.stream is not None and self.group is not None
        return self.client.stream_consume(self.stream, group=self.group, window=self.prefetch)

    def stop(self) -> None:
        """Take no new deliveries: :meth:`run` returns once the running handlers
        have finished and settled (the deliveries not started go back to the
        queue at once). Cancel run() to stop the handlers too: the messages of
        those cut short go back to the queue at once, like a nack without delay."""
        self._stopping = True
        self._loop_scope.cancel()

    async def run(self) -> None:
        """Consume until cancelled, stopped (:meth:`stop`) or the client closes."""
        while not self._stopping:
            self._trip = anyio.Event()
            self._loop_scope = anyio.CancelScope()
            # One probe at a time while half-open; the limit grows back when it closes.
            self._slots = anyio.CapacityLimiter(1 if self.state == "half-open" else self.concurrency)
            self._partitions = {}
            self._void = {}
            async with self._consume() as deliveries:
                extend = self.extend_every or _default_extend(deliveries)
                info = deliveries.info if isinstance(deliveries.info, dict) else {}
                self._max_deliveries = info.get("max_deliveries") or 0
                async with anyio.create_task_group() as tg:
                    # Tripping the breaker cancels this loop (not the running handlers,
                    # which finish and settle), even while no delivery is arriving.
                    with self._loop_scope:
                        if self._stopping:  # stop() came between two rounds
                            self._loop_scope.cancel()
                        async for d in deliveries:
                            if self.stream is not None:
                                await self._dispatch_partition(tg, d, extend)
                                continue
                            token = object()
                            await self._slots.acquire_on_behalf_of(token)
                            tg.start_soon(self._handle_one, d, token, extend)
            # Leaving the consume block stopped the consumer: unsettled deliveries went back.
            if not self._trip.is_set() or self._stopping:
                return  # the consumer ended (closed client, deleted queue)
            self._set_state("open")
            self.breaker_opened += 1
            await anyio.sleep(self.cooldown)
            self._set_state("half-open")

    async def _handle_one(self, d: Delivery, token: object, extend: float) -> None:
        try:
            await self._process(d, extend)
        finally:
            self._slots.release_on_behalf_of(token)

    async def _process(self, d: Delivery, extend: float) -> BaseException | None:
        # Cut short by cancellation (e.g. after a shutdown's grace period), a delivery stays
        # unsettled: leaving the consume block stops the consumer and the broker hands it back
        # at once. (A NACK here would race the STOP: redelivered to this consumer first.)
        error = await self._run_handler(d, extend)
        dead = error is not None and self._dead_letter_now(d, error)
        try:
            if error is None:
                await d.ack()
            elif dead:
                await d.reject(describe(error))
            else:
                await d.nack(error=describe(error))  # the queue's backoff schedule decides the delay
        except TidingsError as exc:
            log.warning("settling %r failed: %s", d, exc)
        if isinstance(error, Reject):
            self.rejected += 1  # a verdict on the message, not a failure of what the handler calls
            return None
        self._verdict(error)
        # A dead-lettered message is settled (a stream partition moves past it); a nacked one comes
        # again, unless it was the last attempt the stream allows (then the broker dead-letters it).
        if dead or (self._max_deliveries and d.delivery_count >= self._max_deliveries):
            return None
        return error

    def _dead_letter_now(self, d: Delivery, error: BaseException) -> bool:
        """Reject, a non-retryable type, or the last retry: straight to the DLQ."""
        if isinstance(error, Reject) or isinstance(error, self.non_retryable):
            return True
        return self.max_retries is not None and d.delivery_count > self.max_retries

    async def _dispatch_partition(self, tg: Any, d: Any, extend: float) -> None:
        """Streams: one runner per partition handles its messages in order;
        runners, not messages, take the concurrency slots."""
        p = d.partition
        void = self._void.get(p)
        if void is not None:
            if d.offset > void:
                return  # voided by the broker after a failure at `void`: it comes again, in order
            del self._void[p]
        queue = self._partitions.get(p)
        if queue is not None:
            queue.append(d)
            return
        self._partitions[p] = queue = deque([d])
        token = object()
        await self._slots.acquire_on_behalf_of(token)
        tg.start_soon(self._run_partition, p, queue, token, extend)

    async def _run_partition(self, p: int, queue: Any, token: object, extend: float) -> None:
        try:
            while queue and not self._trip.is_set() and not self._stopping:
                d = queue.popleft()
                if await self._process(d, extend) is not None:
                    # The broker redelivers the partition from this offset: later
                    # ones already here are void (running them would break order).
                    queue.clear()
                    self._void[p] = d.offset
        finally:
            self._partitions.pop(p, None)
            self._slots.release_on_behalf_of(token)

    async def _run_handler(self, d: Delivery, extend: float) -> BaseException | None:
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_keep_extending, d, extend)
            try:
                # In the message's trace context: what the handler publishes continues the trace.
                with self._tracing.processing(d, self._consumer_name):
                    await self.handler(d)
            except Exception as exc:  # the handler's failure is the message's failure, not ours
                # The type only: an error's text may quote the payload (OPERATIONS.md: logs never hold payloads).
                log.warning("handler failed on %r: %s", d, type(exc).__name__)
                error = exc
            finally:
                tg.cancel_scope.cancel()
        return error

    def _verdict(self, error: BaseException | None) -> None:
        if error is None:
            self.succeeded += 1
            self.consecutive_failures = 0
            if self.state == "half-open":
                self._set_state("closed")
                self._slots.total_tokens = self.concurrency
            return
        self.failed += 1
        self.consecutive_failures += 1
        if self.state == "half-open" or self.consecutive_failures >= self.failure_threshold:
            self.consecutive_failures = 0
            self._trip.set()
            self._loop_scope.cancel()


async def _keep_extending(d: Delivery, every: float) -> None:
    while True:
        await anyio.sleep(every)
        try:
            await d.in_progress()
        except TidingsError:
            return


def _default_extend(deliveries: QueueConsumer[Any]) -> float:
    info = deliveries.info if isinstance(deliveries.info, dict) else {}
    deadline = info.get("ack_deadline") or 30.0
    return max(float(deadline) / 3.0, 0.01)
