"""A blocking client for code without an event loop (Django, Flask, scripts): ``tidings.sync``.

    import tidings.sync

    with tidings.sync.connect("tidings://127.0.0.1:7421") as tc:
        tc.publish("orders.eu.created", b"{...}")
        reply = tc.request("svc.quote", b"{...}", timeout=5)
        with tc.subscribe("events.>") as sub:
            for msg in sub.messages(timeout=1.0):   # ends after 1 s without a message
                ...
        with tc.consume("orders") as deliveries:
            d = deliveries.next(timeout=5)
            d.ack()

It runs the async :class:`~tidings.client.client.Client` on an event loop
in a background thread of its own; every method hands its call to that loop
and waits for the result, so any number of threads may share one client.
:meth:`SyncClient.close` (or leaving the ``with`` block) sends what is
pending, closes the connection and ends the thread. A client left open is
closed when the interpreter exits.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Final, Generic, Sequence, TypeVar

from tidings.client.admin import ConsumeContext
from tidings.client.client import DEFAULT_URL, Client
from tidings.client.client import connect as connect_async
from tidings.client.consumer import Delivery, DeliveryT, QueueConsumer, StreamMessage
from tidings.client.errors import ConnectionClosedError, TimeoutError
from tidings.client.message import Message
from tidings.client.results import PublishAck
from tidings.client.subscription import DEFAULT_MAX_PENDING, Subscription

T = TypeVar("T")

CLOSE_TIMEOUT: Final = 30.0  # seconds close() waits for the loop thread (the client's own close is bounded by its timeout)


class _Loop:
    """An event loop running in a daemon thread; ``run`` blocks the calling thread on a coroutine."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.get_ident() == self.thread.ident:
            coro.close()
            raise RuntimeError("a tidings.sync client cannot be called from its own loop (a handler of it)")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt in the waiting thread: stop the call too
            raise

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLOSE_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


class SyncSubscription:
    """A pub/sub subscription read by blocking calls: ``next(timeout)``,
    iteration (until closed), ``messages(timeout)`` (until ``timeout``
    seconds pass without a message), ``close()``; a context manager."""

    def __init__(self, owner: SyncClient, sub: Subscription) -> None:
        self._owner = owner
        self._sub = sub
        self.pattern = sub.pattern

    def next(self, timeout: float | None = None) -> Message:
        """The next message; tidings TimeoutError after ``timeout`` seconds, StopIteration once closed."""
        try:
            return self._owner._run(self._sub.next(timeout))
        except StopAsyncIteration:
            raise StopIteration from None

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        return self.next()

    def messages(self, timeout: float) -> Iterator[Message]:
        """Messages as they come, until none comes for ``timeout`` seconds or the subscription closes."""
        while True:
            try:
                yield self.next(timeout)
            except (TimeoutError, StopIteration):
                return

    def close(self) -> None:
        if not self._owner.is_closed:
            self._owner._run(self._sub.close())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncDelivery(Generic[DeliveryT]):
    """A durable delivery with blocking ``ack``/``nack``/``reject``/``in_progress``;
    its other attributes (``payload``, ``subject``, ``headers``, ``delivery_count``,
    ``partition``/``offset`` on a stream...) are the async delivery's."""

    def __init__(self, owner: SyncClient, d: DeliveryT) -> None:
        self._owner = owner
        self.delivery = d

    def __getattr__(self, name: str) -> Any:
        return getattr(self.delivery, name)

    def __repr__(self) -> str:
        return f"Sync{self.delivery!r}"

    def ack(self, *, wait: bool = False) -> None:
        self._owner._run(self.delivery.ack(wait=wait))

    def nack(self, delay: float | None = None, *, error: str | None = None, wait: bool = False) -> None:
        self._owner._run(self.delivery.nack(delay, error=error, wait=wait))

    def reject(self, reason: str | None = None, *, wait: bool = False) -> None:
        self._owner._run(self.delivery.reject(reason, wait=wait))

    def in_progress(self, *, wait: bool = False) -> None:
        self._owner._run(self.delivery.in_progress(wait=wait))


