"""What a subscriber receives."""

from __future__ import annotations

from typing import Any, Protocol, Union

from tidings.client.codec import UNSET, Body, Payload, with_json
from tidings.client.events import CloudEvent, event_of

HeaderValue = Union[str, int, bytes]


class Responder(Protocol):
    """What a message needs to answer its request: a way to publish (the client is one)."""

    async def publish(self, subject: str, payload: Payload, *,
                      headers: dict[str, Any] | None = None) -> object: ...


class Message(Body):
    """A pub/sub message: ``subject``, ``payload`` (bytes), ``headers``
    (dict or None) and ``reply`` (the subject to answer to, or None); the
    payload accessors ``data``, ``text()``, ``json()``, ``model(T)`` and
    ``content_type`` are those of every received message (:class:`Body`)."""

    __slots__ = ("subject", "payload", "headers", "reply", "_responder")

    def __init__(self, subject: str, payload: bytes, headers: dict[str, HeaderValue] | None,
                 reply: str | None, responder: Responder | None = None) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.reply = reply
        self._responder = responder

    def __repr__(self) -> str:
        return f"Message(subject={self.subject!r}, payload=<{len(self.payload)} bytes>, reply={self.reply!r})"

    @property
    def event(self) -> CloudEvent | None:
        """The CloudEvent this message carries (client/events.py), its data decoded and
        upcast by the client's upcasters; None without CloudEvents headers. Raises
        ValueError if the data cannot be decoded by its content type."""
        return event_of(self.headers, self.payload, getattr(self._responder, "upcasters", None))

    async def respond(self, payload: Payload = b"", *,
                      headers: dict[str, Any] | None = None, json: Any = UNSET) -> None:
        """Publish ``payload`` (or ``json=value``, encoded as JSON with
        ``content-type: application/json``) to this message's reply subject.

        Raises ValueError if the message has no reply subject, TypeError for
        a payload that is not bytes-like or str."""
        if self.reply is None or self._responder is None:
            raise ValueError("this message has no reply subject")
        if json is not UNSET:
            payload, headers = with_json(payload, json, headers)
        await self._responder.publish(self.reply, payload, headers=headers)
