"""``check_head``'s one-regex path for clean heads refuses exactly what the byte checks refuse."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.errors import HttpError
from dataplane.http1.scan import check_head

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