class SyncConsumer(Generic[DeliveryT]):
    """A durable consumer (``with tc.consume(queue) as deliveries:``): ``next(timeout)``,
    iteration, ``deliveries(timeout)``; leaving the block stops it (unsettled
    deliveries go back to the queue at once)."""

    def __init__(self, owner: SyncClient, ctx: ConsumeContext[DeliveryT]) -> None:
        self._owner = owner
        self._ctx = ctx
        self._consumer: QueueConsumer[DeliveryT] | None = None

    def __enter__(self) -> SyncConsumer[DeliveryT]:
        self._consumer = self._owner._run(self._ctx.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None and not self._owner.is_closed:
            self._consumer = None
            self._owner._run(self._ctx.__aexit__(None, None, None))

    def next(self, timeout: float | None = None) -> SyncDelivery[DeliveryT]:
        """The next delivery; tidings TimeoutError after ``timeout`` seconds, StopIteration once stopped."""
        if self._consumer is None:
            raise RuntimeError("use the consumer inside `with tc.consume(...) as deliveries:`")
        try:
            return SyncDelivery(self._owner, self._owner._run(self._consumer.next(timeout)))
        except StopAsyncIteration:
            raise StopIteration from None

    def __iter__(self) -> Iterator[SyncDelivery[DeliveryT]]:
        return self

    def __next__(self) -> SyncDelivery[DeliveryT]:
        return self.next()

    def deliveries(self, timeout: float) -> Iterator[SyncDelivery[DeliveryT]]:
        """Deliveries as they come, until none comes for ``timeout`` seconds or the consumer stops."""
        while True:
            try:
                yield self.next(timeout)
            except (TimeoutError, StopIteration):
                return


class SyncClient:
    """The blocking client; create it with :func:`connect`. Methods take the
    async :class:`~tidings.client.client.Client`'s arguments and raise its errors.
    ``client`` is the async client (for use on ``loop`` only)."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        self._closed = False
        self._lock = threading.Lock()
        self._loop = _Loop(f"tidings-sync {url}")
        try:
            self.client: Client = self._loop.run(self._open(url, kwargs))
        except BaseException:
            self._loop.stop()
            raise
        atexit.register(self.close)

    @staticmethod
    async def _open(url: str, kwargs: dict[str, Any]) -> Client:
        return await connect_async(url, **kwargs)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop.loop

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ConnectionClosedError("the client was closed")
        return self._loop.run(coro)

    def close(self) -> None:
        """Send what is pending, close the connection and end the loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._loop.run(self.client.close())
            except (ConnectionClosedError, concurrent.futures.CancelledError):
                pass
            finally:
                self._closed = True
                self._loop.stop()
                atexit.unregister(self.close)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- pub/sub

    def publish(self, subject: str, payload: bytes | bytearray | memoryview | str = b"", **kwargs: Any
                ) -> PublishAck | None:
        """Publish; see :meth:`Client.publish` (``json=`` included; returns the PublishAck
        of a durable publish)."""
        return self._run(self.client.publish(subject, payload, **kwargs))

    def flush(self, timeout: float | None = None) -> None:
        self._run(self.client.flush(timeout))

    def request(self, subject: str, payload: bytes | str = b"", *, headers: dict[str, Any] | None = None,
                timeout: float = 5.0, **kwargs: Any) -> Message:
        """Send a request and return the first reply; see :meth:`Client.request` (``json=`` too)."""
        return self._run(self.client.request(subject, payload, headers=headers, timeout=timeout, **kwargs))

    def subscribe(self, pattern: str, group: str | None = None, *,
                  max_pending: int = DEFAULT_MAX_PENDING, match: dict[str, Any] | None = None) -> SyncSubscription:
        """Subscribe (registered when this returns); reply to a message with
        ``tc.publish(msg.reply, ...)``. ``match``: a content filter, as for Client.subscribe."""
        return SyncSubscription(self, self._run(self.client.subscribe(pattern, group, max_pending=max_pending,
                                                                      match=match)))

    def call(self, method: str, args: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        return self._run(self.client.call(method, args, timeout=timeout))

    # -------------------------------------------------------------- durable

    def consume(self, queue: str, *, prefetch: int = 100) -> SyncConsumer[Delivery]:
        """``with tc.consume(queue) as deliveries:``; see :meth:`Client.consume`."""
        return SyncConsumer(self, self.client.consume(queue, prefetch=prefetch))

    def stream_consume(self, stream: str, group: str, *, window: int = 100,
                       start: str = "earliest") -> SyncConsumer[StreamMessage]:
        return SyncConsumer(self, self.client.stream_consume(stream, group, window=window, start=start))

    def declare_queue(self, name: str, *, bind: Sequence[str | dict[str, Any]] = (), **settings: Any) -> dict[str, Any]:
        return self._run(self.client.declare_queue(name, bind=bind, **settings))

    def delete_queue(self, name: str) -> dict[str, Any]:
        return self._run(self.client.delete_queue(name))

    def purge_queue(self, name: str) -> int:
        return self._run(self.client.purge_queue(name))

    def queue_info(self, name: str) -> dict[str, Any]:
        return self._run(self.client.queue_info(name))

    def list_queues(self) -> list[dict[str, Any]]:
        return self._run(self.client.list_queues())

    def dlq_list(self, queue: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        return self._run(self.client.dlq_list(queue, limit=limit, offset=offset))

    def dlq_redrive(self, queue: str, *, count: int | None = None, to: str | None = None) -> int:
        return self._run(self.client.dlq_redrive(queue, count=count, to=to))

    def dlq_purge(self, queue: str) -> int:
        return self._run(self.client.dlq_purge(queue))

    def declare_stream(self, name: str, *, partitions: int = 1, bind: Sequence[str | dict[str, Any]] = (),
                       **settings: Any) -> dict[str, Any]:
        return self._run(self.client.declare_stream(name, partitions=partitions, bind=bind, **settings))

    def delete_stream(self, name: str) -> dict[str, Any]:
        return self._run(self.client.delete_stream(name))

    def stream_info(self, name: str) -> dict[str, Any]:
        return self._run(self.client.stream_info(name))

    def list_streams(self) -> list[dict[str, Any]]:
        return self._run(self.client.list_streams())


def connect(url: str = DEFAULT_URL, **kwargs: Any) -> SyncClient:
    """A connected :class:`SyncClient` (``with tidings.sync.connect(url) as tc:``, or
    ``tc = tidings.sync.connect(url)`` ... ``tc.close()``). Keyword arguments are
    :func:`tidings.connect`'s; raises ConnectError or the broker's refusal."""
    return SyncClient(url, **kwargs)
