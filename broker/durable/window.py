"""The broker-wide budget for messages paged in from disk (``window_memory``).

Every window of the durable layer -- a queue with consumers, a consumer
group with members, a stream reader -- holds paged-in messages against one
:class:`WindowBudget`; WINDOW_MIN and MESSAGE_OVERHEAD are how a window
counts them.
"""

from __future__ import annotations

from typing import Final


#: Messages a window may always page in, whatever the budget says: every queue,
#: group partition and reader makes progress even when the budget is spent or
#: one message is larger than its share.
WINDOW_MIN: Final = 4
#: Bytes counted per message beyond its payload (the object, its subject and
#: headers): keeps a window of many tiny messages from looking free.
MESSAGE_OVERHEAD: Final = 256


class WindowBudget:
    """The broker-wide budget (``window_memory``) for messages paged in from disk.

    A window (a queue with consumers, a consumer group with members, a
    stream reader) registers with :meth:`open` while it is active and
    reports the bytes it holds through :meth:`hold`. :meth:`room` is what
    it may add now: what is left of its fair share (the total divided among
    the open windows) and of the total, whichever is smaller. The owner may
    still take :data:`WINDOW_MIN` messages when the room is 0, so the total
    can be passed by at most that many messages per window. Owned by the
    event loop thread; plain integer arithmetic, no locking.
    """

    __slots__ = ("total", "used", "windows")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0  # bytes held by all windows together, as last reported
        self.windows = 0  # windows open now

    def open(self) -> None:
        self.windows += 1

    def close(self) -> None:
        self.windows -= 1

    def share(self) -> int:
        return self.total // max(self.windows, 1)

    def room(self, held: int) -> int:
        """Bytes a window that holds ``held`` may page in now (>= 0)."""
        return max(0, min(self.share() - held, self.total - self.used))

    def hold(self, before: int, after: int) -> int:
        """A window's holding changed from ``before`` to ``after`` bytes; returns ``after``."""
        self.used += after - before
        return after
