"""turnout's own HTTP/1.1 body decoders and encoders (``dataplane/http1/framing.py``).

* every decoder (``ContentLengthDecoder``, ``ChunkedDecoder``, ``UntilCloseDecoder``) fed
  the same bytes whole, one byte at a time and under arbitrary splits (hypothesis) gives
  the same body, one end, the same trailers and the same bytes after the message
  (pipelining);
* strict chunk-size lines and CRLF after chunk data, refused under every split, with 400
  for requests and 502 for responses; the line-length bound holds before the line ends;
* trailers: size limit, obs-fold, invalid lines, forbidden names dropped;
* ``eof()``: truncation errors, and the close that ends an until-close body;
* ``chunk``/``last_chunk`` bytes, and a round trip through ``ChunkedDecoder``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.errors import HttpError
from dataplane.http1.framing import (
    ChunkedDecoder,
    ContentLengthDecoder,
    Decoder,
    OnData,
    OnEnd,
    UntilCloseDecoder,
    chunk,
    last_chunk,
)

Fields = list[tuple[bytes, bytes]]
Factory = Callable[[OnData, OnEnd], Decoder]
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"  # a pipelined request after the body


def chunked(status: int = 400, max_line: int = 4096, max_trailer: int = 16384) -> Factory:
    return lambda on_data, on_end: ChunkedDecoder(on_data, on_end, max_line, max_trailer, status)


def length(n: int) -> Factory:
    return lambda on_data, on_end: ContentLengthDecoder(n, on_data, on_end)


class Outcome:
    """What a decoder reported: body pieces, ends (with their trailers), the bytes after the message."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ends: list[Fields] = []
        self.rest = b""

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


def drive(factory: Factory, pieces: list[bytes]) -> Outcome:
    """Feed ``pieces`` in order as a server would: once the message ended, what follows is the
    next message's (the decoder is not fed any more)."""
    out = Outcome()
    decoder = factory(out.pieces.append, out.ends.append)
    for piece in pieces:
        if out.ends:
            out.rest += piece
        else:
            out.rest += decoder.feed(piece)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# (decoder, wire bytes, body, trailers, what follows the message)
MESSAGES: list[tuple[str, Factory, bytes, bytes, Fields, bytes]] = [
    ("length", length(11), b"hello world" + NEXT, b"hello world", [], NEXT),
    ("length-exact", length(5), b"hello", b"hello", [], b""),
    ("chunked", chunked(), b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + NEXT, b"hello world", [], NEXT),
    ("chunked-upper-hex-ext", chunked(),
     b"A;name=value;q=\"quoted str\"\r\n0123456789\r\n00\r\n\r\n", b"0123456789", [], b""),
    ("chunked-trailers", chunked(),
     b"3\r\nabc\r\n0\r\nX-Checksum:  sum 1 \r\ncontent-length: 3\r\nx-empty:\r\n\r\n" + NEXT, b"abc",
     [(b"x-checksum", b"sum 1"), (b"x-empty", b"")], NEXT),
    ("chunked-15-hex-digits", chunked(), b"00000000000000F\r\n" + b"f" * 15 + b"\r\n0\r\n\r\n", b"f" * 15, [], b""),
]


@pytest.mark.parametrize(("name", "factory", "wire", "body", "trailers", "rest"), MESSAGES,
                         ids=[m[0] for m in MESSAGES])
def test_whole_and_one_byte_at_a_time_agree(name: str, factory: Factory, wire: bytes, body: bytes,
                                            trailers: Fields, rest: bytes) -> None:
    for pieces in ([wire], one_byte_at_a_time(wire)):
        out = drive(factory, pieces)
        assert out.body == body
        assert out.ends == [trailers]  # exactly one end
        assert out.rest == rest


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, len(MESSAGES) - 1), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_any_split_gives_the_same_message(which: int, cuts: list[int]) -> None:
    _, factory, wire, body, trailers, rest = MESSAGES[which]
    out = drive(factory, split(wire, cuts))
    assert (out.body, out.ends, out.rest) == (body, [trailers], rest)


