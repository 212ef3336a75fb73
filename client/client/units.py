"""Seconds in the API, whole milliseconds on the wire."""

from __future__ import annotations

from typing import Any

from tidings.client.errors import InvalidArgumentError


def seconds_to_ms(seconds: Any, what: str, lo: int, hi: int) -> int:
    """Seconds as whole milliseconds, raised to ``lo`` if below it; above ``hi`` (the
    broker's range, protocol/numbers.py) or not a number: InvalidArgumentError, before
    anything is sent."""
    try:
        ms = float(seconds) * 1000
    except (TypeError, ValueError):
        ms = float("nan")
    if type(seconds) is bool or not ms <= hi:  # NaN fails the comparison
        raise InvalidArgumentError(f"{what} must be a number of seconds up to {hi // 1000}")
    return max(lo, int(ms))
