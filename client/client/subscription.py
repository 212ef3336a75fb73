"""Subscriptions: bounded, async-iterable streams of messages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Final

from tidings.client.errors import ConnectionClosedError
from tidings.client.inbox import Inbox
from tidings.client.message import Message, Responder

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING: Final = 65_536  # messages buffered per subscription before it drops (and counts)


@dataclass(frozen=True, slots=True)
class SubscriptionPort:
    """What a subscription may ask of its connection: where its messages'
    replies are published, and how to end the subscription (by sid)."""

    responder: Responder
    unsubscribe: Callable[[int], Awaitable[None]]


class Subscription(Inbox[Message]):
    """An async iterator of :class:`Message` for one pattern.

    Messages wait in a bounded buffer (``max_pending`` messages); when the
    application falls that far behind, further messages are dropped and
    counted in ``dropped`` (the broker applies the same rule to the
    connection: see ``dropped_by_broker``). Iteration ends when the
    subscription is closed; it raises ConnectionClosedError if the
    connection is lost.
    """

    def __init__(self, port: SubscriptionPort, sid: int, pattern: str, group: str | None,
                 max_pending: int = DEFAULT_MAX_PENDING, match: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._what = f"message on {pattern!r}"
        self._port = port
        self._responder = port.responder
        self.sid = sid
        self.pattern = pattern
        self.group = group
        self.match = match  # the content filter the broker applies (re-sent on reconnect)
        self.max_pending = max_pending
        self.dropped = 0
        self.dropped_by_broker = 0
        self.received = 0

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
        self._wake()

    def _wrap(self, m: list[Any]) -> Message:
        # The codec passed only messages of exactly frames.MSG_FIELDS; unpacking them is
        # cheaper per message than indexing by the module's M_* constants.
        subject, payload, headers, reply = m
        return Message(subject, payload, headers, reply, self._responder)

    async def close(self) -> None:
        """Unsubscribe. Messages already buffered are discarded; iteration ends."""
        if self._closed:
            return
        self._end(None)
        self._q.clear()
        await self._port.unsubscribe(self.sid)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        except ConnectionClosedError:
            pass