def test_body_bytes_are_handed_on_as_they_arrive() -> None:
    # Nothing buffered beyond a partial size line: each piece of chunk data goes out at once.
    out = Outcome()
    decoder = ChunkedDecoder(out.pieces.append, out.ends.append, 4096, 16384)
    assert decoder.feed(b"a\r\n01234") == b""
    assert out.pieces == [b"01234"]
    assert decoder.feed(b"56789\r\n") == b""
    assert out.pieces == [b"01234", b"56789"] and out.ends == []
    decoder.feed(b"0\r\n\r\n")
    assert out.ends == [[]]


def test_content_length_decoder_counts_down_and_stops_at_the_length() -> None:
    out = Outcome()
    decoder = ContentLengthDecoder(5, out.pieces.append, out.ends.append)
    assert decoder.feed(b"he") == b""
    assert decoder.remaining == 3 and out.ends == []
    assert decoder.feed(b"lloEXTRA") == b"EXTRA"
    assert out.pieces == [b"he", b"llo"] and out.ends == [[]] and decoder.remaining == 0


@settings(max_examples=50, deadline=None)
@given(wire=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_until_close_body_is_everything_under_any_split(wire: bytes, cuts: list[int]) -> None:
    out = drive(UntilCloseDecoder, [*split(wire, cuts), b"0\r\n\r\n"])
    assert out.body == wire + b"0\r\n\r\n" and out.ends == [] and out.rest == b""


def test_until_close_takes_everything_and_ends_only_at_eof() -> None:
    out = Outcome()
    decoder = UntilCloseDecoder(out.pieces.append, out.ends.append)
    assert decoder.feed(b"HTTP/1.1 200 OK\r\n\r\n0\r\n\r\n") == b""  # nothing is "after" such a body
    assert out.ends == []
    decoder.eof()
    assert out.body == b"HTTP/1.1 200 OK\r\n\r\n0\r\n\r\n" and out.ends == [[]]


# ---------------------------------------------------------------------- strict chunk-size lines

BAD_CHUNKED = [
    ("hex-prefix", b"0x1\r\nA\r\n0\r\n\r\n"),
    ("trailing-space", b"1 \r\nA\r\n0\r\n\r\n"),
    ("leading-space", b" 1\r\nA\r\n0\r\n\r\n"),
    ("tab-before-ext", b"1\t;a=b\r\nA\r\n0\r\n\r\n"),
    ("space-before-ext", b"1 ;a=b\r\nA\r\n0\r\n\r\n"),
    ("space-in-ext", b"1;a = b\r\nA\r\n0\r\n\r\n"),
    ("empty-ext", b"1;\r\nA\r\n0\r\n\r\n"),
    ("negative", b"-1\r\nA\r\n0\r\n\r\n"),
    ("plus", b"+1\r\nA\r\n0\r\n\r\n"),
    ("not-hex", b"g\r\nA\r\n0\r\n\r\n"),
    ("empty-size", b"\r\nA\r\n0\r\n\r\n"),
    ("16-hex-digits", b"0000000000000001\r\nA\r\n0\r\n\r\n"),
    ("17-hex-digits", b"10000000000000000\r\nA\r\n0\r\n\r\n"),
    ("lf-only-size-line", b"1\nA\r\n0\r\n\r\n"),
    ("cr-cr-lf", b"1\r\r\nA\r\n0\r\n\r\n"),
    ("missing-crlf-after-data", b"1\r\nAXX0\r\n\r\n"),
    ("lf-only-after-data", b"1\r\nA\n0\r\n\r\n"),
    ("cr-then-other-after-data", b"1\r\nA\rX0\r\n\r\n"),
    ("data-longer-than-size", b"1\r\nAB\r\n0\r\n\r\n"),
    ("lf-only-last-chunk", b"1\r\nA\r\n0\n\r\n"),
    ("lf-only-end-of-trailers", b"1\r\nA\r\n0\r\n\n"),
]


@pytest.mark.parametrize("wire", [w for _, w in BAD_CHUNKED], ids=[n for n, _ in BAD_CHUNKED])
@pytest.mark.parametrize(("status", "cause"), [(400, "bad_chunked"), (502, "upstream_bad_chunked")])
def test_malformed_chunked_bodies_are_refused_whole_or_byte_by_byte(wire: bytes, status: int, cause: str) -> None:
    for pieces in ([wire], one_byte_at_a_time(wire)):
        with pytest.raises(HttpError) as info:
            drive(chunked(status), pieces)
        assert (info.value.status, info.value.cause) == (status, cause)


@settings(max_examples=100, deadline=None)
@given(which=st.integers(0, len(BAD_CHUNKED) - 1), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_malformed_chunked_bodies_are_refused_under_any_split(which: int, cuts: list[int]) -> None:
    wire = BAD_CHUNKED[which][1]
    with pytest.raises(HttpError) as info:
        drive(chunked(), split(wire, cuts))
    assert info.value.cause == "bad_chunked"


def test_no_body_byte_is_handed_on_past_a_bad_crlf() -> None:
    out = Outcome()
    decoder = ChunkedDecoder(out.pieces.append, out.ends.append, 4096, 16384)
    with pytest.raises(HttpError):
        decoder.feed(b"1\r\nAXX0\r\n\r\n")
    assert out.pieces == [b"A"] and out.ends == []  # "XX0" never became body


def test_size_line_length_is_bounded_before_its_line_end_arrives() -> None:
    out = Outcome()
    decoder = ChunkedDecoder(out.pieces.append, out.ends.append, 16, 16384)
    decoder.feed(b"1;a=")
    with pytest.raises(HttpError) as info:
        decoder.feed(b"b" * 64)  # no LF yet: refused now, not buffered until one comes
    assert "too long" in info.value.reason
    # A line of exactly the limit (CRLF included) is fine.
    ok = drive(chunked(max_line=16), [b"1;a=bbbbbbbbbb\r\nA\r\n0\r\n\r\n"])
    assert ok.body == b"A" and ok.ends == [[]]
    with pytest.raises(HttpError):
        drive(chunked(max_line=16), [b"1;a=bbbbbbbbbbb\r\nA\r\n0\r\n\r\n"])


# ---------------------------------------------------------------------- trailers


FORBIDDEN = [b"Content-Length", b"transfer-encoding", b"Host", b"connection", b"TE", b"trailer", b"keep-alive",
             b"upgrade", b"proxy-connection", b"baggage"]


def test_forbidden_trailer_names_are_dropped_and_the_rest_kept_in_order() -> None:
    lines = b"".join(name + b": x\r\n" for name in FORBIDDEN)
    wire = b"1\r\nA\r\n0\r\nx-first: 1\r\n" + lines + b"Grpc-Status: 0\r\n\r\n"
    out = drive(chunked(), [wire])
    assert out.ends == [[(b"x-first", b"1"), (b"grpc-status", b"0")]]


@pytest.mark.parametrize("trailer", [
    b"x-a: 1\r\n folded\r\n",  # obs-fold
    b"x-a: 1\r\n\tfolded\r\n",
    b"bad name: 1\r\n",
    b"x-a 1\r\n",  # no colon
    b": 1\r\n",  # no name
    b"x-a: 1\x00\r\n",  # control byte in the value
    b"x-a: 1\x7f\r\n",
    b"x-a: 1\n",  # LF-only line
])
def test_invalid_trailers_are_refused(trailer: bytes) -> None:
    wire = b"1\r\nA\r\n0\r\n" + trailer + b"\r\n"
    for pieces in ([wire], one_byte_at_a_time(wire)):
        with pytest.raises(HttpError) as info:
            drive(chunked(), pieces)
        assert info.value.cause == "bad_chunked"


def test_trailers_are_bounded_in_total_and_per_partial_line() -> None:
    fits = b"0\r\nx-a: 12345678\r\n\r\n"  # trailer section: 15 + 2 bytes
    assert drive(chunked(max_trailer=17), [fits]).ends == [[(b"x-a", b"12345678")]]
    with pytest.raises(HttpError) as info:
        drive(chunked(max_trailer=16), [fits])
    assert info.value.reason == "trailers too large"
    many = b"0\r\n" + b"x-a: 1\r\n" * 10 + b"\r\n"
    with pytest.raises(HttpError):
        drive(chunked(max_trailer=40), one_byte_at_a_time(many))
    decoder = ChunkedDecoder(lambda _: None, lambda _: None, 4096, 32)
    decoder.feed(b"0\r\n")
    with pytest.raises(HttpError):
        decoder.feed(b"x-long: " + b"v" * 64)  # no line end yet: refused before it comes


# ---------------------------------------------------------------------- eof


def test_eof_inside_a_content_length_body_is_a_truncation() -> None:
    decoder = ContentLengthDecoder(5, lambda _: None, lambda _: None)
    decoder.feed(b"abc")
    with pytest.raises(HttpError) as info:
        decoder.eof()
    assert (info.value.status, info.value.cause) == (400, "truncated_body")
    complete = ContentLengthDecoder(3, lambda _: None, lambda _: None)
    complete.feed(b"abc")
    complete.eof()  # nothing missing: no error


@pytest.mark.parametrize("cut", [0, 1, 3, 5, 7, 10, 12])  # every state: size line, data, CRLF, trailers
@pytest.mark.parametrize(("status", "cause"), [(400, "bad_chunked"), (502, "upstream_bad_chunked")])
def test_eof_before_the_last_chunk_is_a_truncation(cut: int, status: int, cause: str) -> None:
    wire = b"3\r\nabc\r\n0\r\nx: 1\r\n\r\n"
    out = Outcome()
    decoder = ChunkedDecoder(out.pieces.append, out.ends.append, 4096, 16384, status)
    decoder.feed(wire[:cut])
    with pytest.raises(HttpError) as info:
        decoder.eof()
    assert (info.value.status, info.value.cause) == (status, cause)
    assert out.ends == []


def test_eof_after_the_last_chunk_is_fine() -> None:
    decoder = ChunkedDecoder(lambda _: None, lambda _: None, 4096, 16384)
    decoder.feed(b"0\r\n\r\n")
    decoder.eof()


def test_until_close_eof_ends_the_body_with_no_trailers() -> None:
    out = Outcome()
    decoder = UntilCloseDecoder(out.pieces.append, out.ends.append)
    decoder.eof()
    assert out.ends == [[]] and out.pieces == []


# ---------------------------------------------------------------------- encoding


def test_chunk_and_last_chunk_bytes() -> None:
    assert chunk(b"hello") == (b"5\r\n", b"hello", b"\r\n")
    assert chunk(b"x" * 255)[0] == b"ff\r\n"
    assert chunk(b"x" * 4096)[0] == b"1000\r\n"
    assert last_chunk([]) == b"0\r\n\r\n"
    assert last_chunk([(b"x-a", b"1"), (b"grpc-status", b"0")]) == b"0\r\nx-a: 1\r\ngrpc-status: 0\r\n\r\n"


_NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).map(lambda s: ("x-" + s).encode())
_VALUE = st.binary(max_size=12).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7e))


@settings(max_examples=100, deadline=None)
@given(bodies=st.lists(st.binary(min_size=1, max_size=300), max_size=5),
       trailers=st.lists(st.tuples(_NAME, _VALUE), max_size=3), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_what_chunk_and_last_chunk_write_decodes_back(bodies: list[bytes], trailers: Fields,
                                                      cuts: list[int]) -> None:
    wire = b"".join(b"".join(chunk(b)) for b in bodies) + last_chunk(trailers) + NEXT
    out = drive(chunked(), split(wire, cuts))
    assert out.body == b"".join(bodies)
    assert out.ends == [trailers]
    assert out.rest == NEXT
