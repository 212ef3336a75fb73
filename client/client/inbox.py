"""The buffer behind every async iterator the client hands out (subscriptions,
consumers): the reader task pushes whole batches, the application pulls one
item at a time, and a pull only waits when the buffer is empty."""

from __future__ import annotations

import builtins
from collections import deque
from typing import Any, Generic, Self, TypeVar

import anyio

from tidings.client.errors import TidingsError
from tidings.client.errors import TimeoutError as TidingsTimeout


T = TypeVar("T")


class Inbox(Generic[T]):
    """Subclasses set ``_what`` (for error messages) and implement ``_wrap``
    (a raw item from the wire to the ``T`` the application iterates over)."""

    _what = "items"

    def __init__(self) -> None:
        self._q: deque[list[Any]] = deque()
        self._event: anyio.Event | None = None
        self._closed = False
        self._error: TidingsError | None = None

    def _wrap(self, raw: list[Any]) -> T:
        raise NotImplementedError

    def _wake(self) -> None:
        ev = self._event
        if ev is not None:
            self._event = None
            ev.set()

    def _end(self, error: TidingsError | None) -> None:
        """No more items: iteration ends, or raises ``error`` once drained."""
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        self._wake()

    @property
    def pending(self) -> int:
        """Items received and not yet taken by the application."""
        return len(self._q)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        q = self._q
        while not q:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            ev = self._event = anyio.Event()
            await ev.wait()
        return self._wrap(q.popleft())

    async def next(self, timeout: float | None = None) -> T:
        """The next item; client TimeoutError after ``timeout`` seconds,
        the connection's error if it was lost, StopAsyncIteration once closed."""
        try:
            with anyio.fail_after(timeout):
                return await self.__anext__()
        except builtins.TimeoutError as exc:
            if isinstance(exc, TidingsError):
                raise
            raise TidingsTimeout(f"no {self._what} within {timeout}s") from exc
