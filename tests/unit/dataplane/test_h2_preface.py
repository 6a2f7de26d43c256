"""``preface_kind``: HTTP/2 prior knowledge, HTTP/1.1 or an invalid preface (h2spec http2/3.5 #2).

On a cleartext port that takes both protocols the first bytes decide. h2spec sends
"INVALID CONNECTION PREFACE" and wants a GOAWAY PROTOCOL_ERROR or a close, never an
HTTP/1.1 reply; every malformed HTTP/1.1 request the HTTP/1.1 hardening tests send must
still reach HTTP/1.1 and get its 400.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import Frame, GoAwayFrame

from dataplane.http2.engine import (
    PREFACE,
    PREFACE_HTTP1,
    PREFACE_HTTP2,
    PREFACE_INVALID,
    PREFACE_PARTIAL,
    ErrorCodes,
    H2Engine,
    ProtocolError,
    preface_kind,
)

MAX_LINE = 8192  # the default max_request_line_bytes

H2SPEC_INVALID_PREFACE = b"INVALID CONNECTION PREFACE\r\n\r\n"


def _frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        parsed, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        parsed.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        frames.append(parsed)
        pos += 9 + length
    return frames


def test_h2spec_invalid_preface_is_handed_to_http2_which_answers_goaway() -> None:
    assert preface_kind(H2SPEC_INVALID_PREFACE, MAX_LINE) == PREFACE_INVALID
    # Handed to HTTP/2, the same bytes are a connection error: SETTINGS, then GOAWAY.
    engine = H2Engine(False)
    engine.initiate_connection()
    with pytest.raises(ProtocolError) as info:
        engine.receive_data(H2SPEC_INVALID_PREFACE)
    assert info.value.error_code == ErrorCodes.PROTOCOL_ERROR
    frames = _frames(engine.data_to_send())
    assert isinstance(frames[-1], GoAwayFrame)
    assert (frames[-1].error_code, frames[-1].last_stream_id) == (ErrorCodes.PROTOCOL_ERROR, 0)
    assert engine.closed


@pytest.mark.parametrize("data", [
    H2SPEC_INVALID_PREFACE,
    b"INVALID CONNECTION PREFACE\n",
    b"\r\nHELLO\r\n",
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\n",  # binary (a TLS record head): no "/" before a line end
    b"SSH-2.0-OpenSSH_9.6\r\n",
])
def test_a_first_line_without_a_slash_is_an_invalid_preface(data: bytes) -> None:
    assert preface_kind(data, MAX_LINE) == PREFACE_INVALID


@pytest.mark.parametrize("line", [
    # Valid requests.
    b"GET / HTTP/1.1", b"POST /p HTTP/1.1", b"OPTIONS * HTTP/1.1", b"CONNECT internal:22 HTTP/1.1",
    b"GET http://users/x HTTP/1.0",
    # The request lines tests/integration/test_hardening_http1.py expects a 400 for.
    b"GET /a b HTTP/1.1", b"GET / HTTP/1.32", b"GET /a\x00b HTTP/1.1", b"GET\t/ HTTP/1.1", b"GET /\t HTTP/1.1",
    b"GET  / HTTP/1.1", b"GET / HTTP/1.1 ", b" GET / HTTP/1.1", b"GET / http/1.1", b"GET / HTTP/2.0",
    b"GET / HTTP/1.1 HTTP/1.1", b"GET /", b"GET * HTTP/1.1", b"GET /\xc3\xa9 HTTP/1.1", b"G\x00ET / HTTP/1.1",
    b"PRI * HTTP/2.0",
])
def test_http1_request_lines_well_formed_or_not_stay_http1(line: bytes) -> None:
    assert preface_kind(line + b"\r\nHost: a\r\n\r\n", MAX_LINE) == PREFACE_HTTP1
    assert preface_kind(line + b"\nHost: a\n\n", MAX_LINE) == PREFACE_HTTP1  # bare LF: HTTP/1.1 refuses it
    assert preface_kind(b"\r\n" + line + b"\r\n", MAX_LINE) == PREFACE_HTTP1  # an empty line first (RFC 9112 §2.2)


def test_a_near_preface_stays_http1() -> None:
    # tests/integration/test_hardening_http1.py: refused by HTTP/1.1 with a 400.
    assert preface_kind(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", MAX_LINE) == PREFACE_HTTP1


def test_the_preface_is_http2() -> None:
    assert preface_kind(PREFACE, MAX_LINE) == PREFACE_HTTP2
    assert preface_kind(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", MAX_LINE) == PREFACE_HTTP2


@pytest.mark.parametrize("data", [
    b"", PREFACE[:1], PREFACE[:16], PREFACE[:23],  # could still be the preface
    b"GET", b"GET ", b"INVALID CONNECTION", b"\r\n", b"\r\n\r\nGET",  # no "/" and no line end yet
])
def test_too_few_bytes_to_tell_wait_for_more(data: bytes) -> None:
    assert preface_kind(data, MAX_LINE) == PREFACE_PARTIAL


def test_waiting_is_bounded_by_the_request_line_limit() -> None:
    # Past the limit without a line end, HTTP/1.1 gets the bytes and refuses the long line;
    # a flood of empty lines is bounded the same way.
    assert preface_kind(b"A" * MAX_LINE, MAX_LINE) == PREFACE_PARTIAL
    assert preface_kind(b"A" * (MAX_LINE + 1), MAX_LINE) == PREFACE_HTTP1
    assert preface_kind(b"\r\n" * MAX_LINE, MAX_LINE) == PREFACE_HTTP1
