"""turnout's HPACK (dataplane/http2/hpack.py) against the ``hpack`` library.

The first byte picks a mode:

* decode (even): the rest is cut into header blocks at ``0xff 0xff`` (a pair no valid block
  needs twice in a row is rare enough; the fuzzer finds both ways), decoded in order by both
  decoders, whose dynamic tables carry over from block to block. Both must give the same
  header list, or both refuse; turnout's may refuse only with ``hpack``'s exceptions (the
  engine turns exactly those into COMPRESSION_ERROR). After a refusal the connection is
  over, so the comparison stops.
* encode (odd): the rest is read as header lists (``name \\x00 value \\n`` fields, lists
  separated by ``\\x01``, a ``\\x02`` prefix marks a never-indexed field, a ``\\x03`` byte
  before a list a table size change from the peer); turnout's encoder codes them in turn
  and ``hpack`` must decode each block to the same list.

The second byte's low bits pick the decoders' allowed table size (what our SETTINGS said).
"""

from __future__ import annotations

import hpack
from hpack.exceptions import HPACKError
from hpack.struct import NeverIndexedHeaderTuple

from dataplane.http2.hpack import Decoder, Encoder

_TABLE_SIZES = (4096, 0, 256, 65536)
_SEPARATOR = b"\xff\xff"
_ENCODER_SIZES = (0, 64, 256, 4096)


def _ours(decoder: Decoder, block: bytes) -> list[tuple[bytes, bytes]] | None:
    try:
        return [(h[0], h[1]) for h in decoder.decode(block, raw=True)]
    except HPACKError:
        return None


def _theirs(decoder: hpack.Decoder, block: bytes) -> list[tuple[bytes, bytes]] | None:
    try:
        return [(bytes(h[0]), bytes(h[1])) for h in decoder.decode(block, raw=True)]
    except (HPACKError, IndexError, TypeError):  # what h2 turns into a connection error
        return None


def _decode(data: bytes, table_size: int) -> None:
    ours, theirs = Decoder(), hpack.Decoder()
    ours.max_allowed_table_size = theirs.max_allowed_table_size = table_size
    for block in data.split(_SEPARATOR):
        ours_headers = _ours(ours, block)
        theirs_headers = _theirs(theirs, block)
        assert ours_headers == theirs_headers, f"turnout {ours_headers!r}, hpack {theirs_headers!r} for {block!r}"
        if ours_headers is None:
            return


def _header_lists(data: bytes) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    lists = []
    for part in data.split(b"\x01"):
        size = -1
        text = part
        if part[:1] == b"\x03":
            size = _ENCODER_SIZES[len(part) % len(_ENCODER_SIZES)]
            text = part[1:]
        headers: list[tuple[bytes, bytes]] = []
        for line in text.split(b"\n"):
            if not line:
                continue
            name, _, value = line.partition(b"\x00")
            if name[:1] == b"\x02":
                headers.append(NeverIndexedHeaderTuple(name[1:], value))
            else:
                headers.append((name, value))
        lists.append((size, headers))
    return lists


def _encode(data: bytes) -> None:
    ours, theirs = Encoder(), hpack.Decoder()
    for size, headers in _header_lists(data):
        if size >= 0:
            ours.header_table_size = size  # the peer's SETTINGS_HEADER_TABLE_SIZE changed
        decoded = [(bytes(h[0]), bytes(h[1])) for h in theirs.decode(ours.encode(headers), raw=True)]
        assert decoded == [(h[0], h[1]) for h in headers], f"sent {headers!r}, hpack decoded {decoded!r}"


def fuzz_one(data: bytes) -> None:
    """Compare both ways on ``data`` (see the module docstring)."""
    if len(data) < 2:
        return
    if data[0] & 1:
        _encode(data[2:])
    else:
        _decode(data[2:], _TABLE_SIZES[data[1] & 3])


def seeds() -> list[bytes]:
    """Blocks ``hpack`` encodes (Huffman and not, across table size changes) and header lists."""
    requests = [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"example.com")],
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/svc.Greeter/Hello"), (b":authority", b"svc"),
         (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"100m")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"example.com"),
         (b"baggage", b"turnout-session=abc,other=1"), (b"cookie", b"a=b"), (b"cookie", b"c=d")],
        [(b":status", b"200"), (b"content-length", b"5"), (b"x-long", b"y" * 300)],
    ]
    out = []
    for huffman in (True, False):
        encoder = hpack.Encoder()
        blocks = []
        for i, headers in enumerate(requests):
            if i == 2:
                encoder.header_table_size = 256
            blocks.append(encoder.encode(headers, huffman=huffman))
        out.append(b"\x00\x00" + _SEPARATOR.join(blocks))
        out.append(b"\x00\x02" + _SEPARATOR.join(blocks))
    never = hpack.Encoder().encode([NeverIndexedHeaderTuple(b"authorization", b"secret")])
    out.append(b"\x00\x00" + never)
    for headers in requests:
        text = b"\n".join(n + b"\x00" + v for n, v in headers)
        out.append(b"\x01\x00" + text + b"\x01" + text + b"\x01\x03x" + text + b"\n\x02authorization\x00t")
    return out
