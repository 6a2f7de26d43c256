"""HTTP/1.1 bad input (docs/hardening.md): malformed and ambiguous requests against the real proxy.

Every case runs over both codecs (the ``stack`` fixture is parametrized) and checks two
sides: what the client got (status, a body and ``x-turnout-error`` naming the problem,
the connection closed) and what the upstreams received (nothing smuggled, nothing that
should have been refused). After each attack a sentinel request proves the proxy still
serves and gives stray upstream traffic time to show up before the upstream-side asserts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import CODECS, Stack
from tests.integration.support import (
    ProxyProcess,
    RawUpstream,
    Received,
    RecordingUpstream,
    Response,
    free_port,
    inbound,
    parse_responses,
    raw_exchange,
    running_proxy,
)

SENTINEL = "/__hardening_sentinel"
_SENTINEL_RAW = re.compile(rb"GET " + SENTINEL.encode() + rb" HTTP/1\.1\r\n.*?\r\n\r\n", re.S)
CLOSE = b"Connection: close\r\n"

# --------------------------------------------------------------------------- raw client


@dataclass
class Outcome:
    """What came back on one client connection, and whether the proxy closed it."""

    data: bytes
    closed: bool

    def responses(self) -> list[Response]:
        """The responses in the byte stream."""
        return parse_responses(self.data)


def _has_response(data: bytes | bytearray) -> bool:
    """Whether ``data`` starts with one complete Content-Length-framed response."""
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return False
    match = re.search(rb"\r\ncontent-length: *([0-9]+)", data[:end], re.I)
    return match is not None and len(data) >= end + 4 + int(match.group(1))


def _read_until_close(s: socket.socket, timeout_s: float, close_grace_s: float | None = None) -> Outcome:
    # With ``close_grace_s``, a connection still open that long after a complete response
    # counts as kept open: turnout closes in the same step as it writes an error.
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while True:
        if close_grace_s is not None and _has_response(out):
            deadline = min(deadline, time.monotonic() + close_grace_s)
            close_grace_s = None
        left = deadline - time.monotonic()
        if left <= 0:
            return Outcome(bytes(out), False)
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except TimeoutError:
            return Outcome(bytes(out), False)
        except OSError:  # reset: closed, and whatever was read stays valid
            return Outcome(bytes(out), True)
        if not data:
            return Outcome(bytes(out), True)
        out += data


def send(port: int, data: bytes, timeout_s: float = 5.0, close_grace_s: float | None = None) -> Outcome:
    """Send raw bytes in one write, read until the proxy closes or the timeout passes.

    A failed send is tolerated: the proxy may close while an oversized request is still
    being written, and what it answered before that is what the test checks.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        return _read_until_close(s, timeout_s, close_grace_s)


def _recv_until(s: socket.socket, timeout_s: float, done: Callable[[bytearray], bool]) -> bytes:
    """Read until ``done(received)``, the peer closes, or the timeout."""
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while not done(out):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        out += data
    return bytes(out)


def read_response(s: socket.socket, timeout_s: float) -> bytes:
    """Read until one complete response has arrived, the peer closes, or the timeout."""
    return _recv_until(s, timeout_s, _has_response)


def read_head(s: socket.socket, timeout_s: float) -> bytes:
    """Read until a blank line (the end of a head) shows up, the peer closes, or the timeout."""
    return _recv_until(s, timeout_s, lambda out: b"\r\n\r\n" in out)


# --------------------------------------------------------------------------- upstream side


