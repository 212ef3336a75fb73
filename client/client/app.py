"""Handlers as an app: declare them with decorators, run them with ``tidings run module:app``.

    app = tidings.App("tidings://127.0.0.1:7421")

    @app.consumer("orders", concurrency=8, max_retries=5)
    async def place(order: OrderPlaced) -> None:      # a pydantic model: decoded from JSON
        ...

    @app.subscriber("events.>")
    async def audit(msg: tidings.Message) -> None:    # no payload type: the Message itself
        ...

    @app.responder("svc.quote")
    async def quote(req: dict) -> dict:               # the return value is the reply (JSON here)
        return {"price": 42}

A handler's first parameter says what it gets: ``bytes`` (the payload),
``str`` (UTF-8 text), ``dict``/``list`` (JSON), a pydantic model (its
``model_validate_json``), or anything else (unannotated, Message, Delivery):
the message itself. A consumer's message that does not decode is
dead-lettered at once (a :class:`~tidings.client.worker.Reject`).

:meth:`App.run` connects, runs the ``on_startup`` hooks, serves until
:meth:`App.stop` (``tidings run`` calls it on SIGTERM/SIGINT), then shuts
down gracefully: no new work is taken, running handlers get ``grace``
seconds to finish, the rest are cancelled and their messages go back to the
queue at once (the consumer stops unsettled: like a nack without delay);
then the ``on_shutdown`` hooks run and the connection closes.

Every handler runs in its message's trace context (``traceparent``), so what it
publishes continues the trace (``tidings.App(url, tracing="otel")`` records
OpenTelemetry spans too: docs/CLIENT.md, "Tracing").
"""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import anyio

from tidings.client.client import DEFAULT_URL, Client, connect
from tidings.client.consumer import Delivery
from tidings.client.message import Message
from tidings.client.tracing import PROPAGATION, Propagation
from tidings.client.worker import Reject, Worker, describe

log = logging.getLogger(__name__)

DEFAULT_GRACE: Final = 30.0  # seconds running handlers get to finish at shutdown (a k8s pod's default too)
DEFAULT_RESPONDER_GROUP: Final = "responders"  # app instances share a responder's requests (a queue group)

HandlerFn = Callable[..., Awaitable[Any]]
Hook = Callable[[], Awaitable[Any]]


def payload_decoder(handler: HandlerFn) -> Callable[[Any], Any]:
    """What the handler's first parameter asks for, as a function of the
    Message or Delivery; raises TypeError for an annotation it cannot serve."""
    params = list(inspect.signature(handler).parameters.values())
    if not params:
        raise TypeError(f"handler {handler.__qualname__} must take the message (or its payload) as a parameter")
    try:
        ann = typing.get_type_hints(handler).get(params[0].name)
    except (NameError, TypeError):  # an annotation that does not resolve: hand over the message
        ann = None
    origin = typing.get_origin(ann) or ann
    if ann is None or ann is Any or (inspect.isclass(ann) and issubclass(ann, (Message, Delivery))):
        return _itself
    if ann is bytes:
        return _payload
    if ann is str:
        return _text
    if origin in (dict, list):
        return _json_of(origin)
    validate = getattr(ann, "model_validate_json", None)
    if callable(validate):
        return lambda m: validate(m.payload)
    raise TypeError(f"handler {handler.__qualname__}: cannot decode a payload as {ann!r} "
                    "(use bytes, str, dict, list, a pydantic model, or take the message)")


def _itself(m: Any) -> Any:
    return m


def _payload(m: Any) -> Any:
    return m.payload


def _text(m: Any) -> Any:
    return m.payload.decode()


def _json_of(kind: Any) -> Callable[[Any], Any]:
    def decode(m: Any) -> Any:
        value = json.loads(m.payload)
        if not isinstance(value, kind):
            raise ValueError(f"expected a JSON {kind.__name__}, got {type(value).__name__}")
        return value
    return decode


