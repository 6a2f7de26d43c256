"""Finding the end of a message head and refusing heads that parsers read differently.

h11 accepts obs-fold, bare LF line ends and control bytes in values; httptools refuses
most of those. Checking the raw bytes here, before either codec, makes them agree.
"""

from __future__ import annotations

import re

from dataplane.errors import HttpError

# Control bytes other than HTAB, CR and LF (CR and LF are checked as pairs below).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A CR followed by anything but LF is never a line end (RFC 9112 section 2.2).
_BARE_CR = re.compile(rb"\r[^\n]")
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# method SP request-target SP HTTP-version, single spaces, visible ASCII only (RFC 9112 section 3).
_REQUEST_LINE_PATTERN = TOKEN + rb" [!-~]+ HTTP/1\.[01]"
_REQUEST_LINE = re.compile(_REQUEST_LINE_PATTERN)
# HTTP-version SP status-code [SP reason-phrase], the status from 100 to 599 (RFC 9110 section
# 15: three digits, the first one the class); h11 takes 200-999, llhttp any three digits.
_STATUS_LINE_PATTERN = rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [\t -~\x80-\xff]*)?"
_STATUS_LINE = re.compile(_STATUS_LINE_PATTERN)
# The shape nearly every head has: every field line a token, a colon and bytes that are
# neither controls nor DEL nor whitespace at the end, CRLF line ends only. One match implies
# every check below (bare CR/LF, obs-fold, control bytes, the start line) and that there is
# no whitespace to trim, so only heads that miss it pay for the checks one by one (and get
# their precise error).
_FIELD_LINES = rb"(?:" + TOKEN + rb":[\t -~\x80-\xff]*+(?<![ \t])\r\n)*\r\n"
# Optional whitespace before a line end: never part of a field value (RFC 9110 section 5.5).
_TRAILING_OWS = re.compile(rb"[ \t]+\r\n")
_CLEAN = {
    "request": re.compile(_REQUEST_LINE_PATTERN + rb"\r\n" + _FIELD_LINES),
    "response": re.compile(_STATUS_LINE_PATTERN + rb"\r\n" + _FIELD_LINES),
}


def skip_leading_crlf(buf: bytes | bytearray, pos: int) -> int:
    """Skip empty lines before a request line (RFC 9112 section 2.2 allows ignoring them)."""
    while buf[pos : pos + 2] == b"\r\n":
        pos += 2
    return pos


def find_head_end(buf: bytes | bytearray, pos: int, max_head_bytes: int, what: str = "request",
                  max_start_line_bytes: int = 0, scanned: int = 0) -> int:
    """Index just past the head's blank line, or -1 when more bytes are needed.

    Raises ``HttpError`` for a head over ``max_head_bytes`` (431 for requests, 502 for
    responses) and for a bare CR or LF, which would otherwise leave the head unterminated.
    ``scanned`` is how long ``buf`` was when an earlier call on the same head returned -1:
    only the bytes after it (and the three before, a CRLF CRLF may straddle) are examined
    again, so a head arriving in many small reads costs time linear in its length.
    """
    if max_start_line_bytes and what == "request" and len(buf) - pos > max_start_line_bytes + 1 and (
            scanned - pos <= max_start_line_bytes + 1) and (
            buf.find(b"\r\n", pos, pos + max_start_line_bytes + 2) == -1):
        raise HttpError(414, "request line too long", "uri_too_long")
    end = buf.find(b"\r\n\r\n", pos if scanned - 3 <= pos else scanned - 3)
    if end != -1:
        end += 4
        if end - pos > max_head_bytes:
            raise _too_large(what)
        return end
    if len(buf) - pos > max_head_bytes:
        raise _too_large(what)
    # A CR last in the earlier bytes was not known to be bare yet; LFs there were checked.
    if _BARE_CR.search(buf, pos if scanned - 1 <= pos else scanned - 1) is not None:
        raise HttpError(400 if what == "request" else 502, "bare CR in message head", "bad_line_ending")
    lf = buf.find(b"\n", pos if scanned <= pos else scanned)
    while lf != -1:
        if lf == pos or buf[lf - 1] != 13:
            raise HttpError(400 if what == "request" else 502, "bare LF in message head", "bad_line_ending")
        lf = buf.find(b"\n", lf + 1)
    return -1


def _too_large(what: str) -> HttpError:
    if what == "request":
        return HttpError(431, "request head too large", "head_too_large")
    return HttpError(502, "upstream response head too large", "upstream_head_too_large")


def check_head(head: bytes, max_header_count: int, max_start_line_bytes: int, what: str = "request") -> bytes:
    """Refuse a complete head with bare CR/LF, obs-fold, control bytes, too many lines or a
    malformed request or status line; returns the head to parse: without the whitespace
    after field values, which httptools would keep (and refuse in Content-Length and Host)
    and h11 drops."""
    first = head.find(b"\r\n")
    # A field line is at least 4 bytes ("a:" CRLF): a short head cannot have too many.
    if first <= max_start_line_bytes and _CLEAN[what].fullmatch(head) is not None and (
            len(head) >> 2 <= max_header_count or head.count(b"\r\n") - 2 <= max_header_count):
        return head
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
    if _CONTROL.search(head) is not None:
        raise HttpError(status, "control character in message head", "control_char")
    if what == "request":
        if _REQUEST_LINE.fullmatch(head, 0, first) is None:
            raise HttpError(400, "malformed request line", "bad_request_line")
    elif _STATUS_LINE.fullmatch(head, 0, first) is None:
        raise HttpError(502, "malformed upstream status line", "upstream_bad_head")
    # The start line keeps its own (a reason phrase may end in a space).
    return head[:first] + _TRAILING_OWS.sub(b"\r\n", head[first:])
