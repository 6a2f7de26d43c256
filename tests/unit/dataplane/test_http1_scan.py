"""``check_head``'s one-regex path for clean heads refuses exactly what the byte checks refuse;
``find_head_end`` resuming where an earlier call stopped finds what a scan from the start finds."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.errors import HttpError
from dataplane.http1.scan import check_head, find_head_end

# The byte checks as they were before the clean-head regex: the reference.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [!-~]+ HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [^\x00-\x08\x0a-\x1f\x7f]*)?")


def _reference(head: bytes, max_header_count: int, max_start_line_bytes: int, what: str) -> None:
    status = 400 if what == "request" else 502
    first = head.find(b"\r\n")
    if first > max_start_line_bytes:
        if what == "request":
            raise HttpError(414, "request line too long", "uri_too_long")
        raise HttpError(502, "upstream status line too long", "upstream_bad_head")
    crlf = head.count(b"\r\n")
    if crlf != head.count(b"\n") or crlf != head.count(b"\r"):
        raise HttpError(status, "bare CR or LF in message head", "bad_line_ending")
    if crlf - 2 > max_header_count:
        raise HttpError(431 if what == "request" else 502, "too many header fields", "too_many_headers")
    if b"\n " in head or b"\n\t" in head:
        raise HttpError(status, "obsolete line folding in header", "obs_fold")
    if _CONTROL.search(head) is not None:
        raise HttpError(status, "control character in message head", "control_char")
    if what == "request" and _REQUEST_LINE.fullmatch(head, 0, first) is None:
        raise HttpError(400, "malformed request line", "bad_request_line")
    if what == "response" and _STATUS_LINE.fullmatch(head, 0, first) is None:
        raise HttpError(502, "malformed upstream status line", "upstream_bad_head")


def _outcome(check: object, *args: object) -> tuple[int, str] | None:
    try:
        check(*args)  # type: ignore[operator]
    except HttpError as exc:
        return exc.status, exc.cause
    return None


_PIECES = [b"GET", b" ", b"/", b"/a?b=c", b" HTTP/1.1", b" HTTP/1.0", b"HTTP/1.1 200 OK", b"\r\n", b"\r", b"\n",
           b"Host", b"x-a", b":", b": ", b"\t", b"v", b"\x00", b"\x0b", b"\x1f", b"\x7f", b"\x80", b"\xff", b"(",
           b"@", b"~", b"a b"]
_LINE = st.lists(st.sampled_from(_PIECES), max_size=6).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(start=st.sampled_from([b"GET / HTTP/1.1", b"GET /x HTTP/1.0", b"HTTP/1.1 200 OK", b"HTTP/1.0 204 ",
                              b"HTTP/1.1 599", b"HTTP/1.1 006 X", b"HTTP/1.1 099 X", b"HTTP/1.1 600 X",
                              b"HTTP/1.1 2000 X", b"HTTP/1.1 20 X", b"HTTP/1.1 200OK", b"G@T / HTTP/1.1",
                              b"GET  / HTTP/1.1"]) | _LINE,
       lines=st.lists(_LINE, max_size=5), max_count=st.sampled_from([1, 3, 100]),
       max_line=st.sampled_from([4, 16, 8192]), what=st.sampled_from(["request", "response"]))
def test_clean_path_agrees_with_the_byte_checks(start: bytes, lines: list[bytes], max_count: int, max_line: int,
                                                what: str) -> None:
    head = start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    assert _outcome(check_head, head, max_count, max_line, what) == _outcome(_reference, head, max_count,
                                                                              max_line, what)


def test_a_clean_head_with_many_short_lines_is_still_counted() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"a:\r\n" * 101 + b"\r\n"
    assert _outcome(check_head, head, 100, 8192, "request") == (431, "too_many_headers")


def _scan(buf: bytes | bytearray, max_head: int, what: str, max_line: int, scanned: int = 0) -> int | tuple[int, str]:
    try:
        return find_head_end(buf, 0, max_head, what, max_line, scanned)
    except HttpError as exc:
        return exc.status, exc.cause


def _resumed(pieces: list[bytes], max_head: int, what: str, max_line: int) -> list[int | tuple[int, str]]:
    """What the servers see: the pieces appended to one buffer, each scan resuming where the
    last stopped, until the head ends or is refused."""
    buf = bytearray()
    outcomes: list[int | tuple[int, str]] = []
    for piece in pieces:
        scanned = len(buf)
        buf += piece
        outcomes.append(_scan(buf, max_head, what, max_line, scanned))
        if outcomes[-1] != -1:
            break
    return outcomes


def _from_scratch(pieces: list[bytes], max_head: int, what: str, max_line: int) -> list[int | tuple[int, str]]:
    """The reference: every prefix scanned whole, as before scans resumed."""
    buf = b""
    outcomes: list[int | tuple[int, str]] = []
    for piece in pieces:
        buf += piece
        outcomes.append(_scan(buf, max_head, what, max_line))
        if outcomes[-1] != -1:
            break
    return outcomes


_HEAD_PIECES = [b"GET / HTTP/1.1", b"HTTP/1.1 200 OK", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\n\n", b"\r\r",
                b"Host: a", b"x-a: ", b"v" * 7, b"\x00", b" ", b"\t"]


@settings(max_examples=2000, deadline=None)
@given(wire=st.lists(st.sampled_from(_HEAD_PIECES), max_size=12).map(b"".join),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
       max_head=st.sampled_from([8, 20, 60 * 1024]), max_line=st.sampled_from([0, 5, 16, 8192]),
       what=st.sampled_from(["request", "response"]))
def test_a_resumed_scan_finds_what_a_scan_from_the_start_finds(wire: bytes, cuts: list[int], max_head: int,
                                                               max_line: int, what: str) -> None:
    bounds = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    pieces = [wire[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
    assert _resumed(pieces, max_head, what, max_line) == _from_scratch(pieces, max_head, what, max_line)
    one_byte = [wire[i : i + 1] for i in range(len(wire))] or [b""]
    assert _resumed(one_byte, max_head, what, max_line) == _from_scratch(one_byte, max_head, what, max_line)


@pytest.mark.parametrize(("head", "outcome"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27),
    (b"GET / HTTP/1.1\r\nHost: a\rx", (400, "bad_line_ending")),
    (b"GET / HTTP/1.1\r\nHost: a\n", (400, "bad_line_ending")),
    (b"HTTP/1.1 200 OK\r\nx: \r\n\r\n", 24),
    (b"HTTP/1.1 200 OK\rX", (502, "bad_line_ending")),
], ids=["end", "bare-cr", "bare-lf", "response-end", "response-bare-cr"])
def test_one_byte_at_a_time_ends_or_refuses_on_the_byte_that_decides(head: bytes,
                                                                     outcome: int | tuple[int, str]) -> None:
    what = "response" if head.startswith(b"HTTP/") else "request"
    outcomes = _resumed([head[i : i + 1] for i in range(len(head))], 60 * 1024, what, 8192)
    assert outcomes[:-1] == [-1] * (len(head) - 1)
    assert outcomes[-1] == outcome


def test_a_long_request_line_is_refused_once_it_is_too_long_whatever_the_reads() -> None:
    pieces = [b"GET /" + b"a" * 20] + [b"a"] * 10
    outcomes = _resumed(pieces, 60 * 1024, "request", 24)
    assert outcomes[-1] == (414, "uri_too_long")
    assert outcomes == _from_scratch(pieces, 60 * 1024, "request", 24)


def test_a_status_is_three_digits_from_100_to_599() -> None:
    # RFC 9110 section 15; llhttp takes any three digits (006 read as a 1xx), h11 200-999.
    for start in (b"HTTP/1.1 006 X", b"HTTP/1.1 099 X", b"HTTP/1.1 600 X", b"HTTP/1.1 2000 X", b"HTTP/1.1 +20 X"):
        head = start + b"\r\nContent-Length: 0\r\n\r\n"
        assert _outcome(check_head, head, 100, 8192, "response") == (502, "upstream_bad_head"), start
    for start in (b"HTTP/1.1 100 Continue", b"HTTP/1.1 599", b"HTTP/1.0 200 ", b"HTTP/1.1 404 Not \x80 Found"):
        assert _outcome(check_head, start + b"\r\n\r\n", 100, 8192, "response") is None, start


def test_whitespace_after_field_values_is_trimmed_and_nothing_else() -> None:
    clean = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a b\r\n\r\n"
    assert check_head(clean, 100, 8192) is clean  # the usual head: no copy
    assert check_head(b"GET / HTTP/1.1\r\nHost: a \t\r\nX-A: a b \r\nX-B:  \r\n\r\n", 100, 8192) == (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a b\r\nX-B:\r\n\r\n")
    # A reason phrase keeps its own.
    assert check_head(b"HTTP/1.1 200 OK \r\nX-A: 1\t\r\n\r\n", 100, 8192, "response") == (
        b"HTTP/1.1 200 OK \r\nX-A: 1\r\n\r\n")
