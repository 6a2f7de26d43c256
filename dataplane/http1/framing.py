"""Message body framing, parsed strictly by turnout itself (RFC 9112 sections 6 and 7).

Decoders are sans-IO: ``feed(data)`` hands body bytes to ``on_data`` as they are decoded,
calls ``on_end(trailers)`` once at the end of the message, and returns the bytes that
follow the message (the next pipelined request, or nothing). Nothing is buffered beyond
one partial chunk-size or trailer line.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dataplane.errors import HttpError

OnData = Callable[[bytes], None]
OnEnd = Callable[[list[tuple[bytes, bytes]]], None]

# chunk = chunk-size [ chunk-ext ] CRLF; no whitespace anywhere (RFC 9112 section 7.1 allows
# BWS in extensions, but lenient size lines are how request smuggling starts). At most 15
# hex digits: 2**60 bytes is beyond any real body and keeps the int small.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb'|"[^"\\\r\n]*"))?)*)')
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_EMPTY: list[tuple[bytes, bytes]] = []
# Fields that must never arrive in a trailer (RFC 9110 section 6.5.1): framing, routing,
# hop-by-hop. They are dropped rather than forwarded.
_NOT_IN_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"te",
                              b"trailer", b"keep-alive", b"upgrade", b"proxy-connection", b"baggage"})


class ContentLengthDecoder:
    """A body of exactly ``length`` bytes."""

    __slots__ = ("remaining", "_on_data", "_on_end")

    def __init__(self, length: int, on_data: OnData, on_end: OnEnd) -> None:
        self.remaining = length
        self._on_data = on_data
        self._on_end = on_end

    def start(self) -> None:
        """Signal the end at once for an empty body."""
        if self.remaining == 0:
            self._on_end(_EMPTY)

    def feed(self, data: bytes) -> bytes:
        """Consume body bytes; returns what follows the body."""
        n = self.remaining
        if len(data) < n:
            self.remaining = n - len(data)
            self._on_data(data)
            return b""
        self.remaining = 0
        if n:
            self._on_data(data if len(data) == n else data[:n])
        self._on_end(_EMPTY)
        return data[n:]

    def eof(self) -> None:
        """The peer closed before the body was complete."""
        if self.remaining:
            raise HttpError(400, "connection closed before the end of the body", "truncated_body")


class UntilCloseDecoder:
    """A response body delimited by the connection closing (no length, not chunked)."""

    __slots__ = ("_on_data", "_on_end")
    remaining = -1

    def __init__(self, on_data: OnData, on_end: OnEnd) -> None:
        self._on_data = on_data
        self._on_end = on_end

    def start(self) -> None:
        """Nothing to signal until the peer closes."""

    def feed(self, data: bytes) -> bytes:
        """Everything is body."""
        if data:
            self._on_data(data)
        return b""

    def eof(self) -> None:
        """The close ends the body."""
        self._on_end(_EMPTY)


_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """A chunked body: strict size lines, CRLF after every chunk, bounded trailers."""

    __slots__ = ("_state", "_left", "_line", "_trailers", "_trailer_bytes", "_max_line", "_max_trailer",
                 "_on_data", "_on_end", "_status")
    remaining = -1

    def __init__(self, on_data: OnData, on_end: OnEnd, max_line_bytes: int, max_trailer_bytes: int,
                 status: int = 400) -> None:
        self._state = _SIZE
        self._left = 0
        # A partial size, CRLF or trailer line: appended to in place, so a line arriving a
        # byte at a time costs time linear in its length.
        self._line = bytearray()
        self._trailers: list[tuple[bytes, bytes]] = []
        self._trailer_bytes = 0
        self._max_line = max_line_bytes
        self._max_trailer = max_trailer_bytes
        self._on_data = on_data
        self._on_end = on_end
        self._status = status  # 400 for requests, 502 for upstream responses

    def start(self) -> None:
        """Nothing to signal before the first chunk."""

    def _fail(self, reason: str) -> HttpError:
        return HttpError(self._status, reason, "bad_chunked" if self._status == 400 else "upstream_bad_chunked")

    def feed(self, data: bytes) -> bytes:
        """Consume chunked bytes; returns what follows the final CRLF."""
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._left, end - pos)
                self._on_data(data[pos : pos + take] if take != end or pos else data)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_CRLF
            elif state == _DATA_CRLF:
                if not self._line and end - pos >= 2:  # the usual case: both bytes at hand
                    if data[pos] != 13 or data[pos + 1] != 10:
                        raise self._fail("missing CRLF after chunk data")
                    pos += 2
                    self._state = _SIZE
                    continue
                self._line += data[pos : pos + 1]
                pos += 1
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise self._fail("missing CRLF after chunk data")
                    self._line.clear()
                    self._state = _SIZE
                elif self._line != b"\r":
                    raise self._fail("missing CRLF after chunk data")
            elif state == _DONE:
                return data[pos:]
            else:
                nl = data.find(b"\n", pos)
                if nl == -1:
                    self._line += data[pos:]
                    if len(self._line) > (self._max_line if state == _SIZE else self._max_trailer):
                        raise self._fail("chunk size line too long" if state == _SIZE else "trailers too large")
                    return b""
                if self._line:
                    self._line += data[pos : nl + 1]
                    line = bytes(self._line)
                    self._line.clear()
                else:
                    line = data[pos : nl + 1]
                pos = nl + 1
                if state == _SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        return data[pos:] if self._state == _DONE else b""

    def _size_line(self, line: bytes) -> None:
        if len(line) > self._max_line:
            raise self._fail("chunk size line too long")
        if line[-2:] != b"\r\n":
            raise self._fail("chunk size line must end with CRLF")
        m = _CHUNK_LINE.fullmatch(line, 0, len(line) - 2)
        if m is None:
            raise self._fail("invalid chunk size line")
        size = int(m.group(1), 16)
        if size:
            self._left = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_bytes += len(line)
        if self._trailer_bytes > self._max_trailer:
            raise self._fail("trailers too large")
        if line[-2:] != b"\r\n":
            raise self._fail("trailer line must end with CRLF")
        if line == b"\r\n":
            self._state = _DONE
            self._on_end(self._trailers)
            return
        if line[:1] in (b" ", b"\t"):
            raise self._fail("obsolete line folding in trailer")
        m = _FIELD.fullmatch(line, 0, len(line) - 2)
        if m is None or _CONTROL.search(m.group(2)) is not None:
            raise self._fail("invalid trailer field")
        name = m.group(1).lower()
        if name not in _NOT_IN_TRAILERS:
            self._trailers.append((name, m.group(2)))

    def eof(self) -> None:
        """The peer closed before the last chunk."""
        if self._state != _DONE:
            raise self._fail("connection closed inside a chunked body")


Decoder = ContentLengthDecoder | ChunkedDecoder | UntilCloseDecoder


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body, as three buffers for ``writelines``."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The final chunk, with trailers rebuilt from parsed fields."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
