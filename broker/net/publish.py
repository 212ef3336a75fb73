"""The part of a publish that belongs to no connection: fan a batch of messages
out to their subscribers and find the ones durable targets must store.

    entries, confirms = route(router, durable_match, msgs)

Both publishers call it: the TCP connection actor (net/connection.py, once per
PUB frame, after its permission check) and the HTTP gateway (http/gateway.py,
once per request). What is per connection stays with the caller: permission
memo, counters, where the confirms go, pausing for memory, the free-disk check.

Hot path: one call per PUB frame, then per message one match-cache lookup in
each router and, for each subscriber, one ``push_msg`` (which never blocks).

Content filters (protocol/filters.py) never touch that loop: subscriptions
and bindings with a filter live apart (``Filtering``: plain filtered
subscriptions in their own router, filtered bindings in the durable layer's
``filtered`` router, filtered queue-group members flagged on their group),
and only while some exist does a frame take :func:`route_filtered`, which
evaluates each filter once per message and decodes a payload at most once
(reusing what the schema screen decoded).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Final

from tidings.protocol import vocabulary as V
from tidings.protocol.errors import ErrorCode
from tidings.protocol.filters import Filter, canonical, compile_filter

from tidings.broker.router import Router

MSG_OVERHEAD: Final = 24  # estimated envelope bytes per delivered message
#: Broker-internal position after the six PUB fields: the payload as the schema screen
#: decoded it (broker/schemas/registry.py), so filters need not decode it again.
P_DECODED: Final = 6


class Filtering:
    """Where content filters are (owned by the Broker, event loop thread).

    ``subs``: plain subscriptions with a filter (a Subscription's ``flt``);
    ``group_members``: filtered members of queue groups (kept in the main router,
    their group flagged); ``durable``: the durable layer's filtered bindings
    (durable/targets.py); ``decode(message)``: a message's payload as a JSON value
    when a schema binds its subject (else MISSING), for filters on ``data``."""

    def __init__(self, durable: Router[Any], decode: Callable[[list[Any]], Any]) -> None:
        self.subs: Router[Any] = Router()
        self.group_members = 0
        self.durable = durable
        self.decode = decode
        self._interned: weakref.WeakValueDictionary[str, Filter] = weakref.WeakValueDictionary()
        # In a cluster: ``on_interest(pattern, group, +1/-1)`` after each local subscription
        # is added or removed, so the other brokers learn this broker's interest (broker/cluster/).
        self.on_interest: Callable[[str, str | None, int], None] | None = None

    def compile(self, spec: Any) -> Filter:
        """``compile_filter(spec)`` (raises FilterError), one shared Filter per distinct
        filter while some subscription holds it, so a message is judged once per filter."""
        flt = compile_filter(spec)  # checks it (JSON values only) before it is a key
        key = canonical(spec)
        shared = self._interned.get(key)
        if shared is not None:
            return shared
        self._interned[key] = flt
        return flt

    @property
    def active(self) -> bool:
        """True while any filtered subscription or binding exists (read once per PUB frame)."""
        return bool(self.subs.count or self.group_members or self.durable.count)

    def add(self, router: Router[Any], sub: Any) -> None:
        """Register subscription ``sub`` (``sub.flt`` may be None) in the right router."""
        if self.on_interest is not None:
            self.on_interest(sub.pattern, sub.group, 1)
        if sub.flt is not None and sub.group is None:
            self.subs.add(sub.pattern, sub)
            return
        if sub.flt is not None:
            self.group_members += 1
        router.add(sub.pattern, sub, sub.group)

    def remove(self, router: Router[Any], sub: Any) -> None:
        """Undo :meth:`add`."""
        if self.on_interest is not None:
            self.on_interest(sub.pattern, sub.group, -1)
        if sub.flt is not None and sub.group is None:
            self.subs.remove(sub.pattern, sub)
            return
        if sub.flt is not None and router.remove(sub.pattern, sub, sub.group):
            self.group_members -= 1
            return
        router.remove(sub.pattern, sub, sub.group)


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


def route_filtered(router: Router[Any], durable_match: Callable[[str], Any] | None,
                   msgs: list[list[Any]], fl: Filtering) -> tuple[list[Any] | None, list[Any] | None]:
    """:func:`route` while filters exist (same arguments, same answer): a filtered
    subscription gets a message only if its filter matches, a queue group picks among
    its members whose filter matches, and a filtered binding stores it only if its
    filter matches. A confirm-asking message that some binding's pattern took but
    every filter refused is answered as taken (code 0): filtering it out was routing."""
    match = router.match
    fmatch = fl.subs.match if fl.subs.count else None
    dmatch = fl.durable.match if fl.durable.count else None
    decode = fl.decode
    confirms: list[Any] | None = None
    entries: list[Any] | None = None
    for m in msgs:
        subj = m[0]
        h = m[2]
        plain, groups = match(subj)
        fplain = fmatch(subj)[0] if fmatch is not None else ()
        targets = durable_match(subj) if durable_match is not None else None
        ftargets = dmatch(subj)[0] if dmatch is not None else ()
        taken = False
        # Per message: the payload decoded at most once (None: not yet), and the last filter's
        # verdict (subscriptions with the same filter share one compiled Filter: Filtering.compile).
        data: Any = None
        last_f: Any = None
        last_ok = False
        if plain or groups or fplain:
            payload = m[1]
            item = [subj, payload, h, m[3]]
            size = len(payload) + len(subj) + MSG_OVERHEAD
            if h:
                size += headers_size(h)
            for s in plain:
                s.conn.push_msg(s.sid, item, size)
                taken = True
            for s in fplain:
                f = s.flt
                if f is not last_f:
                    if f.needs_data and data is None:
                        data = m[P_DECODED] if len(m) > P_DECODED else decode(m)
                    last_f = f
                    last_ok = f.matches(h, data)
                if last_ok:
                    s.conn.push_msg(s.sid, item, size)
                    taken = True
            for g in groups:
                if g.filtered:
                    if data is None:
                        data = m[P_DECODED] if len(m) > P_DECODED else decode(m)
                    s = g.pick_matching(_verdict(h, data))
                    if s is None:
                        continue
                else:
                    s = g.pick()
                s.conn.push_msg(s.sid, item, size)
                taken = True
        filtered_out = False
        if ftargets:
            chosen = list(targets) if targets else []
            for ft in ftargets:
                f = ft.flt
                if ft.target not in chosen:
                    if f is not last_f:
                        if f.needs_data and data is None:
                            data = m[P_DECODED] if len(m) > P_DECODED else decode(m)
                        last_f = f
                        last_ok = f.matches(h, data)
                    if last_ok:
                        chosen.append(ft.target)
            filtered_out = not chosen
            targets = chosen
        if not taken and m[3] is not None and not targets:
            no_responders(router, m[3])
        if targets:
            if entries is None:
                entries = []
            entries.append((m, targets))
        elif m[4]:
            if confirms is None:
                confirms = []
            if taken or filtered_out:
                confirms.append([m[4], 0, None])
            else:
                confirms.append([m[4], int(ErrorCode.NO_ROUTE), f"no queue, stream or subscriber for {subj!r}"])
    return entries, confirms


def deliver_forwarded(router: Router[Any], fl: Filtering, msgs: list[list[Any]],
                      groups: dict[int, list[Any]] | None, remote: type) -> int:
    """Deliver messages another broker forwarded (broker/cluster/route.py) to this broker's
    own subscribers, through the same subscriptions, content filters and mailboxes as
    :func:`route_filtered`, and nothing else: never to another broker (items of type
    ``remote``), never to a durable target (the publishing broker stored it), never a
    no-responders answer (only the publishing broker knows that nobody listens).

    ``msgs`` are ``[subject, payload, headers, reply]``; ``groups`` maps a message's index
    to the queue groups the publishing broker chose this broker for, each as the Group
    object or None (gone here since), and one local member of each gets it. Returns the
    number of deliveries."""
    match = router.match
    fmatch = fl.subs.match if fl.subs.count else None
    decode = fl.decode
    n = 0
    for i, item in enumerate(msgs):
        subj = item[0]
        h = item[2]
        plain = match(subj)[0]
        size = len(item[1]) + len(subj) + MSG_OVERHEAD
        if h:
            size += headers_size(h)
        for s in plain:
            if type(s) is not remote:
                s.conn.push_msg(s.sid, item, size)
                n += 1
        data: Any = None
        if fmatch is not None:
            for s in fmatch(subj)[0]:
                f = s.flt
                if f.needs_data and data is None:
                    data = decode(item)
                if f.matches(h, data):
                    s.conn.push_msg(s.sid, item, size)
                    n += 1
        if groups is None:
            continue
        for g in groups.get(i, ()):
            if g is None or not g.members:
                continue  # its last local member left meanwhile: pub/sub is at most once
            if g.filtered:
                if data is None:
                    data = decode(item)
                ok = _verdict(h, data)
                s = next((m for m in g.members if m.flt is None or ok(m.flt)), None)
                if s is None:
                    continue
            else:
                s = g.members[g.next % len(g.members)]
                g.next += 1
            s.conn.push_msg(s.sid, item, size)
            n += 1
    return n


def _verdict(h: Any, data: Any) -> Callable[[Filter], bool]:
    """``filter -> does this message (headers ``h``, decoded ``data``) match it``, for a group's pick."""
    return lambda f: f.matches(h, data)


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
