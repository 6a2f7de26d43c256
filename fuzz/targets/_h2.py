"""What both HTTP/2 engine targets share: splitting input into reads, and checking every
byte the engine writes (whole frames, each one well-formed, header blocks that the
``hpack`` library decodes to what was sent, nothing after the final GOAWAY)."""

from __future__ import annotations

import struct
from collections import deque

import hpack

from dataplane.http2.engine import H2Engine

Headers = list[tuple[bytes, bytes]]

# How the input is cut into reads, chosen by its first byte: 0 is one read of everything.
SPLITS = (0, 1, 2, 3, 5, 8, 9, 10, 17, 64, 100, 1000, 4096)
# Past this many reads the rest is one read: a long input cut into single bytes costs no more.
MAX_READS = 256

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
_MAX_WINDOW = 2**31 - 1
_MAX_FRAME = 2**24 - 1
# Settings whose values RFC 9113 §6.5.2 bounds.
_ENABLE_PUSH = 2
_INITIAL_WINDOW_SIZE = 4
_MAX_FRAME_SIZE = 5


def reads(data: bytes) -> list[bytes]:
    """``data[1:]`` cut into reads of the size ``data[0]`` picks (see ``SPLITS``)."""
    if not data:
        return []
    size = SPLITS[data[0] % len(SPLITS)]
    body = data[1:]
    if not size:
        return [body]
    cut = size * MAX_READS
    pieces = [body[i:i + size] for i in range(0, min(len(body), cut), size)]
    if len(body) > cut:
        pieces.append(body[cut:])
    return pieces


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, stream_id) + payload


def continued(traffic: bytes, size: int) -> bytes:
    """``traffic`` (whole frames) with each HEADERS block longer than ``size`` cut into a
    HEADERS frame and CONTINUATION frames of ``size`` bytes (padded HEADERS are left whole)."""
    out = []
    pos = 0
    while pos < len(traffic):
        length = int.from_bytes(traffic[pos:pos + 3], "big")
        ftype, flags = traffic[pos + 3], traffic[pos + 4]
        stream_id = int.from_bytes(traffic[pos + 5:pos + 9], "big")
        payload = traffic[pos + 9:pos + 9 + length]
        pos += 9 + length
        if ftype != HEADERS or length <= size or flags & 0x8 or not flags & END_HEADERS:
            out.append(frame(ftype, flags, stream_id, payload))
            continue
        pieces = [payload[i:i + size] for i in range(0, length, size)]
        out.append(frame(HEADERS, flags & ~END_HEADERS, stream_id, pieces[0]))
        for i, piece in enumerate(pieces[1:], 2):
            out.append(frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream_id, piece))
    return b"".join(out)


class OutboundChecker:
    """Parses what an engine writes and raises ``AssertionError`` on anything malformed.

    ``expect_headers`` queues the header lists the owner sent, in order: each block the
    engine writes must decode (with ``hpack``) to the next one.
    """

    def __init__(self, engine: H2Engine, skip: int = 0) -> None:
        self.engine = engine
        self.skip = skip  # bytes that are no frame (the client preface)
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 4096  # the engine's encoder never uses more
        self.expected: deque[Headers] = deque()
        self.block: list[bytes] = []
        self.block_stream = 0
        self.ended: set[int] = set()  # streams we ended (END_STREAM sent)
        self.reset: set[int] = set()  # streams we reset
        self.final = False  # the final GOAWAY went out
        self.frames = 0

    def expect_headers(self, headers: Headers) -> None:
        """The owner sent this header list."""
        self.expected.append(headers)

    def check(self, out: bytes) -> None:
        """Check one ``data_to_send()``."""
        if self.skip:
            assert out[:self.skip] == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[:self.skip], "no client preface"
            out = out[self.skip:]
            self.skip = 0
        assert not (self.final and out), "bytes written after the final GOAWAY"
        pos = 0
        last_type = -1
        while pos < len(out):
            assert len(out) - pos >= 9, "a partial frame header"
            length = int.from_bytes(out[pos:pos + 3], "big")
            ftype, flags = out[pos + 3], out[pos + 4]
            reserved_and_id = int.from_bytes(out[pos + 5:pos + 9], "big")
            assert not reserved_and_id >> 31, "reserved bit set"
            payload = out[pos + 9:pos + 9 + length]
            assert len(payload) == length, "a frame shorter than its length"
            pos += 9 + length
            self._frame(ftype, flags, reserved_and_id, payload)
            last_type = ftype
            self.frames += 1
        if self.engine.closed and not self.final:
            assert last_type == GOAWAY, "the connection closed without a GOAWAY last"
            self.final = True
        assert not self.block_stream, "a header block left open at the end of a write"

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        if self.block_stream:
            assert ftype == CONTINUATION and stream_id == self.block_stream, "HEADERS not followed by CONTINUATION"
        assert length <= min(_MAX_FRAME, max(16384, self.engine.max_outbound_frame_size)), "frame too large"
        if ftype in (DATA, HEADERS, CONTINUATION, RST_STREAM):
            assert stream_id, f"frame type {ftype} on stream 0"
            assert stream_id not in self.reset, f"frame type {ftype} after our RST_STREAM on {stream_id}"
        if ftype in (DATA, HEADERS):
            assert stream_id not in self.ended, f"frame type {ftype} after END_STREAM on {stream_id}"
        if ftype == DATA:
            if flags & END_STREAM:
                self.ended.add(stream_id)
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS and flags & END_STREAM:
                self.ended.add(stream_id)
            self.block.append(payload)
            self.block_stream = stream_id
            if flags & END_HEADERS:
                self._block_done()
        elif ftype == RST_STREAM:
            assert length == 4, "RST_STREAM not 4 bytes"
            self.reset.add(stream_id)
        elif ftype == SETTINGS:
            assert not stream_id, "SETTINGS on a stream"
            assert not (flags & ACK and length), "SETTINGS ACK with a payload"
            assert length % 6 == 0, "SETTINGS not a multiple of 6"
            for offset in range(0, length, 6):
                ident, value = struct.unpack_from(">HL", payload, offset)
                assert ident != _ENABLE_PUSH or value <= 1
                assert ident != _INITIAL_WINDOW_SIZE or value <= _MAX_WINDOW
                assert ident != _MAX_FRAME_SIZE or 16384 <= value <= _MAX_FRAME
        elif ftype == PING:
            assert not stream_id and length == 8, "malformed PING"
        elif ftype == GOAWAY:
            assert not stream_id and length >= 8, "malformed GOAWAY"
        elif ftype == WINDOW_UPDATE:
            assert length == 4, "WINDOW_UPDATE not 4 bytes"
            increment = int.from_bytes(payload, "big")
            assert 0 < increment <= _MAX_WINDOW, f"WINDOW_UPDATE of {increment}"
        else:
            raise AssertionError(f"the engine wrote a frame of type {ftype}")

    def _block_done(self) -> None:
        block = b"".join(self.block)
        self.block = []
        self.block_stream = 0
        decoded = [(bytes(n), bytes(v)) for n, v in self.decoder.decode(block, raw=True)]
        assert self.expected, "a header block nobody sent"
        sent = self.expected.popleft()
        assert decoded == sent, f"header block decodes to {decoded!r}, sent {sent!r}"


def check_bounded(engine: H2Engine, max_streams: int) -> None:
    """What the engine holds stays bounded whatever the peer sends."""
    assert len(engine.streams) <= max_streams, f"{len(engine.streams)} streams in the table"
    assert len(engine._inbuf) <= 9 + 16384, "more than one partial frame buffered"
    assert engine._cont_size <= engine._max_block, "a header block past its bound"