def encode_reply(result: Any) -> tuple[bytes | str, dict[str, Any] | None]:
    """A responder's return value as a reply payload (and its content-type)."""
    if result is None:
        return b"", None
    if isinstance(result, (bytes, str)):
        return result, None
    if isinstance(result, (bytearray, memoryview)):
        return bytes(result), None
    dump = getattr(result, "model_dump_json", None)
    text = dump() if callable(dump) else json.dumps(result)
    return text, {"content-type": "application/json"}


class _Route(Protocol):
    name: str

    async def serve(self, tc: Client) -> None: ...

    def stop(self) -> None: ...


class _ConsumerRoute:
    def __init__(self, queue: str, handler: HandlerFn, options: dict[str, Any]) -> None:
        self.name = f"consumer {queue!r}"
        self.queue = queue
        self.handler = handler
        self.decode = payload_decoder(handler)
        self.options = options
        self.worker: Worker | None = None
        self._stopped = False

    async def _handle(self, d: Delivery) -> None:
        try:
            arg = self.decode(d)
        except Exception as exc:  # it will not decode next time either
            raise Reject(f"cannot decode the payload: {describe(exc)}") from exc
        await self.handler(arg)

    async def serve(self, tc: Client) -> None:
        self.worker = Worker(tc, self._handle, queue=self.queue, **self.options)
        if self._stopped:
            return
        await self.worker.run()

    def stop(self) -> None:
        self._stopped = True
        if self.worker is not None:
            self.worker.stop()


class _SubscriptionRoute:
    """A subscriber, or a responder (``reply``: its return value answers the request)."""

    def __init__(self, pattern: str, handler: HandlerFn, group: str | None, concurrency: int,
                 reply: bool) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.name = f"{'responder' if reply else 'subscriber'} {pattern!r}"
        self.pattern = pattern
        self.handler = handler
        self.decode = payload_decoder(handler)
        self.group = group
        self.concurrency = concurrency
        self.reply = reply
        self._scope: anyio.CancelScope | None = None  # made in serve(): declaring runs outside any event loop
        self._tracing: Propagation = PROPAGATION  # the client's, from serve()
        self._stopped = False

    async def serve(self, tc: Client) -> None:
        slots = anyio.Semaphore(self.concurrency)
        self._scope = scope = anyio.CancelScope()
        if self._stopped:
            return
        self._tracing = tc.tracing
        async with anyio.create_task_group() as tg:
            with scope:
                async with await tc.subscribe(self.pattern, self.group) as sub:
                    async for msg in sub:
                        await slots.acquire()
                        tg.start_soon(self._handle, msg, slots)

    def stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()  # no new messages; the running handlers finish (the task group waits)

    async def _handle(self, msg: Message, slots: anyio.Semaphore) -> None:
        try:
            # In the message's trace context: what the handler publishes, and the reply, continue it.
            with self._tracing.processing(msg, self.group or self.pattern):
                result = await self.handler(self.decode(msg))
                if self.reply and msg.reply is not None:
                    payload, headers = encode_reply(result)
                    await msg.respond(payload, headers=headers)
        except Exception as exc:
            # The type only: the text may quote the payload (logs never hold payloads).
            log.warning("%s failed on a message to %s: %s", self.name, msg.subject, type(exc).__name__)
            if self.reply and msg.reply is not None:
                try:
                    await msg.respond(b"", headers={"error": describe(exc)})
                except Exception as send_exc:  # the reply is best effort: the requester times out
                    log.warning("%s could not send its error reply: %s", self.name, type(send_exc).__name__)
        finally:
            slots.release()


