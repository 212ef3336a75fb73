"""Telling clients which subjects are durably bound, and capping bindings.

A client asks for a confirm only for publishes that land in a durable
queue or stream, so it needs the subject patterns those are bound to.
They no longer travel in WELCOME (which must fit the small pre-handshake
frame limit whatever is declared): right after WELCOME, and after every
change, each connection gets the set as ``bindings`` NOTICEs of at most
``CHUNK_CHARS`` characters of patterns each, all with the same ``epoch``,
every one but the last marked ``"more": true``. A client uses a set only
once its last chunk has arrived.

Each user sees only the patterns it could publish into (a pattern that
overlaps one of its publish allows and is not wholly denied): every
subject it may publish to that is durably bound matches one of them, and
a user without publish rights learns nothing about other tenants' names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from tidings.protocol import ErrorCode, RemoteProtocolError
from tidings.protocol import frames as F
from tidings.protocol import vocabulary as V

from tidings.broker.security.permissions import Permissions, covers, overlaps

if TYPE_CHECKING:
    from tidings.broker.config import Config
    from tidings.broker.durable.core import Durable
    from tidings.broker.net.connection import ConnectionActor

# Pattern characters per bindings NOTICE: a few KiB per frame keeps each well under any frame
# limit (patterns are at most 255 characters) without sending thousands of tiny frames.
CHUNK_CHARS: Final = 8 * 1024
NOTICE_OVERHEAD: Final = 64  # envelope bytes of one NOTICE, for the outbound buffer's accounting


class BindingsFeed:
    """The durable binding patterns as each connection's user may see them.

    Owned by the Broker (event loop thread). The per-permissions frames
    are computed once per epoch and shared by every connection of a user.
    ``connections`` is the broker's live registry (number -> connection).
    """

    def __init__(self, config: Config, durable: Durable, connections: Mapping[int, ConnectionActor]) -> None:
        self.config = config
        self.durable = durable
        self.connections = connections
        self.epoch = 0
        self._all: list[str] | None = None
        self._frames: dict[int, tuple[Permissions, list[list[Any]]]] = {}  # id(perms) -> (perms, frames)

    def patterns(self) -> list[str]:
        if self._all is None:
            self._all = self.durable.binding_patterns()
        return self._all

    def visible(self, perms: Permissions) -> list[str]:
        """The patterns a user with ``perms`` may publish into."""
        every = self.patterns()
        if perms.unrestricted:
            return every
        d = perms.describe()
        allow = d["allow"].get("publish", [])
        deny = d["deny"].get("publish", [])
        if not allow:
            return []
        return [p for p in every
                if any(overlaps(a, p) for a in allow) and not any(covers(x, p) for x in deny)]

    def frames(self, perms: Permissions) -> list[list[Any]]:
        """The NOTICE frames carrying the current set for ``perms`` (at least one)."""
        hit = self._frames.get(id(perms))
        if hit is not None and hit[0] is perms:
            return hit[1]
        frames: list[list[Any]] = []
        chunk: list[str] = []
        size = 0
        for p in self.visible(perms):
            if chunk and size + len(p) > CHUNK_CHARS:
                frames.append([F.Op.NOTICE, V.NOTICE_BINDINGS, {"epoch": self.epoch, "patterns": chunk, "more": True}])
                chunk, size = [], 0
            chunk.append(p)
            size += len(p) + 1
        frames.append([F.Op.NOTICE, V.NOTICE_BINDINGS, {"epoch": self.epoch, "patterns": chunk, "more": False}])
        self._frames[id(perms)] = (perms, frames)
        return frames

    def send(self, actor: ConnectionActor) -> None:
        """Queue the current set for ``actor`` (never blocks; never dropped)."""
        for f in self.frames(actor.perms):
            actor.push_wire(f, NOTICE_OVERHEAD + sum(len(p) + 1 for p in f[2]["patterns"]))

    def changed(self) -> None:
        """A queue or stream was declared or deleted: a new epoch for every
        connection past HELLO (before the declaring client's OK, which is
        queued after this)."""
        self.epoch += 1
        self._all = None
        self._frames.clear()
        for actor in self.connections.values():
            if actor.admitted:
                self.send(actor)

    def check_declare(self, kind: str, name: str, bind: tuple[str, ...] | list[str], rid: int) -> None:
        """Refuse a declare whose bind patterns exceed ``max_bind_patterns``,
        or would take the broker past ``max_bindings`` in total."""
        cfg = self.config
        if len(bind) > cfg.max_bind_patterns:
            raise RemoteProtocolError(
                f"{kind} {name!r} has {len(bind)} bind patterns; at most {cfg.max_bind_patterns} are allowed "
                "(max_bind_patterns)", ErrorCode.INVALID_ARGUMENT, rid=rid)
        d = self.durable
        total = (sum(len(q.cfg.bind) for q in d.queues.values())
                 + sum(len(st.cfg.bind) for st in d.streams.streams.values()))
        if total + len(bind) > cfg.max_bindings:
            raise RemoteProtocolError(
                f"the broker holds {total} bind patterns; {len(bind)} more would exceed max_bindings "
                f"({cfg.max_bindings})", ErrorCode.OVERLOADED, rid=rid)
