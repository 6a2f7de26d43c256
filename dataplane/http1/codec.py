"""The two head codecs behind one interface: httptools (default) and h11 (``--http h11``).

A codec turns one complete head that passed ``scan.check_head`` into a ``RequestHead1``/``ResponseHead1``.
Header names come out lower-cased; values are the raw bytes. Codec exceptions are
translated into ``HttpError`` here, at the boundary.
"""

from __future__ import annotations

import re
from typing import Protocol

import h11

from dataplane.errors import HttpError

try:
    import httptools

    HAVE_HTTPTOOLS = True
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is the fallback
    HAVE_HTTPTOOLS = False


class RequestHead1:
    """A parsed HTTP/1.x request head (codec-neutral)."""

    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.version = version  # b"1.1" or b"1.0"
        self.headers = headers


class ResponseHead1:
    """A parsed HTTP/1.x response head (codec-neutral)."""

    __slots__ = ("status", "reason", "version", "headers")

    def __init__(self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers


class HeadCodec(Protocol):
    """Parses complete heads; raises ``HttpError`` for anything it refuses."""

    name: str

    def parse_request(self, head: bytes) -> RequestHead1:
        """Parse a request head ending in CRLF CRLF."""
        ...

    def parse_response(self, head: bytes) -> ResponseHead1:
        """Parse a response head ending in CRLF CRLF."""
        ...


def _request_version(head: bytes) -> bytes:
    # Both parsers accept more than HTTP/1.0 and 1.1 (llhttp takes RTSP/ and ICE/ too), but
    # check_head passes only request lines ending in " HTTP/1.0" or " HTTP/1.1".
    first = head.find(b"\r\n")
    return head[first - 3 : first]


class _HeadSink:
    __slots__ = ("url", "status", "headers")

    def __init__(self) -> None:
        self.url = b""
        self.status = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))


class HttptoolsCodec:
    """Heads parsed by httptools (llhttp): fast, strict."""

    name = "httptools"

    def parse_request(self, head: bytes) -> RequestHead1:
        """Parse a request head."""
        sink = _HeadSink()
        parser = httptools.HttpRequestParser(sink)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; upgrades are decided by turnout's semantics
        except httptools.HttpParserError as exc:
            raise HttpError(400, "malformed request: " + str(exc), "bad_request") from None
        version = _request_version(head)
        return RequestHead1(parser.get_method(), sink.url, version, sink.headers)

    def parse_response(self, head: bytes) -> ResponseHead1:
        """Parse a response head."""
        sink = _HeadSink()
        parser = httptools.HttpResponseParser(sink)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            raise HttpError(502, "malformed upstream response: " + str(exc), "upstream_bad_head") from None
        version = head[5:8]  # check_head passes only status lines starting "HTTP/1.0 " or "HTTP/1.1 "
        return ResponseHead1(parser.get_status_code(), sink.status, version, sink.headers)


# h11 merges repeated identical Content-Length lines (and "5, 5") into one before turnout
# sees them, where httptools refuses them; counting the raw lines makes both refuse.
_CONTENT_LENGTH_LINE = re.compile(rb"\r\ncontent-length[ \t]*:([^\r]*)", re.IGNORECASE)


def _one_content_length(head: bytes, status: int) -> None:
    lengths = _CONTENT_LENGTH_LINE.findall(head)
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        cause = "bad_framing" if status == 400 else "upstream_bad_framing"
        raise HttpError(status, "more than one Content-Length", cause)


class H11Codec:
    """Heads parsed by h11: pure Python, used with ``--http h11`` or without httptools."""

    name = "h11"

    def __init__(self, max_head_bytes: int) -> None:
        self._max = max_head_bytes + 1

    def parse_request(self, head: bytes) -> RequestHead1:
        """Parse a request head."""
        _one_content_length(head, 400)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max)
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(400, "malformed request: " + str(exc), "bad_request") from None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "malformed request", "bad_request")
        version = _request_version(head)
        return RequestHead1(event.method, event.target, version, list(event.headers))

    def parse_response(self, head: bytes) -> ResponseHead1:
        """Parse a response head."""
        _one_content_length(head, 502)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max)
        # h11 reads a response only after a request; this one is never sent anywhere.
        # It proposes an upgrade so that h11 accepts a 101; the proxy refuses unasked ones.
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[
            (b"host", b"upstream"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(head)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(502, "malformed upstream response: " + str(exc), "upstream_bad_head") from None
        if not isinstance(event, (h11.Response, h11.InformationalResponse)):
            raise HttpError(502, "malformed upstream response", "upstream_bad_head")
        version = head[5:8]  # check_head passes only status lines starting "HTTP/1.0 " or "HTTP/1.1 "
        return ResponseHead1(event.status_code, event.reason, version, list(event.headers))


def make_codec(name: str, max_head_bytes: int) -> HeadCodec:
    """``auto`` picks httptools when it imports, else h11; ``httptools``/``h11`` force one."""
    if name == "auto":
        name = "httptools" if HAVE_HTTPTOOLS else "h11"
    if name == "httptools":
        if not HAVE_HTTPTOOLS:
            raise ValueError("httptools is not installed; use --http h11")
        return HttptoolsCodec()
    if name == "h11":
        return H11Codec(max_head_bytes)
    raise ValueError(f"unknown HTTP/1.1 codec {name!r}; use auto, httptools or h11")