class App:
    """Handlers, hooks and the connection they share; see the module docstring.

    ``url`` and ``connect_kwargs`` go to :func:`tidings.connect`. ``client``
    is the connected :class:`Client` while the app runs (hooks and handlers
    may publish through it); RuntimeError outside :meth:`run`."""

    def __init__(self, url: str = DEFAULT_URL, **connect_kwargs: Any) -> None:
        self.url = url
        self.connect_kwargs = connect_kwargs
        self._client: Client | None = None
        self._routes: list[_Route] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._stop_requested: anyio.Event | None = None
        self._stop_early = False

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("app.client is there while app.run() runs (in hooks and handlers)")
        return self._client

    # ---------------------------------------------------------- declaring

    def consumer(self, queue: str, *, concurrency: int = 8, max_retries: int | None = None,
                 non_retryable: tuple[type[BaseException], ...] = (), prefetch: int | None = None,
                 **worker_options: Any) -> Callable[[HandlerFn], HandlerFn]:
        """Handle each message of the durable queue ``queue`` (a :class:`Worker`:
        success acks, an exception retries, ``max_retries`` retries or a
        ``non_retryable`` type or :class:`Reject` dead-letter it)."""
        options = dict(concurrency=concurrency, max_retries=max_retries, non_retryable=non_retryable,
                       prefetch=prefetch, **worker_options)

        def register(fn: HandlerFn) -> HandlerFn:
            self._routes.append(_ConsumerRoute(queue, fn, options))
            return fn
        return register

    def subscriber(self, pattern: str, *, group: str | None = None,
                   concurrency: int = 1) -> Callable[[HandlerFn], HandlerFn]:
        """Handle each message published to ``pattern`` (pub/sub: at most once).
        ``concurrency`` 1 keeps the order they arrive in."""
        def register(fn: HandlerFn) -> HandlerFn:
            self._routes.append(_SubscriptionRoute(pattern, fn, group, concurrency, reply=False))
            return fn
        return register

    def responder(self, subject: str, *, group: str | None = DEFAULT_RESPONDER_GROUP,
                  concurrency: int = 8) -> Callable[[HandlerFn], HandlerFn]:
        """Answer requests to ``subject``: the handler's return value is the
        reply (bytes or str as they are, None empty, other values as JSON, a
        pydantic model by ``model_dump_json``); if it raises, the reply is
        empty with an ``error`` header (``Type: message``). Instances of the
        app share the requests (queue ``group``)."""
        def register(fn: HandlerFn) -> HandlerFn:
            self._routes.append(_SubscriptionRoute(subject, fn, group, concurrency, reply=True))
            return fn
        return register

    def on_startup(self, fn: Hook) -> Hook:
        """Run ``await fn()`` once connected, before any handler starts."""
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Run ``await fn()`` after the handlers stopped, before the connection closes."""
        self._shutdown.append(fn)
        return fn

    # ------------------------------------------------------------ running

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully (safe to call from a signal
        handler's task, or before run() starts)."""
        self._stop_early = True
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self, *, grace: float = DEFAULT_GRACE) -> None:
        """Serve until :meth:`stop`, then shut down gracefully (see the module
        docstring). Raises ConnectError (or the broker's refusal), or the
        first handler route's failure (e.g. NotFoundError for a missing
        queue) after shutting the others down."""
        self._stop_requested = stop = anyio.Event()
        if self._stop_early:
            stop.set()
        failures: list[Exception] = []
        async with connect(self.url, **self.connect_kwargs) as tc:
            self._client = tc
            try:
                for hook in self._startup:
                    await hook()
                async with anyio.create_task_group() as tg:
                    done = [anyio.Event() for _ in self._routes]
                    for route, ev in zip(self._routes, done):
                        tg.start_soon(self._serve, route, tc, ev, failures)
                    await stop.wait()
                    log.info("stopping: no new work; %s s for running handlers to finish", grace)
                    for route in self._routes:
                        route.stop()
                    with anyio.move_on_after(grace) as waited:
                        for ev in done:
                            await ev.wait()
                    if waited.cancelled_caught:
                        log.warning("handlers still running after %s s: cancelled, their messages handed back", grace)
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    for hook in self._shutdown:
                        try:
                            await hook()
                        except Exception:  # one hook's failure must not skip the others or the close
                            log.exception("on_shutdown hook %s failed", getattr(hook, "__qualname__", hook))
                self._client = None
        if failures:
            raise failures[0]

    async def _serve(self, route: _Route, tc: Client, done: anyio.Event, failures: list[Exception]) -> None:
        try:
            await route.serve(tc)
        except Exception as exc:  # the route cannot run (e.g. its queue is missing): stop the app
            log.error("%s stopped: %s", route.name, exc)
            failures.append(exc)
            self.stop()
        finally:
            done.set()
