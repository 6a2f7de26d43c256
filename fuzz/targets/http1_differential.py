"""HTTP/1.1 differential: turnout with httptools and turnout with h11 must answer alike.

The same bytes go through turnout's whole HTTP/1.1 path twice, once per head codec, at the
level of the sans-I/O protocol objects (``H1Server`` for a client connection, ``H1Client``
for an upstream one, on recording fake transports; the event loop is never run). The first
byte of an input picks the role and how the rest is split into reads:

* bit 0 clear: the rest is what a client sends. Each request the proxy forwards is
  answered with a small fixed response, so pipelined requests behind it are read too; the
  client then half-closes.
* bit 0 set: the rest is what an upstream answers to a GET (bit 1: a WebSocket upgrade
  request; bit 2: HEAD instead), then the upstream half-closes.
* bits 3-7: the rest is delivered in two reads, split at that many 32nds of its length.

What must be equal: every byte the client receives and every byte the upstream receives,
and whether each side's connection was closed. The one thing allowed to differ is the
human-readable reason in the body of an error turnout makes (it may quote the codec's own
message); its status line and its ``x-turnout-error`` cause must not. An exception out of
the proxy on either side is a finding too.
"""

from __future__ import annotations

import asyncio
import re
import traceback
from typing import Any, cast

from dataplane.config import parse_config
from dataplane.http1.client import H1Client
from dataplane.http1.server import H1Server
from dataplane.proxy import Proxy
from filters import Address

CODECS = ("httptools", "h11")
_BASELINE = Address("127.0.0.1", 18080)
_CONFIG: dict[str, Any] = {
    "listeners": [{"name": "in", "address": "127.0.0.1:15001", "mode": "inbound", "service": "svc",
                   "baseline": str(_BASELINE)}],
    "limits": {"max_head_bytes": 4096, "max_request_line_bytes": 1024, "max_header_count": 32,
               "max_chunk_line_bytes": 256, "max_trailer_bytes": 1024},
}
# What the upstream answers each request the proxy forwards (request role).
_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
# What the client sends before the upstream's bytes (response role), by bits 1 and 2.
_REQUESTS = (
    b"GET /r HTTP/1.1\r\nHost: svc\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"HEAD /r HTTP/1.1\r\nHost: svc\r\n\r\n",
    b"HEAD /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
)
# An error turnout makes: its reason (the body, and so the length) may differ by codec.
_LOCAL_REPLY = re.compile(rb"(HTTP/1\.1 [0-9]{3} [^\r\n]*\r\ncontent-type: text/plain; charset=utf-8\r\n)"
                          rb"content-length: ([0-9]{1,6})\r\n(x-turnout-error: [^\r\n]*\r\n)")
_MAX_ANSWERS = 4  # pipelined requests answered per input
_PURGE_EVERY = 2000  # inputs between runs of the loop that drop cancelled timers