class Watch:
    """What the stack's upstreams receive from now on."""

    def __init__(self, stack: Stack) -> None:
        stack.reset()
        self.stack = stack
        self.ups = (stack.baseline, stack.sandbox, stack.mirror)
        self._raw_before = {up.label: list(up.raw) for up in self.ups}

    def settle(self) -> None:
        """Prove the proxy still answers, then give upstream threads a moment to record."""
        sentinel = send(self.stack.port, b"GET " + SENTINEL.encode() + b" HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
        responses = sentinel.responses()
        assert [r.status for r in responses] == [200], f"proxy stopped answering: {sentinel.data[:300]!r}"
        time.sleep(0.05)

    def requests(self, up: RecordingUpstream) -> list[Received]:
        """Complete requests the upstream received, sentinels left out."""
        return [r for r in up.requests if r.target != SENTINEL]

    def raw(self, up: RecordingUpstream) -> bytes:
        """Every byte the upstream received since the watch started, sentinels cut out."""
        before = self._raw_before[up.label]
        now = list(up.raw)
        parts = [now[i][len(before[i]) :] if i < len(before) else now[i] for i in range(len(now))]
        return _SENTINEL_RAW.sub(b"", b"".join(parts))

    def all_raw(self) -> bytes:
        """Bytes received by any upstream."""
        return b"".join(self.raw(up) for up in self.ups)

    def assert_nothing_forwarded(self) -> None:
        """Not one byte of the request reached any upstream."""
        self.settle()
        for up in self.ups:
            assert self.requests(up) == [], f"{up.label} received {self.requests(up)}"
            assert self.raw(up) == b"", f"{up.label} received raw bytes {self.raw(up)[:300]!r}"

    def assert_no_complete_request(self, *markers: bytes) -> None:
        """The head may have been streamed on, but no request completed upstream and none of
        ``markers`` (smuggled bytes) was ever sent."""
        self.settle()
        for up in self.ups:
            assert self.requests(up) == [], f"{up.label} received {self.requests(up)}"
        raw = self.all_raw()
        for marker in markers:
            assert marker not in raw, f"{marker!r} reached an upstream: {raw[:400]!r}"


def assert_rejected(out: Outcome, statuses: int | tuple[int, ...], says: str) -> Response:
    """One error response with a status in ``statuses``, whose ``x-turnout-error`` and body
    match the regex ``says``, and the connection closed."""
    allowed = (statuses,) if isinstance(statuses, int) else statuses
    responses = out.responses()
    assert len(responses) == 1, f"expected exactly one response, got {out.data[:600]!r}"
    r = responses[0]
    assert r.status in allowed, f"status {r.status} not in {allowed}: {out.data[:600]!r}"
    error = r.header("x-turnout-error")
    assert error, f"no x-turnout-error header: {out.data[:600]!r}"
    assert r.body.strip(), "error response without a body"
    text = (error + "\n" + r.body.decode("latin-1")).lower()
    assert re.search(says, text), f"error does not say {says!r}: {text!r}"
    assert r.header("connection") == "close"
    assert out.closed, "the proxy kept the connection open after a refused request"
    return r


def reject(stack: Stack, request: bytes, statuses: int | tuple[int, ...], says: str, timeout_s: float = 5.0) -> None:
    """Send a request that must be refused at the head: answered, closed, nothing forwarded."""
    watch = Watch(stack)
    assert_rejected(send(stack.port, request, timeout_s, close_grace_s=1.0), statuses, says)
    watch.assert_nothing_forwarded()


def ok(out: Outcome, count: int = 1) -> list[Response]:
    """``count`` successful responses (the last request asked to close)."""
    responses = out.responses()
    assert [r.status for r in responses] == [200] * count, out.data[:600]
    assert out.closed
    return responses


# --------------------------------------------------------------------------- framing: CL and TE


@pytest.mark.parametrize("head", [
    b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
], ids=["cl-te", "te-cl", "te-cl0"])
def test_content_length_with_transfer_encoding_is_refused(stack: Stack, head: bytes) -> None:
    # The classic CL.TE / TE.CL desync: read as chunked, the body is "0\r\n\r\n" and a second
    # request follows; read by Content-Length, the bytes split somewhere else.
    request = b"POST /clte HTTP/1.1\r\nHost: a\r\n" + head + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reject(stack, request, 400, r"content-length|transfer-encoding|framing")


@pytest.mark.parametrize(("coding", "statuses"), [
    (b"chunked, identity", 400),
    (b"identity, chunked", (400, 501)),
    (b"xchunked", (400, 501)),
    (b"gzip", (400, 501)),
    (b"gzip, chunked", (400, 501)),
    (b"identity", (400, 501)),
    (b"chunked;q=1", (400, 501)),
    (b'"chunked"', (400, 501)),
], ids=["chunked-identity", "identity-chunked", "xchunked", "gzip", "gzip-chunked", "identity", "chunked-param",
        "quoted"])
def test_transfer_encoding_other_than_plain_chunked_is_refused(stack: Stack, coding: bytes,
                                                               statuses: int | tuple[int, ...]) -> None:
    # With a Content-Length-free body, a lenient proxy would fall back to read-to-close.
    request = (b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
               b"1\r\nA\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    reject(stack, request, statuses, r"transfer.encoding|transfer coding|framing|coding")


@pytest.mark.parametrize("lines", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
], ids=["twice-chunked", "gzip-then-chunked", "chunked-then-identity"])
def test_two_transfer_encoding_lines_are_refused(stack: Stack, lines: bytes) -> None:
    request = b"POST /te2 HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n1\r\nA\r\n0\r\n\r\n"
    reject(stack, request, (400, 501), r"transfer.encoding|framing")


@pytest.mark.parametrize("line", [
    b"Transfer-Encoding : chunked",
    b"Transfer-Encoding\t: chunked",
    b"Content-Length : 5",
    b"Host : a",
], ids=["te-space", "te-tab", "cl-space", "host-space"])
def test_whitespace_before_colon_is_refused(stack: Stack, line: bytes) -> None:
    host = b"" if line.startswith(b"Host") else b"Host: a\r\n"
    request = b"POST /ws HTTP/1.1\r\n" + host + line + b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reject(stack, request, 400, r"header|token|char|malformed")


@pytest.mark.parametrize("lengths", [
    b"Content-Length: 1\r\nContent-Length: 2\r\n",
    b"Content-Length: 2\r\nContent-Length: 1\r\n",
    b"Content-Length: 1, 2\r\n",
], ids=["1-then-2", "2-then-1", "list-1-2"])
def test_conflicting_content_lengths_are_refused(stack: Stack, lengths: bytes) -> None:
    request = b"POST /cl HTTP/1.1\r\nHost: a\r\n" + lengths + b"\r\nABGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reject(stack, request, 400, r"content-length|framing")


@pytest.mark.parametrize("lengths", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
], ids=["two-lines", "one-line-list"])
def test_duplicate_identical_content_lengths_are_refused_by_both_codecs(stack: Stack, lengths: bytes) -> None:
    # RFC 9112 section 6.3 allows either merging or refusing; turnout refuses, and it must
    # do so whichever codec is in use (h11 silently merges them, httptools refuses).
    request = b"POST /cl HTTP/1.1\r\nHost: a\r\n" + lengths + CLOSE + b"\r\nhello"
    reject(stack, request, 400, r"content-length|framing")


@pytest.mark.parametrize("value", [
    b"+1", b"-1", b"0x1", b"1_0", b"1 0", b"9" * 25, b"1" * 4301, b"1.0", b"1e3", b"", b"\xd9\xa1",
], ids=["plus", "minus", "hex", "underscore", "inner-space", "25-digits", "4301-digits", "decimal", "exponent",
        "empty", "arabic-digit"])
