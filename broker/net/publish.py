"""The part of a publish that belongs to no connection: fan a batch of messages
out to their subscribers and find the ones durable targets must store.

    entries, confirms = route(router, durable_match, msgs)

Both publishers call it: the TCP connection actor (net/connection.py, once per
PUB frame, after its permission check) and the HTTP gateway (http/gateway.py,
once per request). What is per connection stays with the caller: permission
memo, counters, where the confirms go, pausing for memory, the free-disk check.

Hot path: one call per PUB frame, then per message one match-cache lookup in
each router and, for each subscriber, one ``push_msg`` (which never blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Final

from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from tidings.broker.router import Router

MSG_OVERHEAD: Final = 24  # estimated envelope bytes per delivered message


def headers_size(h: dict[str, Any]) -> int:
    """Estimated bytes of a message's headers in a subscriber's mailbox."""
    n = 0
    for k, v in h.items():
        n += len(k) + (len(v) if type(v) is not int else 8) + 4
    return n


def route(router: Router[Any], durable_match: Callable[[str], Any] | None,
          msgs: list[list[Any]]) -> tuple[list[Any] | None, list[Any] | None]:
    """Deliver each PUB message (``[subject, payload, headers, reply, seq, opts]``)
    to its subscribers now (a queue group gets it once); answer a request nobody
    can answer with a no-responders message on its reply subject.

    Returns ``(entries, confirms)``: the ``(message, targets)`` pairs durable
    targets must store (None if none), and the CONFIRM items of messages that
    asked for a confirm but no durable target holds (None if none): ``[seq, 0, None]``
    when a subscriber took it, ``[seq, NO_ROUTE, reason]`` when nothing did."""
    match = router.match
    confirms: list[Any] | None = None
    entries: list[Any] | None = None
    for m in msgs:
        subj = m[0]
        plain, groups = match(subj)
        targets = durable_match(subj) if durable_match is not None else None
        if plain or groups:
            payload = m[1]
            h = m[2]
            item = [subj, payload, h, m[3]]
            size = len(payload) + len(subj) + MSG_OVERHEAD
            if h:
                size += headers_size(h)
            for s in plain:
                s.conn.push_msg(s.sid, item, size)
            for g in groups:
                s = g.pick()
                s.conn.push_msg(s.sid, item, size)
        elif m[3] is not None and not targets:
            # A request nobody can answer: tell the requester at once.
            no_responders(router, m[3])
        if targets:
            if entries is None:
                entries = []
            entries.append((m, targets))
        elif m[4]:
            # A confirm was asked for, but no durable target holds this subject: taken if
            # a live subscriber got it, else nothing has it (a mistyped subject, say).
            if confirms is None:
                confirms = []
            if plain or groups:
                confirms.append([m[4], 0, None])
            else:
                confirms.append([m[4], int(ErrorCode.NO_ROUTE), f"no queue, stream or subscriber for {subj!r}"])
    return entries, confirms


def no_responders(router: Router[Any], reply: str) -> None:
    """The broker's answer to a request no subscriber matched: an empty message on
    its reply subject with the no-responders status header."""
    plain, groups = router.match(reply)
    item = [reply, b"", {V.HDR_STATUS: V.STATUS_NO_RESPONDERS}, None]
    for s in plain:
        s.conn.push_msg(s.sid, item, 64)
    for g in groups:
        s = g.pick()
        s.conn.push_msg(s.sid, item, 64)