class _Transport:
    """Enough of an ``asyncio.Transport`` for the proxy's protocols; records what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.eof = False

    def write(self, data: bytes) -> None:
        if not self.closing and not self.eof:
            self.written.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 40000) if name == "peername" else default


Outcome = tuple[bytes, bytes, bool, bool]  # client bytes, upstream bytes, client closed, upstream closed


class _Side:
    """One proxy with one codec; a fresh client and upstream connection per input."""

    def __init__(self, codec: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxy = Proxy(parse_config(_CONFIG), codec, self.loop, "0")
        self.runs = 0

    def _connections(self) -> tuple[H1Server, _Transport, H1Client, _Transport]:
        proxy = self.proxy
        server = H1Server(proxy.router, proxy.connections, proxy.runtime.config.listeners[0])
        client = _Transport()
        server.connection_made(cast(asyncio.Transport, client))
        upstreams = proxy.upstreams
        conn = H1Client(upstreams, _BASELINE, proxy.runtime.limits, proxy.runtime.codec)
        upstream = _Transport()
        conn.connection_made(cast(asyncio.Transport, upstream))
        upstreams.h1.add(conn)
        upstreams.release(conn)
        return server, client, conn, upstream

    def run(self, role: int, pieces: list[bytes]) -> Outcome:
        """Feed one input; what each side received, and which connections were closed."""
        server, client, conn, upstream = self._connections()
        try:
            if role & 1:
                server.data_received(_REQUESTS[role >> 1 & 3])
                for piece in pieces:
                    if upstream.closing:
                        break
                    conn.data_received(piece)
                if not upstream.closing:
                    conn.eof_received()
            else:
                for piece in pieces:
                    if client.closing or client.eof:
                        break
                    server.data_received(piece)
                for _ in range(_MAX_ANSWERS):
                    if conn.listener is None or upstream.closing:
                        break
                    conn.data_received(_ANSWER)
                if not client.closing:
                    server.eof_received()
            return (_canonical(b"".join(client.written)), b"".join(upstream.written),
                    client.closing or client.eof, upstream.closing)
        finally:
            server.connection_lost(None)
            conn.connection_lost(None)
            self.runs += 1
            if self.runs % _PURGE_EVERY == 0:
                # Deadlines schedule timers on the loop, and cancelled ones leave the heap
                # only when the loop runs.
                self.loop.run_until_complete(asyncio.sleep(0))


def _canonical(data: bytes) -> bytes:
    """``data`` with the reason left out of every error turnout made."""
    parts = []
    pos = 0
    while (match := _LOCAL_REPLY.search(data, pos)) is not None:
        head_end = data.find(b"\r\n\r\n", match.end() - 2)
        if head_end == -1:
            break
        head_end += 4
        parts.append(data[pos:match.start()] + match.group(1) + match.group(3) + data[match.end():head_end])
        pos = head_end + int(match.group(2))
    parts.append(data[pos:])
    return b"".join(parts)


_sides: list[_Side] = []


def _both() -> list[_Side]:
    if not _sides:
        _sides.extend(_Side(codec) for codec in CODECS)
    return _sides


def _outcome(side: _Side, role: int, pieces: list[bytes]) -> Outcome | str:
    try:
        return side.run(role, pieces)
    except Exception:  # a crash is a finding of its own: reported with the other side's answer
        return traceback.format_exc()


def fuzz_one(data: bytes) -> None:
    """Raise ``AssertionError`` when the two codecs make turnout answer ``data`` differently."""
    if len(data) < 2:
        return
    control = data[0]
    rest = data[1:]
    cut = len(rest) * (control >> 3) // 32
    pieces = [rest[:cut], rest[cut:]] if 0 < cut < len(rest) else [rest]
    results = [_outcome(side, control & 7, pieces) for side in _both()]
    first, second = results
    if first != second or isinstance(first, str):
        lines = [f"input {data!r}"]
        for codec, result in zip(CODECS, results, strict=True):
            lines.append(f"--- {codec}:")
            if isinstance(result, str):
                lines.append(result)
            else:
                lines.append(f"client got {result[0]!r}")
                lines.append(f"upstream got {result[1]!r}")
                lines.append(f"client closed {result[2]}, upstream closed {result[3]}")
        raise AssertionError("\n".join(lines))


def seeds() -> list[bytes]:
    """Requests (first byte 0x00) and responses (0x01, 0x03 upgrade, 0x05 HEAD) to start from."""
    requests = [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /p?q=1 HTTP/1.1\r\nHost: a:8080\r\nUser-Agent: t/1\r\nAccept: */*\r\nX-A: a b \r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \r\n\r\nhello",
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:, chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a \r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET http://b/x HTTP/1.1\r\nHost: a\r\nConnection: close, x-a\r\nX-A: 1\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: a b \r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 006 X\r\n\r\n",
        b"HTTP/1.1 099 X\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    ]
    upgrades = [
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    ]
    return ([b"\x00" + r for r in requests] + [b"\x01" + r for r in responses] + [b"\x05" + r for r in responses[:2]]
            + [b"\x03" + r for r in upgrades] + [b"\x01" + r for r in upgrades])
