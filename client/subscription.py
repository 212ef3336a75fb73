"""Subscriptions: bounded, async-iterable streams of messages."""

from __future__ import annotations

import builtins
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio

from .errors import ConnectionClosedError, TidingsError
from .message import Message

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING: Final = 65_536  # messages buffered per subscription before it drops (and counts)


class Subscription:
    """An async iterator of :class:`Message` for one pattern.

    Messages wait in a bounded buffer (``max_pending`` messages); when the
    application falls that far behind, further messages are dropped and
    counted in ``dropped`` (the broker applies the same rule to the
    connection: see ``dropped_by_broker``). Iteration ends when the
    subscription is closed; it raises ConnectionClosedError if the
    connection is lost.
    """

    def __init__(self, client: Client, sid: int, pattern: str, group: str | None,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._client = client
        self.sid = sid
        self.pattern = pattern
        self.group = group
        self.max_pending = max_pending
        self.dropped = 0
        self.dropped_by_broker = 0
        self.received = 0
        self._q: deque[list[Any]] = deque()
        self._event: anyio.Event | None = None
        self._closed = False
        self._error: TidingsError | None = None

    # called by the client's reader task
    def _push(self, msgs: list[list[Any]]) -> None:
        room = self.max_pending - len(self._q)
        if len(msgs) > room:
            if room <= 0:
                self.dropped += len(msgs)
                return
            self.dropped += len(msgs) - room
            msgs = msgs[:room]
        self._q.extend(msgs)
        self.received += len(msgs)
        ev = self._event
        if ev is not None:
            self._event = None
            ev.set()

    def _end(self, error: TidingsError | None) -> None:
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        ev = self._event
        if ev is not None:
            self._event = None
            ev.set()

    @property
    def pending(self) -> int:
        """Messages received and not yet taken by the application."""
        return len(self._q)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        q = self._q
        while not q:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            ev = self._event = anyio.Event()
            await ev.wait()
        m = q.popleft()
        return Message(m[0], m[1], m[2], m[3], self._client)

    async def next(self, timeout: float | None = None) -> Message:
        """Return the next message; raise client TimeoutError after ``timeout`` seconds,
        ConnectionClosedError if the connection is lost, StopAsyncIteration once closed."""
        from .errors import TimeoutError as TidingsTimeout
        try:
            with anyio.fail_after(timeout):
                return await self.__anext__()
        except builtins.TimeoutError as exc:
            raise TidingsTimeout(f"no message on {self.pattern!r} within {timeout}s") from exc

    async def close(self) -> None:
        """Unsubscribe. Messages already buffered are discarded; iteration ends."""
        if self._closed:
            return
        self._end(None)
        self._q.clear()
        await self._client._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        except ConnectionClosedError:
            pass

