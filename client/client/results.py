"""Awaitable results: one-shot waiters, publish acknowledgements, confirmations."""

from __future__ import annotations

from typing import Any

import anyio


class Waiter:
    """A one-shot result slot a task can await. The Event is made only if
    someone has to wait: most confirms arrive before they are awaited."""

    __slots__ = ("event", "done", "value", "error")

    def __init__(self) -> None:
        self.event: anyio.Event | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any) -> None:
        self.value = value
        self.done = True
        if self.event is not None:
            self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()

    async def wait(self) -> Any:
        # No checkpoint when already done: a producer draining finished
        # confirms keeps publishing without a task switch per message, so the
        # writer gets whole batches instead of one message per wake-up.
        if not self.done:
            if self.event is None:
                self.event = anyio.Event()
            await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class PublishAck:
    """What the broker confirmed for a durable publish: the stored message's
    ``id``, how many ``queues`` stored it, and ``duplicate`` if the msg_id
    had been seen within the de-duplication window (stored once)."""

    __slots__ = ("id", "queues", "duplicate", "stream", "partition", "offset", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.id: int | None = raw.get("id")
        self.queues: int = raw.get("queues", 0)
        self.duplicate: bool = bool(raw.get("duplicate", False))
        self.stream: str | None = raw.get("stream")
        self.partition: int | None = raw.get("partition")
        self.offset: int | None = raw.get("offset")

    def __iter__(self) -> Any:
        """``partition, offset = await tc.publish(...)`` when a stream stored it."""
        return iter((self.partition, self.offset))

    @classmethod
    def from_wire(cls, result: Any) -> PublishAck | None:
        if type(result) is int:  # a message stored in one queue and no stream: its bare id
            return cls({"id": result, "queues": 1})
        return cls(result) if isinstance(result, dict) else None

    def __repr__(self) -> str:
        where = f", stream={self.stream!r}, partition={self.partition}, offset={self.offset}" if self.stream else ""
        return f"PublishAck(id={self.id}, queues={self.queues}, duplicate={self.duplicate}{where})"


class Confirmation:
    """An awaitable for one publish's confirm (see :meth:`Client.publish_nowait`)."""

    __slots__ = ("_w",)

    def __init__(self, waiter: Waiter | None) -> None:
        self._w = waiter

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> PublishAck | None:
        if self._w is None:
            return None
        result: PublishAck | None = await self._w.wait()
        return result

    def done(self) -> bool:
        return self._w is None or self._w.done
