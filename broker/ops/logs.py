"""Logging setup for the daemon: human text by default, JSON lines on request."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

#: Libraries whose DEBUG lines are not for operators, kept at INFO even with --log-level debug:
#: aiosqlite logs every SQL call with its parameters, i.e. message payloads (never log
#: payloads), and one line per call is also a heavy cost on the storage path.
QUIET_LIBRARIES: Final = ("aiosqlite",)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger to write to stderr (stdout carries the ready line)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
