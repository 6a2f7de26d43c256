"""Proxy log lines: one per event on standard error, each with a UTC timestamp and the pid."""

from __future__ import annotations

import json
import logging
import sys
import time


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 in UTC, to the millisecond."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        """One JSON object: time, pid, level, logger, message."""
        return json.dumps({"time": self.formatTime(record), "pid": record.process, "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def setup_logging(level: int = logging.INFO, as_json: bool = False) -> None:
    """``2026-12-07T13:45:01.123Z turnout[1234] WARNING message`` lines (or one JSON object a
    line) for every ``turnout.*`` logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else
                         _Formatter("%(asctime)s turnout[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("turnout")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
