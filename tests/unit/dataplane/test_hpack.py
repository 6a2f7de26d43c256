"""turnout's HPACK encoder and decoder, property-tested against the ``hpack`` library (the
reference h2 ships with): same header lists both ways, the same dynamic table state across
blocks and table-size changes, the same verdict on arbitrary bytes, the same limits."""

from __future__ import annotations

import hpack
import pytest
from hpack.exceptions import HPACKError, InvalidTableSizeError, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman as reference_huffman
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.http2.hpack import Decoder, Encoder, decode_huffman, decode_integer, encode_integer

# Names and values drawn from a small alphabet so that blocks repeat entries (indexed fields,
# name references, evictions), plus the static table's own pairs.
_NAMES = st.sampled_from([b":path", b":authority", b"content-type", b"baggage", b"x-a", b"x-b", b"cookie",
                          b"user-agent", b"x-forwarded-for", b"grpc-timeout", b"accept-encoding"])
_VALUES = st.one_of(st.sampled_from([b"", b"/", b"gzip, deflate", b"application/grpc", b"v1", b"v2"]),
                    st.binary(max_size=40))
_HEADER = st.one_of(st.tuples(_NAMES, _VALUES), st.tuples(st.binary(min_size=1, max_size=12), _VALUES))
_BLOCKS = st.lists(st.lists(_HEADER, max_size=12), min_size=1, max_size=12)
_SIZES = st.sampled_from([0, 64, 256, 4096])


def _ours_fails(decoder: Decoder, data: bytes) -> tuple[bool, list[tuple[bytes, bytes]] | None]:
    try:
        return False, [(h[0], h[1]) for h in decoder.decode(data, raw=True)]
    except (HPACKError, IndexError, TypeError):  # what h2 turns into a connection error
        return True, None


def _theirs_fails(decoder: hpack.Decoder, data: bytes) -> tuple[bool, list[tuple[bytes, bytes]] | None]:
    try:
        return False, [(bytes(h[0]), bytes(h[1])) for h in decoder.decode(data, raw=True)]
    except (HPACKError, IndexError, TypeError):
        return True, None


@settings(max_examples=300, deadline=None)
@given(_BLOCKS, st.lists(_SIZES, max_size=12))
def test_what_we_encode_hpack_decodes(blocks: list[list[tuple[bytes, bytes]]], sizes: list[int]) -> None:
    ours = Encoder()
    theirs = hpack.Decoder()
    for i, block in enumerate(blocks):
        if i < len(sizes):
            ours.header_table_size = sizes[i]  # the peer's SETTINGS_HEADER_TABLE_SIZE changed
        assert [tuple(h) for h in theirs.decode(ours.encode(block), raw=True)] == block


@settings(max_examples=300, deadline=None)
@given(_BLOCKS, st.booleans(), st.lists(_SIZES, max_size=12))
def test_what_hpack_encodes_we_decode(blocks: list[list[tuple[bytes, bytes]]], huffman: bool,
                                      sizes: list[int]) -> None:
    theirs = hpack.Encoder()
    ours = Decoder()
    for i, block in enumerate(blocks):
        if i < len(sizes):
            theirs.header_table_size = sizes[i]
        assert [tuple(h) for h in ours.decode(theirs.encode(block, huffman=huffman), raw=True)] == block


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_arbitrary_bytes_get_the_same_verdict(blocks: list[bytes]) -> None:
    ours, theirs = Decoder(), hpack.Decoder()
    for data in blocks:
        ours_failed, ours_headers = _ours_fails(ours, data)
        theirs_failed, theirs_headers = _theirs_fails(theirs, data)
        assert ours_failed == theirs_failed, (data, ours_headers, theirs_headers)
        if ours_failed:
            return  # the connection is over: h2 sends GOAWAY
        assert ours_headers == theirs_headers


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_huffman_round_trip_and_garbage(data: bytes) -> None:
    coded = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert decode_huffman(coded) == data
    try:
        expected: bytes | None = reference_huffman(data)
    except HPACKError:
        expected = None
    if expected is None:
        with pytest.raises(HPACKError):
            decode_huffman(data)
    else:
        assert decode_huffman(data) == expected


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=1, max_value=8))
def test_integers_round_trip(value: int, prefix: int) -> None:
    data = encode_integer(value, prefix, 0)
    assert decode_integer(data, 0, prefix) == (value, len(data))
    assert hpack.hpack.decode_integer(data, prefix) == (value, len(data))


def test_never_indexed_fields_stay_never_indexed() -> None:
    encoder = Encoder()
    block = encoder.encode([hpack.NeverIndexedHeaderTuple(b"authorization", b"secret")])
    decoded = list(hpack.Decoder().decode(block, raw=True))
    assert isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)
    assert isinstance(Decoder().decode(block)[0], hpack.NeverIndexedHeaderTuple)  # kept when forwarded


def test_an_oversized_header_list_is_refused() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 5000)])
    with pytest.raises(OversizedHeaderListError):
        Decoder(max_header_list_size=4096).decode(block)


def test_a_table_size_update_above_what_we_allowed_is_refused() -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = 8192
    block = encoder.encode([(b"a", b"b")])
    decoder = Decoder()
    decoder.max_allowed_table_size = 4096
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(block)


def test_the_encoder_index_stays_bounded_by_its_table() -> None:
    encoder = Encoder()
    encoder.header_table_size = 256
    reference = hpack.Decoder()
    for i in range(5000):  # every request with a header value never seen before
        block = [(b"x-request-id", b"%d" % i), (b":path", b"/")]
        assert [tuple(h) for h in reference.decode(encoder.encode(block), raw=True)] == block
    assert len(encoder._pairs) <= 256 // 32 and len(encoder._names) <= 256 // 32