def test_invalid_content_length_is_refused(stack: Stack, value: bytes) -> None:
    request = (b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\n"
               b"AGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    reject(stack, request, 400, r"content-length|framing")


def test_content_length_with_leading_zeros_is_valid_and_frames_exactly(stack: Stack) -> None:
    # 007 is seven bytes, not octal and not "0": the bytes after them are the next request.
    watch = Watch(stack)
    request = (b"POST /seven HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n1234567"
               b"GET /after HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    responses = ok(send(stack.port, request), 2)
    assert [json.loads(r.body)["target"] for r in responses] == ["/seven", "/after"]
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [(r.method, r.target, r.body) for r in got] == [("POST", "/seven", b"1234567"), ("GET", "/after", b"")]
    assert got[0].header("content-length") == "7"


def test_get_with_a_body_that_looks_like_a_request_stays_a_body(stack: Stack) -> None:
    watch = Watch(stack)
    inner = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    request = b"GET /outer HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n" % len(inner) + CLOSE + b"\r\n" + inner
    ok(send(stack.port, request))
    watch.settle()
    assert [(r.target, r.body) for r in watch.requests(stack.baseline)] == [("/outer", inner)]


def test_http10_with_transfer_encoding_is_refused_and_closed(stack: Stack) -> None:
    request = (b"POST /old HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"1\r\nA\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    reject(stack, request, 400, r"transfer-encoding|framing|http/1\.0")


# --------------------------------------------------------------------------- chunked bodies


def _chunked(body: bytes, tail: bytes = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n") -> bytes:
    return b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body + tail


@pytest.mark.parametrize("body", [
    b"0x1\r\nA\r\n0\r\n\r\n",
    b"1 \r\nA\r\n0\r\n\r\n",
    b" 1\r\nA\r\n0\r\n\r\n",
    b"-1\r\nA\r\n0\r\n\r\n",
    b"+1\r\nA\r\n0\r\n\r\n",
    b"1" * 20 + b"\r\nA\r\n0\r\n\r\n",
    b"1\nA\n0\n\n",
    b"1\r\nA\r\n0\n\n",
    b"\r\n1\r\nA\r\n0\r\n\r\n",
    b"1;ext\nA\r\n0\r\n\r\n",
    b"1;a=\"x\ny\"\r\nA\r\n0\r\n\r\n",
    b"1;a b\r\nA\r\n0\r\n\r\n",
    b"1\x00\r\nA\r\n0\r\n\r\n",
    b"1;" + b"e" * 5000 + b"\r\nA\r\n0\r\n\r\n",
    b"1\r\nA\r\n0\r\nX-Folded: a\r\n b\r\n\r\n",
    b"1\r\nA\r\n0\r\nX-Bad\x01: a\r\n\r\n",
    b"0" * 4000 + b"1\r\nA\r\n0\r\n\r\n",
    b"1" * 4301 + b"\r\nA\r\n0\r\n\r\n",
], ids=["hex-prefix", "trailing-space", "leading-space", "minus", "plus", "20-hex-digits", "lf-only",
        "lf-only-last-chunk", "empty-size-line", "ext-bare-lf", "ext-quoted-lf", "ext-space", "nul",
        "size-line-too-long", "trailer-obs-fold", "trailer-control-char", "4000-leading-zeros", "4301-digits"])
def test_invalid_chunked_body_is_refused(stack: Stack, body: bytes) -> None:
    watch = Watch(stack)
    assert_rejected(send(stack.port, _chunked(body)), 400, r"chunk|trailer")
    # The head may already be on its way upstream (bodies stream), but the request must
    # never complete there and the bytes after the bad line must never be read as a request.
    watch.assert_no_complete_request(b"/smuggled")


@pytest.mark.parametrize("body", [
    b"1\r\nAXX0\r\n\r\n",
    b"1\r\nA\n0\r\n\r\n",
    b"1\r\nA\r0\r\n\r\n",
    b"2\r\nA\r\n0\r\n\r\n",
], ids=["no-crlf", "lf-only", "cr-only", "short-chunk"])
def test_missing_crlf_after_chunk_data_is_refused(stack: Stack, body: bytes) -> None:
    watch = Watch(stack)
    out = send(stack.port, _chunked(body))
    assert_rejected(out, 400, r"chunk|crlf")
    # "XX0" is neither the next chunk size nor a next request, and nothing after it ran.
    watch.assert_no_complete_request(b"XX0", b"/smuggled")


def test_valid_chunked_body_is_rebuilt_not_copied(stack: Stack) -> None:
    # Control for the cases above: a well-formed body with an extension and trailers. The
    # upstream gets chunks rebuilt from parsed data: no extension, no framing or routing
    # fields smuggled in trailers, and the pipelined request after it is served on its own.
    watch = Watch(stack)
    body = (b"3;ext=1\r\nabc\r\n2;q=\"v\"\r\nde\r\n0\r\n"
            b"X-Checksum: 7\r\nContent-Length: 100\r\nHost: evil\r\nTransfer-Encoding: chunked\r\n"
            b"baggage: turnout-session=steal\r\n\r\n")
    out = send(stack.port, _chunked(body, b"GET /next HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n"))
    assert [json.loads(r.body)["target"] for r in ok(out, 2)] == ["/chunked", "/next"]
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [(r.target, r.body) for r in got] == [("/chunked", b"abcde"), ("/next", b"")]
    raw = watch.raw(stack.baseline)
    assert b"ext=1" not in raw and b"q=" not in raw
    trailer = raw[raw.index(b"\r\n0\r\n") + 5 :]
    assert trailer.lower().startswith(b"x-checksum: 7\r\n")
    for name in (b"content-length", b"host", b"transfer-encoding", b"baggage"):
        assert name not in trailer.split(b"\r\n\r\n")[0].lower()
    assert not watch.requests(stack.sandbox)


# --------------------------------------------------------------------------- head bytes


@pytest.mark.parametrize("value", [b"a\x0bb", b"a\x0cb", b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb", b"\x1b[31m"],
                         ids=["vt", "ff", "nul", "soh", "del", "bare-cr", "esc"])
def test_control_bytes_in_a_header_value_are_refused(stack: Stack, value: bytes) -> None:
    reject(stack, b"GET /ctl HTTP/1.1\r\nHost: a\r\nX-Odd: " + value + b"\r\n\r\n", 400,
           r"control|char|line.ending|bare cr|malformed|header")


@pytest.mark.parametrize("line", [
    b"Transfer-Encoding: \x0bchunked",
    b"Transfer-Encoding: chunked\x00",
    b"Content-Length: 1\x0c",
    b"baggage: turnout-session=steal\x01",
    b"Host: a\x7f",
    b"X-Odd\x00: a",
], ids=["te-vt", "te-nul", "cl-ff", "baggage-soh", "host-del", "nul-in-name"])
def test_control_bytes_in_framing_and_routing_fields_are_refused(stack: Stack, line: bytes) -> None:
    host = b"" if line.startswith(b"Host") else b"Host: a\r\n"
    reject(stack, b"POST /ctl HTTP/1.1\r\n" + host + line + b"\r\n\r\n0\r\n\r\n", 400,
           r"control|char|malformed|header")


@pytest.mark.parametrize("lines", [
    b"Host: a\r\nX-A: 1\r\n folded\r\n",
    b"Host: a\r\nX-A: 1\r\n\tfolded\r\n",
    b"Host: a\r\nTransfer-Encoding: identity\r\n chunked\r\n",
    b"Host: a\r\nbaggage: x=1,\r\n turnout-session=steal\r\n",
    b" Host: a\r\n",
    b"Host: a\r\n \r\n",
], ids=["space", "tab", "inside-te", "inside-baggage", "first-line", "whitespace-only-line"])
def test_obs_fold_is_refused_not_unfolded(stack: Stack, lines: bytes) -> None:
    reject(stack, b"POST /fold HTTP/1.1\r\n" + lines + b"\r\n0\r\n\r\n", 400,
           r"fold|header|malformed|char|token")


@pytest.mark.parametrize("line", [
    b"X-Name : v", b"X-Name\t: v", b"X-\xc3\xa9: v", b": v", b"X Name: v", b"X-Name", b"X-[x]: v",
], ids=["space-before-colon", "tab-before-colon", "non-ascii", "empty-name", "space-in-name", "no-colon",
        "separator-in-name"])
def test_malformed_header_names_are_refused(stack: Stack, line: bytes) -> None:
    reject(stack, b"GET /names HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n", 400, r"header|token|char|malformed")


def test_cr_only_line_endings_are_refused_at_once(stack: Stack) -> None:
    # A lone CR is never a line end (RFC 9112 section 2.2); waiting for an LF that will not
    # come ties the connection up until the head timeout (10 s). Refuse it when it is seen.
    reject(stack, b"GET / HTTP/1.1\rHost: a\r\rGET /smuggled HTTP/1.1\rHost: a\r\r", 400, r"cr|line|malformed",
           timeout_s=3.0)


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\n",
], ids=["lf-only", "one-bare-lf", "leading-bare-lf", "lf-blank-line"])
def test_bare_lf_line_endings_are_refused(stack: Stack, request_bytes: bytes) -> None:
    reject(stack, request_bytes, 400, r"lf|line|malformed")


# --------------------------------------------------------------------------- request line


@pytest.mark.parametrize("line", [
    b"GET /a b HTTP/1.1",
    b"GET / HTTP/1.32",
    b"GET /a\x00b HTTP/1.1",
    b"GET\t/ HTTP/1.1",
    b"GET /\t HTTP/1.1",
    b"GET  / HTTP/1.1",
    b"GET / HTTP/1.1 ",
    b" GET / HTTP/1.1",
    b"GET / http/1.1",
    b"GET / HTTP/2.0",
    b"GET / HTTP/1.1 HTTP/1.1",
    b"GET /",
    b"GET * HTTP/1.1",
    b"GET /\xc3\xa9 HTTP/1.1",
    b"G\x00ET / HTTP/1.1",
], ids=["space-in-target", "http-1.32", "nul-in-path", "tab-separator", "tab-in-target", "double-space",
        "trailing-space", "leading-space", "lower-case-version", "http-2.0", "two-versions", "http-0.9",
        "asterisk-for-get", "non-ascii-target", "nul-in-method"])
def test_bad_request_line_is_refused(stack: Stack, line: bytes) -> None:
    reject(stack, line + b"\r\nHost: a\r\n\r\n", 400,
           r"request|version|target|method|char|url|malformed|control|space")


def test_fragment_in_origin_form_target_is_refused(stack: Stack) -> None:
    # A fragment is not part of any request-target (RFC 9112 section 3.2); turnout already
    # refuses it in absolute-form. Routing on "/admin#x" while the upstream serves "/admin"
    # would let a path filter and the upstream disagree.
    reject(stack, b"GET /admin#x HTTP/1.1\r\nHost: a\r\n\r\n", 400, r"fragment|target")


def test_http2_preface_is_served_as_http2_never_parsed_as_http1(stack: Stack) -> None:
    # Prior-knowledge HTTP/2 shares the port: the exact preface gets the server's SETTINGS
    # frame (type 4 on stream 0), not an HTTP/1.1 reply.
    data = raw_exchange(stack.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", timeout_s=1.0)
    assert not data.startswith(b"HTTP/1."), data[:80]
    assert len(data) >= 9 and data[3] == 0x04 and data[5:9] == b"\x00\x00\x00\x00", data[:80]


def test_a_near_http2_preface_is_refused_as_http1(stack: Stack) -> None:
    reject(stack, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", 400, r"version|malformed|method")


def test_connect_is_refused_with_405(stack: Stack) -> None:
    reject(stack, b"CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n", 405, r"connect|method")


# --------------------------------------------------------------------------- Host and targets


def test_missing_host_is_refused(stack: Stack) -> None:
    reject(stack, b"GET /nohost HTTP/1.1\r\nX-A: b\r\n\r\n", 400, r"host")


@pytest.mark.parametrize("lines", [
    b"Host: a\r\nHost: b\r\n",
    b"Host: a\r\nHost: a\r\n",
    b"Host: a\r\nHOST: b\r\n",
    b"Host: a, b\r\n",
], ids=["different", "identical", "mixed-case", "comma-list"])
def test_two_hosts_are_refused(stack: Stack, lines: bytes) -> None:
    reject(stack, b"GET /hosts HTTP/1.1\r\n" + lines + b"\r\n", 400, r"host")


@pytest.mark.parametrize("value", [
    b"", b"a b", b"a/b", b"user@a", b"[::1", b"a:8x", b"a:123456", b"a\\b", b"a?b", b"a#b",
], ids=["empty", "space", "slash", "userinfo", "open-bracket", "bad-port", "long-port", "backslash", "query",
        "fragment"])
def test_invalid_host_is_refused(stack: Stack, value: bytes) -> None:
    reject(stack, b"GET /badhost HTTP/1.1\r\nHost: " + value + b"\r\n\r\n", 400, r"host")


def test_absolute_form_routes_on_and_forwards_the_target_authority(stack: Stack) -> None:
    watch = Watch(stack)
    request = (b"GET http://Other:8080/p?q=1 HTTP/1.1\r\nHost: svc\r\nbaggage: turnout-session=steal\r\n"
               + CLOSE + b"\r\n")
    r = ok(send(stack.port, request))[0]
    assert r.header("x-upstream") == "sandbox"
    watch.settle()
    got = watch.requests(stack.sandbox)
    assert [(g.target, g.header("host")) for g in got] == [("/p?q=1", "other:8080")]
    assert got[0].header_names().count("host") == 1
    assert not watch.requests(stack.baseline)
    # The URI is gone: the upstream reads an origin-form target and the same Host that
    # the routing decision saw.
    assert b"GET /p?q=1 HTTP/1.1\r\n" in watch.raw(stack.sandbox)
    assert b"svc" not in watch.raw(stack.sandbox)


def test_absolute_form_without_host_is_refused(stack: Stack) -> None:
    # HTTP/1.1 requires Host even with an absolute-form target (RFC 9112 section 3.2).
    reject(stack, b"GET http://other/ HTTP/1.1\r\n\r\n", 400, r"host")


@pytest.mark.parametrize("target", [
    b"http://user@other/", b"http://other#x/", b"ftp://other/", b"http:///p", b"http://oth er/",
], ids=["userinfo", "fragment", "ftp", "empty-authority", "space"])
def test_bad_absolute_form_targets_are_refused(stack: Stack, target: bytes) -> None:
    reject(stack, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400, r"target|authority|request|url|char")


def test_target_starting_with_two_slashes_is_a_path_not_an_authority(stack: Stack) -> None:
    watch = Watch(stack)
    ok(send(stack.port, b"GET //other/p?x HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n"))
    watch.settle()
    assert [(r.target, r.header("host")) for r in watch.requests(stack.baseline)] == [("//other/p?x", "a")]


def test_http10_without_host_is_forwarded_with_a_valid_host(stack: Stack) -> None:
    # HTTP/1.0 may omit Host, but turnout forwards as HTTP/1.1, where Host is mandatory.
    watch = Watch(stack)
    out = send(stack.port, b"GET /ten HTTP/1.0\r\n\r\n")
    responses = out.responses()
    assert [r.status for r in responses] == [200], out.data[:400]
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [r.target for r in got] == ["/ten"]
    assert got[0].header("host")


# --------------------------------------------------------------------------- pipelining


@pytest.mark.parametrize(("bad", "says"), [
    (b"POST /bad HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nAB", r"content-length"),
    (b"GET /bad HTTP/1.1\r\nHost: a\r\nX-Odd: a\x01b\r\n\r\n", r"control|char"),
    (b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", r"host"),
], ids=["conflicting-cl", "control-byte", "two-hosts"])
def test_pipelined_bad_then_good_in_one_packet_never_runs_the_good_one(stack: Stack, bad: bytes, says: str) -> None:
    watch = Watch(stack)
    good = b"GET /second HTTP/1.1\r\nHost: a\r\nbaggage: turnout-session=steal\r\n\r\n"
    assert_rejected(send(stack.port, bad + good), 400, says)
    watch.assert_nothing_forwarded()


def test_pipelined_bad_chunked_body_then_good_never_runs_the_good_one(stack: Stack) -> None:
    watch = Watch(stack)
    good = b"GET /second HTTP/1.1\r\nHost: a\r\nbaggage: turnout-session=steal\r\n\r\n"
    assert_rejected(send(stack.port, _chunked(b"1\r\nA\r\nzz\r\n", good)), 400, r"chunk")
    watch.assert_no_complete_request(b"/second")


def test_pipelined_good_then_bad_serves_only_the_first(stack: Stack) -> None:
    watch = Watch(stack)
    good = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
    bad = b"GET /bad HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    out = send(stack.port, good + bad + b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
    responses = out.responses()
    assert [r.status for r in responses] == [200, 400], out.data[:600]
    assert responses[1].header("x-turnout-error") and out.closed
    watch.settle()
    assert [r.target for r in watch.requests(stack.baseline)] == ["/first"]
    assert b"/bad" not in watch.all_raw() and b"/third" not in watch.all_raw()


@pytest.mark.parametrize("keys", [("steal", None, "steal"), (None, "steal", None)], ids=["sbs", "bsb"])
def test_pipelined_requests_are_each_routed_on_their_own_baggage(stack: Stack,
                                                                 keys: tuple[str | None, ...]) -> None:
    watch = Watch(stack)
    data = b""
    for i, key in enumerate(keys):
        data += b"GET /p%d HTTP/1.1\r\nHost: a\r\n" % i
        if key is not None:
            data += b"baggage: turnout-session=" + key.encode() + b"\r\n"
        data += CLOSE + b"\r\n" if i == len(keys) - 1 else b"\r\n"
    responses = ok(send(stack.port, data), len(keys))
    expected = ["sandbox" if k else "baseline" for k in keys]
    assert [r.header("x-upstream") for r in responses] == expected
    watch.settle()
    assert [r.target for r in watch.requests(stack.sandbox)] == [f"/p{i}" for i, k in enumerate(keys) if k]
    assert [r.target for r in watch.requests(stack.baseline)] == [f"/p{i}" for i, k in enumerate(keys) if not k]
    assert all(r.header("baggage") is None for r in watch.requests(stack.baseline))


# --------------------------------------------------------------------------- oversize heads


def test_request_line_over_the_line_limit_gets_414(stack: Stack) -> None:
    # 10 KB fits in the head limit (60 KiB) but not in the request-line limit (8 KiB).
    reject(stack, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, r"uri|line|long")
    assert send(stack.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n").responses()[0].status == 200


def test_100kb_target_gets_414(stack: Stack) -> None:
    reject(stack, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, r"uri|line|long")
    assert send(stack.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n").responses()[0].status == 200


def test_endless_request_line_is_answered_without_waiting_for_its_end(stack: Stack) -> None:
    # No line end ever comes: the proxy must answer from a bounded buffer, not wait (and grow).
    watch = Watch(stack)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as s:
        with contextlib.suppress(OSError):
            s.sendall(b"GET /" + b"a" * 100_000)
        out = _read_until_close(s, 5.0)
    assert_rejected(out, 414, r"uri|line|long")
    watch.assert_nothing_forwarded()


def test_70kb_of_headers_gets_431(stack: Stack) -> None:
    headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))  # 70 lines, ~71 KB
    reject(stack, b"GET /big HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n", 431, r"head|header|large")
    assert send(stack.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n").responses()[0].status == 200


def test_2000_small_headers_get_431(stack: Stack) -> None:
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(2000))  # ~18 KB: only the count is over
    reject(stack, b"GET /many HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n", 431, r"header|many|large")
    assert send(stack.port, b"GET /ok HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n").responses()[0].status == 200


# --------------------------------------------------------------------------- hop-by-hop


def test_hop_by_hop_headers_are_not_forwarded(stack: Stack) -> None:
    watch = Watch(stack)
    request = (b"POST /hop HTTP/1.1\r\nHost: a\r\n"
               b"Connection: keep-alive, X-Secret\r\nConnection: X-Other\r\n"
               b"X-Secret: s\r\nX-Other: o\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
               b"TE: trailers\r\nUpgrade: foo/1\r\nX-Keep: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nbody\r\n0\r\n\r\n"
               b"GET /close HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    ok(send(stack.port, request), 2)
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [r.target for r in got] == ["/hop", "/close"]
    names = got[0].header_names()
    for name in ("connection", "x-secret", "x-other", "keep-alive", "proxy-connection", "te", "upgrade"):
        assert name not in names, f"{name} was forwarded: {got[0].headers}"
    assert got[0].header("x-keep") == "yes"
    assert got[0].body == b"body"
    # The proxy frames the body itself: exactly one framing header, its own.
    assert names.count("transfer-encoding") == 1 and "content-length" not in names
    assert "connection" not in got[1].header_names()


def test_connection_naming_baggage_routes_on_what_is_forwarded(stack: Stack) -> None:
    watch = Watch(stack)
    request = b"GET /cb HTTP/1.1\r\nHost: a\r\nConnection: baggage, close\r\nbaggage: turnout-session=steal\r\n\r\n"
    r = ok(send(stack.port, request))[0]
    assert r.header("x-upstream") == "baseline"
    watch.settle()
    assert not watch.requests(stack.sandbox)
    got = watch.requests(stack.baseline)
    assert [g.target for g in got] == ["/cb"]
    assert got[0].header("baggage") is None


def test_connection_naming_a_filter_header_routes_on_what_is_forwarded(stack: Stack) -> None:
    watch = Watch(stack)
    request = b"GET /cf HTTP/1.1\r\nHost: a\r\nConnection: X-User\r\nX-User: bob\r\n" + CLOSE + b"\r\n"
    assert ok(send(stack.port, request))[0].header("x-upstream") == "baseline"
    watch.settle()
    assert not watch.requests(stack.sandbox)
    assert watch.requests(stack.baseline)[0].header("x-user") is None


@pytest.mark.parametrize("token", [b"content-length", b"Transfer-Encoding", b"host", b"close, HOST"],
                         ids=["content-length", "transfer-encoding", "host", "host-in-list"])
def test_connection_naming_framing_or_host_is_refused(stack: Stack, token: bytes) -> None:
    request = (b"POST /cn HTTP/1.1\r\nHost: a\r\nConnection: " + token + b"\r\nContent-Length: 5\r\n\r\n"
               b"hello")
    reject(stack, request, 400, r"connection")


def test_upgrade_h2c_is_served_as_a_normal_request(stack: Stack) -> None:
    watch = Watch(stack)
    request = (b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    out = send(stack.port, request)
    assert b" 101 " not in out.data
    r = ok(out)[0]
    assert r.header("upgrade") is None
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [g.target for g in got] == ["/h2c"]
    for name in ("upgrade", "connection", "http2-settings"):
        assert name not in got[0].header_names()


def test_expect_100_continue_delivers_the_body_once(stack: Stack) -> None:
    watch = Watch(stack)
    body = b"hello world"
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as s:
        s.sendall(b"POST /expect HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 11\r\n"
                  + CLOSE + b"\r\n")
        # The recording upstream sends no 100, so the client gets either turnout's own 100
        # or nothing; like curl, it sends the body after a short wait either way.
        early = read_head(s, 1.0)
        s.sendall(body)
        out = _read_until_close(s, 5.0)
    responses = parse_responses(early + out.data)
    assert [r.status for r in responses][-1] == 200
    assert all(r.status == 100 for r in responses[:-1]) and len(responses) <= 2
    watch.settle()
    got = watch.requests(stack.baseline)
    assert [(g.target, g.body) for g in got] == [("/expect", body)]
    assert watch.raw(stack.baseline).count(body) == 1


# --------------------------------------------------------------------------- scripted upstream


class ScriptedUpstream(RawUpstream):
    """An upstream that answers by path before reading any body, to test what the proxy
    does with the client bytes it has not forwarded yet.

    ``/early``: 401 at once; ``/continue``: 100, then 200 echoing the body; ``/switch``:
    101 plus bytes of a second response in the same packet; anything else: 200.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def answer(self, conn: socket.socket, index: int, head: bytes, rest: bytes) -> bytes | None:
        """Answer as the class says."""
        target = head.split(b" ", 2)[1]
        if target == b"/early":
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 5\r\n\r\nnope\n")
            while self.recv(conn, index):
                pass
            return None
        if target == b"/switch":
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected")
            while self.recv(conn, index):
                pass
            return None
        if target == b"/continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        match = re.search(rb"\r\ncontent-length: *([0-9]+)", head, re.I)
        length = int(match.group(1)) if match else 0
        buf = self.read_to(conn, index, rest, length)
        if buf is None:
            return None
        body = buf[:length]
        with self._lock:
            self.bodies.append(body)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        return buf[length:]


@dataclass
class Scripted:
    """A proxy whose baseline is a ``ScriptedUpstream``; requests whose Host is ``other``
    go to ``by_host`` (a filter-only session matching on the Host header)."""

    proxy: ProxyProcess
    upstream: ScriptedUpstream
    by_host: RecordingUpstream


@pytest.fixture(scope="module", params=CODECS)
def scripted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scripted]:
    """One proxy per codec in front of the scripted upstream."""
    upstream = ScriptedUpstream()
    by_host = RecordingUpstream("by-host")
    tmp: Path = tmp_path_factory.mktemp("scripted")
    config = {
        "routing": {"debug_headers": True},
        "listeners": [inbound("svc-in", free_port(), "svc", upstream.address)],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 5.0},
        "sessions": [{"id": "host-other", "routes": [{"service": "svc", "destination": by_host.address,
                                                      "match": {"header": {"name": "host", "exact": "other"}}}]}],
    }
    try:
        with running_proxy(config, tmp, codec=str(request.param)) as proxy:
            yield Scripted(proxy, upstream, by_host)
    finally:
        upstream.stop()
        by_host.stop()


@pytest.mark.parametrize(("target", "host", "routed"), [
    (b"http://other/a", b"svc", "by-host"),
    (b"http://svc/a", b"other", "scripted"),
    (b"/a", b"other", "by-host"),
], ids=["authority-other", "host-other", "origin-form"])
def test_absolute_form_is_routed_on_the_authority_the_upstream_sees(scripted: Scripted, target: bytes, host: bytes,
                                                                     routed: str) -> None:
    # A Host-matching session must see the same Host the upstream will: the target's
    # authority when there is one (RFC 9112 section 3.2.2), never the Host line it replaces.
    by_host = scripted.by_host
    by_host.requests.clear()
    heads_before = len(scripted.upstream.heads)
    out = send(scripted.proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + CLOSE + b"\r\n")
    r = ok(out)[0]
    time.sleep(0.05)
    expected_host = "other" if routed == "by-host" else "svc"
    if routed == "by-host":
        assert r.header("x-turnout-route") == "host-other"
        assert [(g.target, g.header("host")) for g in by_host.requests] == [("/a", expected_host)]
        assert len(scripted.upstream.heads) == heads_before
    else:
        assert r.header("x-turnout-route") == "baseline"
        assert not by_host.requests
        heads = scripted.upstream.heads[heads_before:]
        assert len(heads) == 1 and heads[0].startswith(b"GET /a HTTP/1.1\r\n")
        assert re.findall(rb"\r\nhost: *([^\r]*)", heads[0], re.I) == [expected_host.encode()]


def test_expect_100_continue_from_the_upstream_is_relayed_once(scripted: Scripted) -> None:
    up = scripted.upstream
    heads_before = len(up.heads)
    with socket.create_connection(("127.0.0.1", scripted.proxy.port), timeout=5) as s:
        s.sendall(b"POST /continue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                  + CLOSE + b"\r\n")
        interim = read_head(s, 5.0)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(b"hello")
        out = _read_until_close(s, 5.0)
    responses = parse_responses(interim + out.data)
    assert [r.status for r in responses] == [100, 200]
    assert responses[1].body == b"hello"
    assert len(up.heads) - heads_before == 1
    assert up.received().count(b"hello") == 1


def test_final_response_before_the_body_does_not_turn_the_body_into_a_request(scripted: Scripted) -> None:
    up = scripted.upstream
    heads_before = len(up.heads)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", scripted.proxy.port), timeout=5) as s:
        s.sendall(b"POST /early HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                  % len(smuggled))
        first = read_response(s, 5.0)
        # The client decides not to send its body after the 401 and reuses the connection:
        # the proxy must not read these bytes as a new request (it closes instead).
        with contextlib.suppress(OSError):
            s.sendall(smuggled)
        out = _read_until_close(s, 5.0)
    responses = parse_responses(first + out.data)
    assert [r.status for r in responses] == [401], first + out.data
    assert responses[0].header("connection") == "close"
    assert out.closed
    time.sleep(0.1)
    assert len(up.heads) - heads_before == 1
    assert b"/smuggled" not in up.received()


def test_upstream_101_to_an_h2c_upgrade_never_reaches_the_client(scripted: Scripted) -> None:
    up = scripted.upstream
    with socket.create_connection(("127.0.0.1", scripted.proxy.port), timeout=5) as s:
        s.sendall(b"GET /switch HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        first = read_response(s, 5.0)
        time.sleep(0.2)  # let any bytes the proxy wrongly relays arrive
        with contextlib.suppress(OSError):
            s.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
        out = _read_until_close(s, 5.0)
    data = first + out.data
    assert b" 101 " not in data
    assert data, "the client got no response at all (connection cut) instead of a 502"
    responses = parse_responses(data)
    assert responses[0].status == 502, data
    # Bytes the upstream sent after its 101 are not a response to anything the client asked:
    # relaying them would desynchronize the client's response stream.
    assert b"injected" not in data, data
    assert [r.status for r in responses[1:]] in ([], [200]), data
    assert b"/switch" in up.received()


# --------------------------------------------------------------------------- slow input

# One byte per send, this far apart: the proxy keeps up, so each read brings it one byte,
# as from a client trickling on purpose (a faster sender only makes reads bigger).
_TRICKLE_GAP_S = 50e-6


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _trickle(port: int, data: bytes) -> Outcome:
    """Send ``data`` one byte per send (no Nagle), then read until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.send(data[i : i + 1])
            time.sleep(_TRICKLE_GAP_S)
        return _read_until_close(s, 30.0)


def _chunked_body(size: int) -> bytes:
    """A chunked body of about ``size`` bytes: small chunks with extensions, and trailers."""
    chunks = b"".join(b"%x;ext=%d\r\n" % (10, i) + b"0123456789\r\n" for i in range(size // 24))
    return chunks + b"0\r\nx-trailer-one: " + b"t" * 200 + b"\r\nx-trailer-two: 2\r\n\r\n"


def _post(head_bytes: int, body_bytes: int, close: bool = False) -> bytes:
    """A chunked POST whose head is about ``head_bytes`` long (fields of 600 bytes)."""
    start = b"POST /trickle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n" + (CLOSE if close else b"")
    fields = b"".join(b"x-filler-%03d: " % i + b"f" * 584 + b"\r\n" for i in range(head_bytes // 600))
    return start + fields + b"\r\n" + _chunked_body(body_bytes)


def test_a_trickled_head_and_body_cost_cpu_linear_in_their_bytes(tmp_path: Path) -> None:
    # A 59 KB head and a chunked body arriving one byte per read, against the same number of
    # bytes as small requests arriving the same way: each read costs the same whatever came
    # before it, so the big request may cost no more than twice as much. Scanning the whole
    # head again on every read (and copying it to append) cost ten times as much and more.
    up = RecordingUpstream("trickle")
    listener = inbound("in", free_port(), "svc", up.address)
    config = {"listeners": [listener], "limits": {"header_read_timeout_s": 60.0, "body_idle_timeout_s": 60.0,
                                                  "max_header_count": 200}}
    try:
        with running_proxy(config, tmp_path) as proxy:
            pid = proxy.process.pid
            big = _post(59 * 1000, 2000, close=True)
            small = _post(600, 100)
            count = len(big) // len(small)
            many = small * (count - 1) + _post(600, 100, close=True)
            # Sent whole first: both are served, and what that costs is on record.
            whole_s = []
            for data, n in ((big, 1), (many, count)):
                before = _cpu_s(pid)
                for _ in range(10):
                    out = send(proxy.port, data, timeout_s=30.0)
                    assert [r.status for r in out.responses()] == [200] * n, out.data[-300:]
                whole_s.append((_cpu_s(pid) - before) / 10)
            before = _cpu_s(pid)
            out = _trickle(proxy.port, many)
            small_s = _cpu_s(pid) - before
            assert [r.status for r in out.responses()] == [200] * count, out.data[-300:]
            before = _cpu_s(pid)
            out = _trickle(proxy.port, big)
            big_s = _cpu_s(pid) - before
            assert [r.status for r in out.responses()] == [200], out.data[-300:]
            print(f"\n{len(big)} bytes trickled: as one request {big_s:.3f} s of CPU, as {count} requests "
                  f"{small_s:.3f} s; sent whole {whole_s[0]:.4f} s and {whole_s[1]:.4f} s")
            assert big_s <= 2 * small_s + 0.05, (big_s, small_s)
            assert "Traceback" not in proxy.log()
    finally:
        up.stop()
