"""Finding the end of a message head and refusing heads that parsers read differently.

h11 accepts obs-fold, bare LF line ends and control bytes in values; httptools refuses
most of those. Checking the raw bytes here, before either codec, makes them agree.
"""

from __future__ import annotations

import re

from dataplane.errors import HttpError

# Control bytes other than HTAB, CR and LF (CR and LF are checked as pairs below).
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# A CR followed by anything but LF is never a line end (RFC 9112 section 2.2).
_BARE_CR = re.compile(rb"\r[^\n]")
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# method SP request-target SP HTTP-version, single spaces, visible ASCII only (RFC 9112 section 3).
_REQUEST_LINE = re.compile(TOKEN + rb" [!-~]+ HTTP/1\.[01]")


def skip_leading_crlf(buf: bytes | bytearray, pos: int) -> int:
    """Skip empty lines before a request line (RFC 9112 section 2.2 allows ignoring them)."""
    while buf[pos : pos + 2] == b"\r\n":
        pos += 2
    return pos


def find_head_end(buf: bytes | bytearray, pos: int, max_head_bytes: int, what: str = "request",
                  max_start_line_bytes: int = 0) -> int:
    """Index just past the head's blank line, or -1 when more bytes are needed.

    Raises ``HttpError`` for a head over ``max_head_bytes`` (431 for requests, 502 for
    responses) and for a bare LF, which would otherwise leave the head unterminated.
    """
    if max_start_line_bytes and what == "request" and len(buf) - pos > max_start_line_bytes + 1 and (
            buf.find(b"\r\n", pos, pos + max_start_line_bytes + 2) == -1):
        raise HttpError(414, "request line too long", "uri_too_long")
    end = buf.find(b"\r\n\r\n", pos)
    if end != -1:
        end += 4
        if end - pos > max_head_bytes:
            raise _too_large(what)
        return end
    if len(buf) - pos > max_head_bytes:
        raise _too_large(what)
    if _BARE_CR.search(buf, pos) is not None:
        raise HttpError(400 if what == "request" else 502, "bare CR in message head", "bad_line_ending")
    lf = buf.find(b"\n", pos)
    while lf != -1:
        if lf == pos or buf[lf - 1] != 13:
            raise HttpError(400 if what == "request" else 502, "bare LF in message head", "bad_line_ending")
        lf = buf.find(b"\n", lf + 1)
    return -1


def _too_large(what: str) -> HttpError:
    if what == "request":
        return HttpError(431, "request head too large", "head_too_large")
    return HttpError(502, "upstream response head too large", "upstream_head_too_large")


def check_head(head: bytes, max_header_count: int, max_start_line_bytes: int, what: str = "request") -> None:
    """Refuse a complete head with bare CR/LF, obs-fold, control bytes or too many lines.

    Each check is one pass in C (counting, searching, translating) rather than a regular
    expression stepping through every byte; field names that are not tokens, and lines
    without a colon, are refused by both codecs alike.
    """
    first = head.find(b"\r\n")
    status = 400 if what == "request" else 502
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
    if len(head.translate(None, _CONTROL_BYTES)) != len(head):
        raise HttpError(status, "control character in message head", "control_char")
    if what == "request" and _REQUEST_LINE.fullmatch(head, 0, first) is None:
        raise HttpError(400, "malformed request line", "bad_request_line")
