"""turnout's chunked body decoder (dataplane/http1/framing.py) fed the same bytes whole and
cut into reads several ways: every cut must give the same body bytes, the same trailers,
the same bytes after the message (the next pipelined request) and the same verdict (the
same ``HttpError`` status, cause and reason), with ``eof()`` after the last read.

The first byte picks the decoder: a request's (400) or a response's (502), and small or
default line limits, so the limits are reached by short inputs too. The cuts: one byte at
a time, fixed sizes from 2 to 7, at every CR and LF, and at points drawn from the input.
"""

from __future__ import annotations

import random
from itertools import pairwise

from dataplane.errors import HttpError
from dataplane.http1.framing import ChunkedDecoder

Fields = list[tuple[bytes, bytes]]
Outcome = tuple[bytes, list[Fields], bytes, tuple[int, str, str] | None]
_LIMITS = ((4096, 16384), (16, 48))  # (max_line_bytes, max_trailer_bytes)


def decode(pieces: list[bytes], status: int, max_line: int, max_trailer: int) -> Outcome:
    """Feed ``pieces`` in turn: (body, ends with their trailers, bytes after the message, error)."""
    body: list[bytes] = []
    ends: list[Fields] = []
    decoder = ChunkedDecoder(body.append, lambda trailers: ends.append(list(trailers)), max_line, max_trailer, status)
    decoder.start()
    rest = b""
    try:
        for i, piece in enumerate(pieces):
            after = decoder.feed(piece)
            if ends:  # the message ended: what is left is the next request's
                rest = after + b"".join(pieces[i + 1:])
                break
            assert not after, "bytes handed back before the end of the message"
        else:
            decoder.eof()
    except HttpError as exc:
        return b"".join(body), ends, b"", (exc.status, exc.cause, exc.reason)
    assert len(ends) == 1, f"{len(ends)} ends of one message"
    return b"".join(body), ends, rest, None


def _cuts(data: bytes) -> list[list[bytes]]:
    splits = [[data[i:i + 1] for i in range(len(data))]]
    for size in range(2, 8):
        splits.append([data[i:i + size] for i in range(0, len(data), size)])
    points = sorted({i + 1 for i, byte in enumerate(data) if byte in (10, 13)} | {0, len(data)})
    splits.append([data[a:b] for a, b in pairwise(points)])
    rng = random.Random(data)
    for _ in range(3):
        cut = sorted({0, len(data), *(rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 8)))})
        splits.append([data[a:b] for a, b in pairwise(cut)])
    return splits


def fuzz_one(data: bytes) -> None:
    """Decode ``data[1:]`` whole and under every cut; all must agree."""
    if not data:
        return
    status = 502 if data[0] & 1 else 400
    max_line, max_trailer = _LIMITS[(data[0] >> 1) & 1]
    message = data[1:]
    whole = decode([message], status, max_line, max_trailer)
    for pieces in _cuts(message):
        split = decode(pieces, status, max_line, max_trailer)
        assert split == whole, f"cut into {[len(p) for p in pieces]}: {split!r}, whole: {whole!r}"


def seeds() -> list[bytes]:
    """Chunked bodies as clients and servers send them, valid and not."""
    bodies = [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        b"a;name=value;q=\"quoted\"\r\n0123456789\r\n0\r\ngrpc-status: 0\r\nx-checksum:  abc \r\n\r\n",
        b"1\r\nA\r\n0\r\ncontent-length: 5\r\nHost: evil\r\nx-ok: 1\r\n\r\n",
        b"1\r\nAXX0\r\n\r\n",
        b"0x1\r\nA\r\n0\r\n\r\n",
        b"1 \r\nA\r\n0\r\n\r\n",
        b"fffffffffffffffff\r\n",
        b"3\nabc\n0\n\n",
        b"0\r\n folded: x\r\n\r\n",
        b"4\r\nabc",
    ]
    return [bytes([mode]) + body for body in bodies for mode in (0, 1, 2)]
