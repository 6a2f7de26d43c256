"""The optional JSON access log, formatted and written by a background thread.

The request path only appends a tuple to a queue; JSON encoding and file writes happen
off the event loop.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import IO, Any

_FIELDS = ("time", "client", "method", "target", "status", "service", "route", "session", "destination",
           "duration_ms", "bytes_out", "fallback", "grpc_status", "worker")


class AccessLog:
    """One JSON object per line, with the fields in ``_FIELDS``."""

    def __init__(self, path: str, worker: str) -> None:
        self._path = path
        self._worker = worker
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="turnout-access-log", daemon=True)
        self._thread.start()

    def record(self, *entry: Any) -> None:
        """Queue one entry (cheap: the hot path does nothing else)."""
        self._queue.put(entry)

    def close(self) -> None:
        """Flush and stop the writer thread."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        out: IO[str] = sys.stdout if self._path == "-" else open(self._path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            while True:
                entry = self._queue.get()
                if entry is None:
                    break
                lines = [self._format(entry)]
                while len(lines) < 512:  # batch what is already queued into one write
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        out.write("".join(lines))
                        return
                    lines.append(self._format(more))
                out.write("".join(lines))
                out.flush()
        finally:
            if out is not sys.stdout:
                out.close()

    def _format(self, entry: tuple[Any, ...]) -> str:
        record = dict(zip(_FIELDS, (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry[0])), *entry[1:],
                                    self._worker), strict=True))
        return json.dumps(record, separators=(",", ":")) + "\n"
