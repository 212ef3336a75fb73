"""A queue's or stream's bindings in the publish routing tables.

A binding without a filter puts the actor itself in ``bindings`` (the router
the publish path matches for every message, unchanged by filters); a binding
with a filter puts a :class:`FilteredTarget` in ``filtered``, a router the
publish path looks at only while it holds something (net/publish.py), and
which keeps the filter compiled once.
"""

from __future__ import annotations

import json
from typing import Any

from tidings.protocol.filters import Filter, compile_filter

from tidings.broker.router import Router


class FilteredTarget:
    """One filtered binding: the queue or stream actor it stores into, and its filter."""

    __slots__ = ("target", "flt", "pattern")

    def __init__(self, target: Any, flt: Filter, pattern: str) -> None:
        self.target = target
        self.flt = flt
        self.pattern = pattern


def add_bindings(bindings: Router[Any], filtered: Router[FilteredTarget], actor: Any) -> None:
    """Register every binding of ``actor`` (its ``cfg.bind`` and ``cfg.bind_filters``)."""
    by: dict[str, list[str]] = {}
    for p, text in actor.cfg.bind_filters:
        by.setdefault(p, []).append(text)
    for p in actor.cfg.bind:
        texts = by.get(p)
        if texts is None:
            bindings.add(p, actor)
        else:
            for text in texts:
                filtered.add(p, FilteredTarget(actor, compile_filter(json.loads(text)), p))


def remove_bindings(bindings: Router[Any], filtered: Router[FilteredTarget], actor: Any) -> None:
    """Undo :func:`add_bindings` for ``actor``."""
    for p in actor.cfg.bind:
        bindings.remove(p, actor)
    if filtered.count:
        for p, ft, _g in list(filtered.items()):
            if ft.target is actor:
                filtered.remove(p, ft)
