"""Counters every actor bumps; read by the stats call and metrics."""

from __future__ import annotations

import time
from typing import Any


class Stats:
    """Plain integer counters. Only the event loop thread touches them."""

    def __init__(self) -> None:
        self.started = time.time()
        self.published = 0
        self.dropped = 0
        self.slow_disconnects = 0
        self.connections_total = 0
        self.connections_refused = 0
        self.handshakes_evicted = 0  # closed before HELLO to make room (max_pending_handshakes*)
        self.accept_errors = 0  # accept() failed for lack of descriptors or memory
        self.errors: dict[int, int] = {}

    def count_error(self, code: int) -> None:
        self.errors[int(code)] = self.errors.get(int(code), 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime": time.time() - self.started,
            "published": self.published,
            "dropped": self.dropped,
            "slow_disconnects": self.slow_disconnects,
            "connections_total": self.connections_total,
            "connections_refused": self.connections_refused,
            "handshakes_evicted": self.handshakes_evicted,
            "accept_errors": self.accept_errors,
            "errors": {str(k): v for k, v in self.errors.items()},
        }
