"""Progress lines for benchmark runs that last more than a few seconds.

    progress = Progress("publish", total=500_000)
    for i in range(n):
        ...
        if not i & 1023:            # keep the hot loop's cost near zero
            progress.update(i)
    progress.finish(n)

Prints ``publish: 123,456/500,000 (25%)  98,765/s  1.3 s`` to stderr at most
once per ``interval`` seconds, and nothing at all for runs shorter than
``after`` seconds (a quick run's output stays clean). On a terminal the line
is rewritten in place; otherwise (a CI log, a pipe) one line per report.
stderr, never stdout: benchmarks print their JSON results on stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Final, TextIO

AFTER: Final = 3.0  # seconds of silence before the first progress line
INTERVAL: Final = 1.0  # seconds between progress lines


class Progress:
    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 after: float = AFTER, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._next = self.started + after
        self._printed = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int) -> None:
        """Report ``done`` units so far; prints only when a line is due."""
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.interval
        self._write(self.line(done, now), final=False)

    def finish(self, done: int) -> None:
        """End the run: a last line (only if progress was shown at all)."""
        if self._printed:
            self._write(self.line(done, self.clock()) + " done", final=True)

    def line(self, done: int, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        count = f"{done:,}" if self.total is None else f"{done:,}/{self.total:,} ({100 * done / self.total:.0f}%)"
        return f"{self.label}: {count}  {done / elapsed:,.0f}/s  {elapsed:.1f} s"

    def _write(self, text: str, *, final: bool) -> None:
        self._printed = True
        if self._tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
