"""Conformance tests of turnout's HTTP/2 engine (dataplane/http2/engine.py, RFC 9113).

The reference peer is the ``h2`` library (both roles), bytes passed in memory between
``data_to_send`` and ``receive_data``; frames h2 will not produce (malformed, padded,
abusive) are built by hand and what the engine answers is parsed with ``hyperframe``.
"""

from __future__ import annotations

import itertools
import string
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import h2.events
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.http2.engine import (
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    Event,
    H2Engine,
    InformationalResponseReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamReset,
    TrailersReceived,
)
from dataplane.http2.hpack import encode_integer

Headers = list[tuple[bytes, bytes]]

# Frame types and flags, for frames built by hand.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

REQUEST: Headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/p"), (b":authority", b"example.com")]
POST: Headers = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"), (b":authority", b"example.com")]
RESPONSE: Headers = [(b":status", b"200"), (b"content-type", b"text/plain")]


def u32(value: int) -> bytes:
    return struct.pack(">L", value)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One frame's bytes, exactly as given (``length`` may lie about the payload)."""
    size = len(payload) if length is None else length
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, ftype, flags, stream_id) + payload


def setting(ident: int, value: int) -> bytes:
    return frame(SETTINGS, 0, 0, struct.pack(">HL", ident, value))


def parse_frames(data: bytes) -> list[Frame]:
    """The frames in ``data`` (after the client preface, if it starts with it)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE):]
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        parsed, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        parsed.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        frames.append(parsed)
        pos += 9 + length
    assert pos == len(data)
    return frames


def body_of(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that are not all alike (a misplaced chunk shows)."""
    pattern = bytes((seed + i * 7) % 251 for i in range(251))
    return (pattern * (size // 251 + 1))[:size]


class RawPeer:
    """A peer driven by hand: header blocks coded by ``hpack``, frames by ``frame``."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def block(self, headers: Headers) -> bytes:
        return self.encoder.encode(headers)

    def headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.block(headers))


def raw_server_engine(**kwargs: int) -> tuple[H2Engine, RawPeer]:
    """An engine on the server side whose client is a ``RawPeer`` (settings exchanged)."""
    engine = H2Engine(False, **kwargs)
    engine.initiate_connection()
    engine.data_to_send()
    events = engine.receive_data(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
    assert [type(e) for e in events] == [RemoteSettingsChanged, SettingsAcknowledged]
    assert [type(f) for f in parse_frames(engine.data_to_send())] == [SettingsFrame]
    return engine, RawPeer()


def raw_client_engine(**kwargs: int) -> tuple[H2Engine, RawPeer]:
    """An engine on the client side whose server is a ``RawPeer`` (settings exchanged)."""
    engine = H2Engine(True, **kwargs)
    engine.initiate_connection()
    assert engine.data_to_send().startswith(PREFACE)
    engine.receive_data(frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
    engine.data_to_send()
    return engine, RawPeer()


def h2_headers(headers: Sequence[tuple[bytes | str, bytes | str]]) -> Headers:
    out: Headers = []
    for name, value in headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
        out.append((bytes(name), bytes(value)))
    return out


@dataclass
class Received:
    """What one side saw on one stream."""

    informational: list[Headers] = field(default_factory=list)
    headers: Headers | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    ended: bool = False
    reset: int | None = None


def engine_received(events: Sequence[Event]) -> dict[int, Received]:
    streams: dict[int, Received] = {}
    for event in events:
        if isinstance(event, (RequestReceived, ResponseReceived)):
            got = streams.setdefault(event.stream_id, Received())
            assert got.headers is None and not got.ended
            got.headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            got.ended = event.stream_ended
        elif isinstance(event, InformationalResponseReceived):
            streams.setdefault(event.stream_id, Received()).informational.append(
                [(bytes(n), bytes(v)) for n, v in event.headers])
        elif isinstance(event, DataReceived):
            got = streams[event.stream_id]
            assert got.headers is not None and not got.ended
            got.data += event.data
            got.ended = event.stream_ended
        elif isinstance(event, TrailersReceived):
            got = streams[event.stream_id]
            assert not got.ended
            got.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
            got.ended = True
        elif isinstance(event, StreamReset):
            streams.setdefault(event.stream_id, Received()).reset = event.error_code
    return streams


def peer_received(events: Sequence[h2.events.Event]) -> dict[int, Received]:
    streams: dict[int, Received] = {}
    for event in events:
        if isinstance(event, (h2.events.RequestReceived, h2.events.ResponseReceived)):
            got = streams.setdefault(event.stream_id, Received())
            assert got.headers is None
            got.headers = h2_headers(event.headers)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            streams.setdefault(event.stream_id, Received()).informational.append(h2_headers(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            streams[event.stream_id].data += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            streams[event.stream_id].trailers = h2_headers(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            streams.setdefault(event.stream_id, Received()).reset = event.error_code
    return streams


def cutter(sizes: Sequence[int]) -> Callable[[bytes], Iterator[bytes]]:
    """Splits bytes at arbitrary boundaries, the sizes used in turn."""
    def cut(data: bytes) -> Iterator[bytes]:
        pos = 0
        i = 0
        while pos < len(data):
            size = sizes[i % len(sizes)]
            i += 1
            yield data[pos:pos + size]
            pos += size
    return cut


def whole(data: bytes) -> Iterator[bytes]:
    yield data


class Pair:
    """The engine and an h2 peer in the other role, connected in memory. Both sides give
    back what they took (``acknowledge``) when ``ack`` is set."""

    def __init__(self, engine_client: bool, *, ack: bool = True, peer_ack: bool = True,
                 cut: Callable[[bytes], Iterator[bytes]] = whole, **kwargs: int) -> None:
        self.engine = H2Engine(engine_client, **kwargs)
        self.peer = H2Connection(H2Configuration(client_side=not engine_client, header_encoding=None))
        self.ack = ack
        self.peer_ack = peer_ack
        self.cut = cut
        self.events: list[Event] = []
        self.peer_events: list[h2.events.Event] = []
        self.engine.initiate_connection()
        self.peer.initiate_connection()
        self.pump()

    def to_peer(self) -> bool:
        out = self.engine.data_to_send()
        if not out:
            return False
        events = self.peer.receive_data(out)
        self.peer_events.extend(events)
        for event in events:
            if self.peer_ack and isinstance(event, h2.events.DataReceived):
                self.peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return True

    def to_engine(self) -> bool:
        out = self.peer.data_to_send()
        if not out:
            return False
        for piece in self.cut(out):
            events = self.engine.receive_data(piece)
            self.events.extend(events)
            for event in events:
                if self.ack and isinstance(event, DataReceived):
                    self.engine.acknowledge(event.stream_id, event.flow_controlled_length)
        return True

    def pump(self) -> None:
        for _ in range(100000):
            moved = self.to_peer()
            moved = self.to_engine() or moved
            if not moved:
                return
        raise AssertionError("the two sides never went quiet")

    def engine_send_body(self, stream_id: int, body: bytes, end_stream: bool) -> None:
        """``body`` in DATA frames no larger than ``sendable`` allows, waiting for windows."""
        self.to_peer()  # the peer knows the stream
        pos = 0
        stalls = 0
        while pos < len(body):
            room = self.engine.sendable(stream_id)
            assert room >= 0
            # Never more than the peer lets us send: h2 would raise on it; checked here too.
            assert room <= self.peer.remote_flow_control_window(stream_id)
            if room == 0:
                stalls += 1
                assert stalls < 3, "the engine's send windows never opened again"
                self.pump()
                continue
            stalls = 0
            chunk = body[pos:pos + room]
            pos += len(chunk)
            self.engine.send_data(stream_id, chunk, end_stream and pos == len(body))
            self.to_peer()
        if end_stream and not body:
            self.engine.end_stream(stream_id)

    def peer_send_body(self, stream_id: int, body: bytes, end_stream: bool, pad: int | None = None) -> None:
        """``body`` from h2 as its windows allow, the engine giving them back (a stall fails)."""
        pos = 0
        stalls = 0
        overhead = 0 if pad is None else pad + 1
        while pos < len(body):
            room = min(self.peer.local_flow_control_window(stream_id), self.peer.max_outbound_frame_size) - overhead
            if room <= 0:
                stalls += 1
                assert stalls < 3, "the engine stopped opening its receive windows"
                self.pump()
                continue
            stalls = 0
            chunk = body[pos:pos + room]
            pos += len(chunk)
            self.peer.send_data(stream_id, chunk, end_stream=end_stream and pos == len(body), pad_length=pad)
            self.to_engine()
        if end_stream and not body:
            self.peer.end_stream(stream_id)


# ---------------------------------------------------------------------- round trips

@dataclass
class Exchange:
    request: Headers
    request_body: bytes
    request_trailers: Headers | None
    response: Headers
    response_body: bytes
    response_trailers: Headers | None
    informational: list[Headers] = field(default_factory=list)


def run_exchanges(p: Pair, exchanges: Sequence[Exchange]) -> None:
    """Every request, then every response, through ``p``; what arrived is what was sent."""
    engine_client = p.engine.client_side
    ids: list[int] = []
    for ex in exchanges:
        ends_with_head = not ex.request_body and ex.request_trailers is None
        if engine_client:
            sid = p.engine.get_next_available_stream_id()
            p.engine.send_headers(sid, ex.request, ends_with_head)
            p.engine_send_body(sid, ex.request_body, ex.request_trailers is None and not ends_with_head)
            if ex.request_trailers is not None:
                p.engine.send_headers(sid, ex.request_trailers, True)
        else:
            sid = p.peer.get_next_available_stream_id()
            p.peer.send_headers(sid, ex.request, ends_with_head)
            p.peer_send_body(sid, ex.request_body, ex.request_trailers is None and not ends_with_head)
            if ex.request_trailers is not None:
                p.peer.send_headers(sid, ex.request_trailers, True)
        ids.append(sid)
    p.pump()
    requests = peer_received(p.peer_events) if engine_client else engine_received(p.events)
    for sid, ex in zip(ids, exchanges, strict=True):
        got = requests[sid]
        assert got.reset is None
        assert got.headers == ex.request
        assert bytes(got.data) == ex.request_body
        assert got.trailers == ex.request_trailers
        assert got.ended
    for sid, ex in zip(ids, exchanges, strict=True):
        ends_with_head = not ex.response_body and ex.response_trailers is None
        if engine_client:
            for info in ex.informational:
                p.peer.send_headers(sid, info)
            p.peer.send_headers(sid, ex.response, ends_with_head)
            p.peer_send_body(sid, ex.response_body, ex.response_trailers is None and not ends_with_head)
            if ex.response_trailers is not None:
                p.peer.send_headers(sid, ex.response_trailers, True)
        else:
            for info in ex.informational:
                p.engine.send_headers(sid, info)
            p.engine.send_headers(sid, ex.response, ends_with_head)
            p.engine_send_body(sid, ex.response_body, ex.response_trailers is None and not ends_with_head)
            if ex.response_trailers is not None:
                p.engine.send_headers(sid, ex.response_trailers, True)
    p.pump()
    responses = engine_received(p.events) if engine_client else peer_received(p.peer_events)
    for sid, ex in zip(ids, exchanges, strict=True):
        got = responses[sid]
        assert got.reset is None
        assert got.informational == ex.informational
        assert got.headers == ex.response
        assert bytes(got.data) == ex.response_body
        assert got.trailers == ex.response_trailers
        assert got.ended
    assert p.engine.streams == {}
    assert not any(isinstance(e, StreamReset) for e in p.events)


SIZES = [0, 1, 100, 16383, 16384, 16385, 65535, 65536, 200_000]


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_bodies(engine_client: bool, size: int) -> None:
    p = Pair(engine_client)
    ex = Exchange(POST, body_of(size, 1), None, RESPONSE, body_of(size * 2 + 3, 2), None)
    run_exchanges(p, [ex, ex])


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
@pytest.mark.parametrize("size", [0, 5, 70_000])
def test_trailers_both_ways(engine_client: bool, size: int) -> None:
    p = Pair(engine_client)
    ex = Exchange(POST, body_of(size), [(b"x-checksum", b"abc"), (b"x-more", b"1")],
                  [(b":status", b"200"), (b"content-type", b"application/grpc")], body_of(size, 9),
                  [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    run_exchanges(p, [ex])


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
def test_informational_before_final(engine_client: bool) -> None:
    p = Pair(engine_client)
    ex = Exchange(POST, b"body", None, RESPONSE, b"done", None,
                  informational=[[(b":status", b"100")], [(b":status", b"103"), (b"link", b"</s.css>; rel=preload")]])
    run_exchanges(p, [ex])


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
@pytest.mark.parametrize(("method", "status"), [(b"HEAD", b"200"), (b"GET", b"304"), (b"GET", b"204")])
def test_no_body_responses_with_content_length(engine_client: bool, method: bytes, status: bytes) -> None:
    p = Pair(engine_client)
    length = b"0" if status == b"204" else b"1234"
    request = [(b":method", method), *REQUEST[1:]]
    ex = Exchange(request, b"", None, [(b":status", status), (b"content-length", length)], b"", None)
    run_exchanges(p, [ex])


def test_content_length_is_checked_when_a_body_is_due() -> None:
    # The negative of the HEAD/304 case: a 200 to a GET declaring 1234 bytes and ending with
    # its head is malformed (RFC 9113 §8.1.1), a stream error.
    engine, raw = raw_client_engine()
    engine.send_headers(1, REQUEST, True)
    events = engine.receive_data(raw.headers(1, [(b":status", b"200"), (b"content-length", b"1234")], True))
    assert [(type(e), getattr(e, "error_code", None)) for e in events] == [(StreamReset, ErrorCodes.PROTOCOL_ERROR)]


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
def test_large_header_blocks_use_continuation_both_ways(engine_client: bool) -> None:
    big = [(b"x-big-%d" % i, body_of(9000, i).hex()[:9000].encode()) for i in range(4)]  # ~36 KB
    p = Pair(engine_client)
    request, response = REQUEST + big, RESPONSE + big
    # What the engine sends: HEADERS of at most 16384 bytes, then CONTINUATION, END_HEADERS last.
    if engine_client:
        p.engine.send_headers(1, request, True)
    else:
        p.peer.send_headers(1, request, True)
        wire = p.peer.data_to_send()
        kinds = [type(f) for f in parse_frames(wire)]
        assert kinds[0] is HeadersFrame and ContinuationFrame in kinds  # h2 split it too
        got = p.engine.receive_data(wire)
        assert isinstance(got[0], RequestReceived) and got[0].headers == request
        p.engine.send_headers(1, response, True)
    out = p.engine.data_to_send()
    frames = parse_frames(out)
    assert isinstance(frames[0], HeadersFrame) and "END_HEADERS" not in frames[0].flags
    assert all(isinstance(f, ContinuationFrame) for f in frames[1:]) and len(frames) >= 3
    assert "END_HEADERS" in frames[-1].flags and all("END_HEADERS" not in f.flags for f in frames[:-1])
    assert all(isinstance(f, (HeadersFrame, ContinuationFrame)) and len(f.data) <= 16384 for f in frames)
    peer_events = p.peer.receive_data(out)
    heads = [e for e in peer_events if isinstance(e, (h2.events.RequestReceived, h2.events.ResponseReceived))]
    assert h2_headers(heads[0].headers) == (request if engine_client else response)
    if engine_client:
        p.peer.send_headers(1, response, True)
        wire = p.peer.data_to_send()
        assert ContinuationFrame in [type(f) for f in parse_frames(wire)]
        got = p.engine.receive_data(wire)
        assert isinstance(got[0], ResponseReceived) and got[0].headers == response and got[0].stream_ended
    assert p.engine.streams == {}


def test_continuation_frames_split_anywhere_in_the_block() -> None:
    engine, raw = raw_server_engine()
    block = raw.block([*REQUEST, (b"x-a", b"a" * 300)])
    cuts = [0, 1, 2, 50, len(block)]
    wire = frame(HEADERS, END_STREAM, 1, block[:cuts[1]])
    for a, b in itertools.pairwise(cuts[1:]):
        wire += frame(CONTINUATION, END_HEADERS if b == len(block) else 0, 1, block[a:b])
    events = engine.receive_data(wire)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    assert events[0].headers == [*REQUEST, (b"x-a", b"a" * 300)] and events[0].stream_ended


def test_sixty_three_continuation_frames_are_fine() -> None:
    # The CONTINUATION count limit (64 frames a block, as h2) leaves room for small frames.
    engine, raw = raw_server_engine()
    block = raw.block([*REQUEST, (b"x-a", b"a" * 630)])
    step = len(block) // 63 + 1
    pieces = [block[i:i + step] for i in range(0, len(block), step)]
    assert len(pieces) <= 63
    pieces += [b""] * (63 - len(pieces))
    wire = frame(HEADERS, END_STREAM, 1, b"") + b"".join(
        frame(CONTINUATION, END_HEADERS if i == 62 else 0, 1, piece) for i, piece in enumerate(pieces))
    events = engine.receive_data(wire)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    assert events[0].headers == [*REQUEST, (b"x-a", b"a" * 630)]


@pytest.mark.parametrize("table_size", [0, 256, 100_000])
def test_peer_header_table_size_is_honoured(table_size: int) -> None:
    # h2 announces a smaller (or larger) HPACK table: what the engine encodes must still decode
    # there, across many blocks that would overflow a small table.
    p = Pair(False)
    p.peer.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
    p.pump()
    for i in range(20):
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, REQUEST, True)
        p.pump()
        p.engine.send_headers(sid, [*RESPONSE, (b"x-n-%d" % (i % 7), b"v" * (i * 10))], True)
        p.pump()
        assert peer_received(p.peer_events)[sid].headers == [*RESPONSE, (b"x-n-%d" % (i % 7), b"v" * (i * 10))]


def test_padded_data_and_headers_from_h2_and_by_hand() -> None:
    # h2 pads DATA itself.
    p = Pair(False)
    p.peer.send_headers(1, POST)
    p.peer_send_body(1, body_of(40_000), True, pad=200)
    p.pump()
    data = [e for e in p.events if isinstance(e, DataReceived)]
    assert b"".join(e.data for e in data) == body_of(40_000)
    assert all(e.flow_controlled_length == len(e.data) + 201 for e in data)
    # HEADERS with PADDED, PRIORITY and both, and DATA padded to nothing, by hand.
    engine, raw = raw_server_engine()
    block = raw.block(POST)
    padded = frame(HEADERS, PADDED | END_HEADERS, 1, bytes([7]) + block + bytes(7))
    prio = frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 3, u32(1) + bytes([15]) + raw.block(POST))
    both = frame(HEADERS, PADDED | PRIORITY_FLAG | END_HEADERS, 5, bytes([3]) + u32(0x80000001) + bytes([200])
                 + raw.block(POST) + b"\xff\xff\xff")
    events = engine.receive_data(padded + prio + both)
    assert [(type(e), getattr(e, "headers", None)) for e in events] == [(RequestReceived, POST)] * 3
    events = engine.receive_data(frame(DATA, PADDED, 1, bytes([9]) + b"hello" + bytes(9))
                                 + frame(DATA, PADDED | END_STREAM, 1, bytes([4]) + bytes(4)))
    assert [(e.data, e.flow_controlled_length, e.stream_ended) for e in events
            if isinstance(e, DataReceived)] == [(b"hello", 15, False), (b"", 5, True)]
    # Padded response HEADERS and DATA to an engine client.
    client, server = raw_client_engine()
    client.send_headers(1, REQUEST, True)
    events = client.receive_data(frame(HEADERS, PADDED | END_HEADERS, 1, bytes([2]) + server.block(RESPONSE) + b"zz")
                                 + frame(DATA, PADDED | END_STREAM, 1, bytes([1]) + b"ok" + b"z"))
    assert isinstance(events[0], ResponseReceived) and events[0].headers == RESPONSE
    assert isinstance(events[1], DataReceived) and events[1].data == b"ok" and events[1].stream_ended
    assert client.streams == {}


def test_priority_flagged_headers_and_priority_frames_from_h2() -> None:
    p = Pair(False)
    p.peer.send_headers(1, REQUEST, True, priority_weight=200, priority_depends_on=0, priority_exclusive=True)
    p.peer.send_headers(3, REQUEST, True, priority_weight=1, priority_depends_on=1, priority_exclusive=False)
    p.peer.prioritize(5, weight=16, depends_on=3)  # a PRIORITY frame on an idle stream is allowed
    p.pump()
    assert [type(e) for e in p.events if not isinstance(e, (RemoteSettingsChanged, SettingsAcknowledged))] == [
        RequestReceived, RequestReceived, PriorityUpdated]
    assert engine_received(p.events)[3].headers == REQUEST
    # Stream 5 is still idle: the peer may open it.
    p.peer.send_headers(5, REQUEST, True)
    p.pump()
    assert engine_received(p.events)[5].headers == REQUEST


# ---------------------------------------------------------------------- flow control

def test_engine_sender_stops_at_the_peers_windows() -> None:
    p = Pair(False, peer_ack=False)  # h2 takes nothing back: only 65535 bytes may be sent
    p.peer.send_headers(1, REQUEST, True)
    p.peer.send_headers(3, REQUEST, True)
    p.pump()
    for sid in (1, 3):
        p.engine.send_headers(sid, RESPONSE)
    sent = 0
    while (room := p.engine.sendable(1)) > 0:
        p.engine.send_data(1, bytes(room))
        sent += room
    assert sent == 65535 and p.engine.local_flow_control_window(1) == 0
    assert p.engine.sendable(3) == 0  # the connection window is spent too
    with pytest.raises(ProtocolError):
        p.engine.send_data(3, b"x")
    p.pump()  # h2 raises FlowControlError if it got a byte too many
    received = peer_received(p.peer_events)
    assert len(received[1].data) == 65535
    # h2 gives back 1000 bytes on the connection and on stream 3 only.
    p.peer.increment_flow_control_window(1000)
    p.peer.increment_flow_control_window(1000, stream_id=3)
    p.pump()
    assert p.engine.sendable(1) == 0 and p.engine.sendable(3) == 1000
    p.engine.send_data(3, bytes(1000), True)
    p.pump()
    assert len(peer_received(p.peer_events)[3].data) == 1000


def test_initial_window_size_decrease_makes_windows_negative() -> None:
    p = Pair(False, peer_ack=False)
    p.peer.send_headers(1, REQUEST, True)
    p.pump()
    p.engine.send_headers(1, RESPONSE)
    p.engine.send_data(1, bytes(16384))
    p.engine.send_data(1, bytes(16384))
    p.pump()
    p.peer.increment_flow_control_window(10**6)  # the connection is not what limits
    p.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    p.pump()
    # 65535 - 32768 sent, then 1000 - 65535: the window is below zero (RFC 9113 §6.9.2).
    assert p.engine.local_flow_control_window(1) == 1000 - 32768
    assert p.engine.sendable(1) == 0
    with pytest.raises(ProtocolError):
        p.engine.send_data(1, b"x")
    # A new stream starts with the new initial window.
    p.peer.send_headers(3, REQUEST, True)
    p.pump()
    p.engine.send_headers(3, RESPONSE)
    assert p.engine.sendable(3) == 1000
    # Giving back 32768 on stream 1 leaves it at 1000 - 32768 + 32768 = 1000.
    p.peer.acknowledge_received_data(32768, 1)
    p.pump()
    assert p.engine.sendable(1) == p.peer.remote_flow_control_window(1)
    # An increase applies to open streams too.
    p.peer.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    p.pump()
    assert p.engine.local_flow_control_window(3) == 100_000
    p.engine_send_body(3, body_of(100_000), True)
    p.pump()
    assert bytes(peer_received(p.peer_events)[3].data) == body_of(100_000)


def test_max_frame_size_increase() -> None:
    p = Pair(False)
    p.peer.update_settings({SettingCodes.MAX_FRAME_SIZE: 65536, SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    p.peer.increment_flow_control_window(1 << 20)
    p.peer.send_headers(1, REQUEST, True)
    p.pump()
    assert p.engine.max_outbound_frame_size == 65536
    big = [(b"x-big", b"v" * 30_000)]
    p.engine.send_headers(1, RESPONSE + big)
    assert p.engine.sendable(1) == 65536
    p.engine.send_data(1, body_of(65536), True)
    out = p.engine.data_to_send()
    frames = parse_frames(out)
    assert len(frames) == 2 and isinstance(frames[0], HeadersFrame)  # one HEADERS, no CONTINUATION
    assert isinstance(frames[1], DataFrame) and len(frames[1].data) == 65536
    events = p.peer.receive_data(out)
    assert [len(e.data) for e in events if isinstance(e, h2.events.DataReceived)] == [65536]


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
@pytest.mark.parametrize(("streams", "size"), [(1, 5 << 20), (6, 1 << 20)])
@pytest.mark.parametrize("window", [65535, 1 << 20])
def test_receiver_window_updates_never_stall_the_peer(engine_client: bool, streams: int, size: int,
                                                      window: int) -> None:
    p = Pair(engine_client, initial_window_size=window, connection_window_size=window)
    body = body_of(size, 3)
    ids: list[int] = []
    for _ in range(streams):
        if engine_client:
            sid = p.engine.get_next_available_stream_id()
            p.engine.send_headers(sid, REQUEST, True)
        else:
            sid = p.peer.get_next_available_stream_id()
            p.peer.send_headers(sid, POST)
        ids.append(sid)
    p.pump()
    if engine_client:
        for sid in ids:
            p.peer.send_headers(sid, RESPONSE)
    # The peer sends round robin; a send that finds no window pumps, and fails after two
    # pumps without window (peer_send_body's stall check).
    pos = dict.fromkeys(ids, 0)
    stalls = 0
    while any(pos[sid] < size for sid in ids):
        progressed = False
        for sid in ids:
            room = min(p.peer.local_flow_control_window(sid), p.peer.max_outbound_frame_size, size - pos[sid])
            if pos[sid] < size and room > 0:
                p.peer.send_data(sid, body[pos[sid]:pos[sid] + room], end_stream=pos[sid] + room == size)
                pos[sid] += room
                progressed = True
        p.pump()
        stalls = 0 if progressed else stalls + 1
        assert stalls < 2, "the peer stalled: the engine did not open its windows"
    received = engine_received(p.events)
    for sid in ids:
        assert len(received[sid].data) == size and received[sid].data == body and received[sid].ended
    if engine_client:
        assert p.engine.streams == {}


def test_stream_window_exceeded_is_a_stream_error() -> None:
    engine, raw = raw_server_engine(initial_window_size=1000, connection_window_size=1 << 20)
    engine.receive_data(raw.headers(1, POST))
    events = engine.receive_data(frame(DATA, 0, 1, bytes(600)) + frame(DATA, 0, 1, bytes(401)))
    assert isinstance(events[0], DataReceived)
    assert [(type(e), e.stream_id, e.error_code, e.remote_reset) for e in events[1:]
            if isinstance(e, StreamReset)] == [(StreamReset, 1, ErrorCodes.FLOW_CONTROL_ERROR, False)]
    rst = [f for f in parse_frames(engine.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(1, ErrorCodes.FLOW_CONTROL_ERROR)]
    assert 1 not in engine.streams
    # The connection goes on: stream 3 carries its 1000 bytes.
    events = engine.receive_data(raw.headers(3, POST) + frame(DATA, END_STREAM, 3, bytes(1000)))
    assert [type(e) for e in events] == [RequestReceived, DataReceived]
    assert not engine.closed


def test_stream_window_counts_before_settings_are_acknowledged() -> None:
    # Until the peer acknowledges our smaller INITIAL_WINDOW_SIZE, the default 65535 holds.
    engine = H2Engine(False, initial_window_size=1000)
    engine.initiate_connection()
    raw = RawPeer()
    events = engine.receive_data(PREFACE + frame(SETTINGS, 0, 0) + raw.headers(1, POST)
                                 + frame(DATA, 0, 1, bytes(16384)))
    assert not any(isinstance(e, StreamReset) for e in events)
    events = engine.receive_data(frame(SETTINGS, ACK, 0) + frame(DATA, 0, 1, bytes(1)))
    # Now 65535 - 16384 + (1000 - 65535) < 0: the next byte breaks the stream's window.
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCodes.FLOW_CONTROL_ERROR for e in events)


def test_connection_window_reopens_as_data_arrives() -> None:
    # The engine gives back connection window as DATA arrives (stream windows bound what is
    # held): a peer may send far beyond 65535 on many streams without any stream update.
    engine, raw = raw_server_engine()
    increments = 0
    sent = 0
    for sid in range(1, 41, 2):
        engine.receive_data(raw.headers(sid, POST))
        for _ in range(3):
            engine.receive_data(frame(DATA, 0, sid, bytes(16384)))
            sent += 16384
        increments += sum(f.window_increment for f in parse_frames(engine.data_to_send())
                          if isinstance(f, WindowUpdateFrame) and f.stream_id == 0)
        assert 65535 - sent + increments >= 32768  # the peer's view of the connection window
    assert not engine.closed and sent == 20 * 3 * 16384


# ---------------------------------------------------------------------- property test

_NAME = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=10).map(
    lambda s: b"x-" + s.encode())
_VALUE = st.text(alphabet=string.ascii_letters + string.digits + " -_/.;=,:", max_size=30).map(
    lambda s: s.strip().encode())
_FIELDS = st.lists(st.tuples(_NAME, _VALUE), max_size=6)
_BODY = st.one_of(st.binary(max_size=200), st.builds(body_of, st.sampled_from([16384, 16385, 40_000, 70_000]),
                                                       st.integers(0, 250)))
_TRAILERS = st.one_of(st.none(), st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=4))


@st.composite
def _exchanges(draw: st.DrawFn) -> Exchange:
    return Exchange(POST + draw(_FIELDS), draw(_BODY), draw(_TRAILERS),
                    [(b":status", draw(st.sampled_from([b"200", b"404", b"503"]))), *draw(_FIELDS)],
                    draw(_BODY), draw(_TRAILERS))


@settings(max_examples=100, deadline=None)
@given(st.booleans(), st.lists(_exchanges(), min_size=1, max_size=4),
       st.lists(st.integers(1, 3000), min_size=1, max_size=6))
def test_what_is_sent_arrives_whatever_the_byte_boundaries(engine_client: bool, exchanges: list[Exchange],
                                                           cuts: list[int]) -> None:
    p = Pair(engine_client, cut=cutter(cuts))
    run_exchanges(p, exchanges)
    # And the connection is still good for one more exchange.
    run_exchanges(p, [Exchange(REQUEST, b"", None, RESPONSE, b"end", None)])


# ---------------------------------------------------------------------- connection errors

def _open(raw: RawPeer) -> bytes:
    return raw.headers(1, POST)


def _bomb(raw: RawPeer) -> bytes:
    # One 4000-byte entry added to the table, then referenced 20 times: 80 KB of header list
    # from a 4 KB block.
    literal = b"\x40" + bytes([6]) + b"x-bomb" + encode_integer(4000, 7, 0) + b"v" * 4000
    return frame(HEADERS, END_HEADERS | END_STREAM, 3, raw.block(REQUEST) + literal + b"\xbe" * 20)


_CONNECTION_ERRORS: list[tuple[str, Callable[[RawPeer], bytes], int]] = [
    ("frame-larger-than-16384", lambda r: frame(DATA, 0, 1, b"", length=16385), ErrorCodes.FRAME_SIZE_ERROR),
    ("data-on-stream-0", lambda r: frame(DATA, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),
    ("headers-on-stream-0", lambda r: frame(HEADERS, END_HEADERS, 0, r.block(REQUEST)), ErrorCodes.PROTOCOL_ERROR),
    ("rst-stream-on-stream-0", lambda r: frame(RST_STREAM, 0, 0, u32(8)), ErrorCodes.PROTOCOL_ERROR),
    ("priority-on-stream-0", lambda r: frame(PRIORITY, 0, 0, bytes(5)), ErrorCodes.PROTOCOL_ERROR),
    ("ping-on-a-stream", lambda r: frame(PING, 0, 1, bytes(8)), ErrorCodes.PROTOCOL_ERROR),
    ("settings-on-a-stream", lambda r: frame(SETTINGS, 0, 1), ErrorCodes.PROTOCOL_ERROR),
    ("goaway-on-a-stream", lambda r: frame(GOAWAY, 0, 1, bytes(8)), ErrorCodes.PROTOCOL_ERROR),
    ("data-on-idle-stream", lambda r: frame(DATA, 0, 3, b"x"), ErrorCodes.PROTOCOL_ERROR),
    ("rst-stream-on-idle-stream", lambda r: frame(RST_STREAM, 0, 5, u32(8)), ErrorCodes.PROTOCOL_ERROR),
    ("window-update-on-idle-stream", lambda r: frame(WINDOW_UPDATE, 0, 3, u32(1)), ErrorCodes.PROTOCOL_ERROR),
    ("even-stream-opened-by-client", lambda r: r.headers(2, REQUEST, True), ErrorCodes.PROTOCOL_ERROR),
    ("push-promise", lambda r: frame(PUSH_PROMISE, END_HEADERS, 1, u32(2) + r.block(REQUEST)),
     ErrorCodes.PROTOCOL_ERROR),
    ("continuation-without-headers", lambda r: frame(CONTINUATION, END_HEADERS, 1, r.block([(b"x-a", b"1")])),
     ErrorCodes.PROTOCOL_ERROR),
    ("frame-while-continuation-expected",
     lambda r: frame(HEADERS, 0, 3, r.block(REQUEST)) + frame(PING, 0, 0, bytes(8)), ErrorCodes.PROTOCOL_ERROR),
    ("continuation-on-another-stream",
     lambda r: frame(HEADERS, 0, 3, r.block(REQUEST)) + frame(CONTINUATION, END_HEADERS, 5, b""),
     ErrorCodes.PROTOCOL_ERROR),
    ("continuation-flood",
     lambda r: frame(HEADERS, 0, 3, r.block(REQUEST)) + frame(CONTINUATION, 0, 3, bytes(16384)) * 5,
     ErrorCodes.ENHANCE_YOUR_CALM),
    ("empty-continuation-flood",
     lambda r: frame(HEADERS, 0, 3, r.block(REQUEST)) + frame(CONTINUATION, 0, 3) * 100_000,
     ErrorCodes.ENHANCE_YOUR_CALM),
    ("hpack-index-0", lambda r: frame(HEADERS, END_HEADERS, 3, b"\x80"), ErrorCodes.COMPRESSION_ERROR),
    ("hpack-index-out-of-table", lambda r: frame(HEADERS, END_HEADERS, 3, b"\xff\x80\x01"),
     ErrorCodes.COMPRESSION_ERROR),
    ("hpack-truncated-literal", lambda r: frame(HEADERS, END_HEADERS, 3, b"\x40\x05ab"), ErrorCodes.COMPRESSION_ERROR),
    ("hpack-bad-huffman", lambda r: frame(HEADERS, END_HEADERS, 3, b"\x40\x81\x00\x81\xff"),
     ErrorCodes.COMPRESSION_ERROR),
    ("hpack-table-size-above-settings", lambda r: frame(HEADERS, END_HEADERS, 3, b"\x3f\xe1\x3f"),
     ErrorCodes.COMPRESSION_ERROR),
    ("hpack-bomb", _bomb, ErrorCodes.ENHANCE_YOUR_CALM),
    ("oversized-header-list", lambda r: frame(HEADERS, END_HEADERS, 3, b"\x82" * 1600), ErrorCodes.ENHANCE_YOUR_CALM),
    ("ping-of-7-bytes", lambda r: frame(PING, 0, 0, bytes(7)), ErrorCodes.FRAME_SIZE_ERROR),
    ("ping-of-9-bytes", lambda r: frame(PING, 0, 0, bytes(9)), ErrorCodes.FRAME_SIZE_ERROR),
    ("rst-stream-of-3-bytes", lambda r: frame(RST_STREAM, 0, 1, bytes(3)), ErrorCodes.FRAME_SIZE_ERROR),
    ("rst-stream-of-5-bytes", lambda r: frame(RST_STREAM, 0, 1, bytes(5)), ErrorCodes.FRAME_SIZE_ERROR),
    ("window-update-of-3-bytes", lambda r: frame(WINDOW_UPDATE, 0, 0, bytes(3)), ErrorCodes.FRAME_SIZE_ERROR),
    ("stream-window-update-of-5-bytes", lambda r: frame(WINDOW_UPDATE, 0, 1, bytes(5)), ErrorCodes.FRAME_SIZE_ERROR),
    ("priority-of-4-bytes", lambda r: frame(PRIORITY, 0, 1, bytes(4)), ErrorCodes.FRAME_SIZE_ERROR),
    ("settings-of-5-bytes", lambda r: frame(SETTINGS, 0, 0, bytes(5)), ErrorCodes.FRAME_SIZE_ERROR),
    ("settings-ack-with-payload", lambda r: frame(SETTINGS, ACK, 0, bytes(6)), ErrorCodes.FRAME_SIZE_ERROR),
    ("goaway-of-7-bytes", lambda r: frame(GOAWAY, 0, 0, bytes(7)), ErrorCodes.FRAME_SIZE_ERROR),
    ("enable-push-2", lambda r: setting(2, 2), ErrorCodes.PROTOCOL_ERROR),
    ("initial-window-size-2^31", lambda r: setting(4, 2**31), ErrorCodes.FLOW_CONTROL_ERROR),
    ("initial-window-size-overflows-a-stream",
     lambda r: frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1 - 65535)) + setting(4, 65536), ErrorCodes.FLOW_CONTROL_ERROR),
    ("max-frame-size-16383", lambda r: setting(5, 16383), ErrorCodes.PROTOCOL_ERROR),
    ("max-frame-size-2^24", lambda r: setting(5, 2**24), ErrorCodes.PROTOCOL_ERROR),
    ("window-update-0-on-connection", lambda r: frame(WINDOW_UPDATE, 0, 0, u32(0)), ErrorCodes.PROTOCOL_ERROR),
    ("connection-window-overflow",
     lambda r: frame(WINDOW_UPDATE, 0, 0, u32(2**30)) + frame(WINDOW_UPDATE, 0, 0, u32(2**30)),
     ErrorCodes.FLOW_CONTROL_ERROR),
    ("data-padding-longer-than-frame", lambda r: frame(DATA, PADDED, 1, bytes([5]) + b"abcd"),
     ErrorCodes.PROTOCOL_ERROR),
    ("data-padded-without-pad-length", lambda r: frame(DATA, PADDED, 1, b""), ErrorCodes.FRAME_SIZE_ERROR),
    ("headers-padding-longer-than-frame",
     lambda r: frame(HEADERS, PADDED | END_HEADERS, 3, bytes([200]) + r.block(REQUEST)), ErrorCodes.PROTOCOL_ERROR),
    ("headers-padding-longer-than-priority-leaves",
     lambda r: frame(HEADERS, PADDED | PRIORITY_FLAG | END_HEADERS, 3, bytes([4]) + bytes(5) + b"abc"),
     ErrorCodes.PROTOCOL_ERROR),
    ("headers-too-short-for-priority", lambda r: frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 3, bytes(4)),
     ErrorCodes.FRAME_SIZE_ERROR),
]


def assert_connection_error(engine: H2Engine, wire: bytes, code: int, last_stream_id: int,
                            peer: H2Connection | None = None) -> None:
    """``wire`` is a connection error ``code``: raised, answered by GOAWAY, nothing after."""
    with pytest.raises(ProtocolError) as info:
        engine.receive_data(wire)
    assert info.value.error_code == code
    out = engine.data_to_send()
    goaways = [f for f in parse_frames(out) if isinstance(f, GoAwayFrame)]
    assert [(f.error_code, f.last_stream_id) for f in goaways] == [(code, last_stream_id)]
    assert isinstance(parse_frames(out)[-1], GoAwayFrame)  # the last frame queued
    if peer is not None:
        terminated = [e for e in peer.receive_data(out) if isinstance(e, h2.events.ConnectionTerminated)]
        assert [(e.error_code, e.last_stream_id) for e in terminated] == [(code, last_stream_id)]
    assert engine.closed
    # Nothing more is read or sent.
    assert engine.receive_data(frame(PING, 0, 0, bytes(8))) == []
    for sid in (1, 3):
        with pytest.raises(ProtocolError):
            engine.send_headers(sid, RESPONSE if not engine.client_side else REQUEST, True)
        with pytest.raises(ProtocolError):
            engine.send_data(sid, b"x")
    assert engine.sendable(1) == -1
    engine.ping(b"12345678")
    engine.reset_stream(1)
    engine.goaway(0)
    assert engine.data_to_send() == b""


@pytest.mark.parametrize(("wire", "code"), [pytest.param(w, c, id=n) for n, w, c in _CONNECTION_ERRORS])
def test_connection_errors(wire: Callable[[RawPeer], bytes], code: int) -> None:
    engine, raw = raw_server_engine()
    assert [type(e) for e in engine.receive_data(_open(raw))] == [RequestReceived]
    assert_connection_error(engine, wire(raw), code, 1)


@pytest.mark.parametrize(("wire", "code"), [pytest.param(w, c, id=n) for n, w, c in _CONNECTION_ERRORS])
def test_connection_errors_split_into_small_pieces(wire: Callable[[RawPeer], bytes], code: int) -> None:
    # The same verdicts when the bytes come 7 at a time.
    engine, raw = raw_server_engine()
    engine.receive_data(_open(raw))
    data = wire(raw)
    with pytest.raises(ProtocolError) as info:
        for i in range(0, len(data), 7):
            engine.receive_data(data[i:i + 7])
    assert info.value.error_code == code
    assert [f.error_code for f in parse_frames(engine.data_to_send()) if isinstance(f, GoAwayFrame)] == [code]


def test_connection_error_goaway_decodes_at_an_h2_client() -> None:
    p = Pair(False)
    p.peer.send_headers(1, POST)
    p.pump()
    assert_connection_error(p.engine, frame(DATA, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR, 1, p.peer)


@pytest.mark.parametrize("preface", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
                                     b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"])
def test_bad_preface(preface: bytes) -> None:
    engine = H2Engine(False)
    engine.initiate_connection()
    engine.data_to_send()
    assert engine.receive_data(PREFACE[:10]) == []  # a partial preface waits for the rest
    engine2 = H2Engine(False)
    engine2.initiate_connection()
    engine2.data_to_send()
    assert_connection_error(engine2, preface, ErrorCodes.PROTOCOL_ERROR, 0)


_CLIENT_CONNECTION_ERRORS: list[tuple[str, Callable[[RawPeer], bytes], int]] = [
    ("push-promise", lambda r: frame(PUSH_PROMISE, END_HEADERS, 1, u32(2) + r.block(REQUEST)),
     ErrorCodes.PROTOCOL_ERROR),
    ("headers-on-even-stream", lambda r: r.headers(2, RESPONSE, True), ErrorCodes.PROTOCOL_ERROR),
    ("headers-on-stream-not-opened", lambda r: r.headers(3, RESPONSE, True), ErrorCodes.PROTOCOL_ERROR),
    ("data-on-idle-stream", lambda r: frame(DATA, 0, 5, b"x"), ErrorCodes.PROTOCOL_ERROR),
    ("window-update-on-idle-stream", lambda r: frame(WINDOW_UPDATE, 0, 3, u32(5)), ErrorCodes.PROTOCOL_ERROR),
    ("hpack-garbage", lambda r: frame(HEADERS, END_HEADERS, 1, b"\x80"), ErrorCodes.COMPRESSION_ERROR),
    ("continuation-flood",
     lambda r: frame(HEADERS, 0, 1, r.block(RESPONSE)) + frame(CONTINUATION, 0, 1, bytes(16384)) * 5,
     ErrorCodes.ENHANCE_YOUR_CALM),
]


@pytest.mark.parametrize(("wire", "code"), [pytest.param(w, c, id=n) for n, w, c in _CLIENT_CONNECTION_ERRORS])
def test_connection_errors_engine_client(wire: Callable[[RawPeer], bytes], code: int) -> None:
    engine, raw = raw_client_engine()
    engine.send_headers(1, REQUEST)
    engine.data_to_send()
    assert_connection_error(engine, wire(raw), code, 0)


def test_continuation_flood_limit_follows_max_header_list_size() -> None:
    engine, raw = raw_server_engine(max_header_list_size=4096)
    block = raw.block(REQUEST)
    # 7500 bytes across CONTINUATIONs: beyond 4096 + 1024, before END_HEADERS ever comes.
    wire = frame(HEADERS, 0, 1, block) + frame(CONTINUATION, 0, 1, bytes(2500)) * 3
    assert_connection_error(engine, wire, ErrorCodes.ENHANCE_YOUR_CALM, 0)


# ---------------------------------------------------------------------- stream errors

_SERVER_STREAM_ERRORS: list[tuple[str, Callable[[RawPeer], bytes], int]] = [
    ("data-after-end-stream", lambda r: frame(DATA, END_STREAM, 1, b"a") + frame(DATA, 0, 1, b"b"),
     ErrorCodes.STREAM_CLOSED),
    ("headers-after-end-stream", lambda r: frame(DATA, END_STREAM, 1, b"a") + r.headers(1, [(b"x-t", b"1")], True),
     ErrorCodes.STREAM_CLOSED),
    ("trailers-without-end-stream", lambda r: r.headers(1, [(b"x-t", b"1")]), ErrorCodes.PROTOCOL_ERROR),
    ("trailers-with-pseudo-field", lambda r: r.headers(1, [(b":path", b"/x")], True), ErrorCodes.PROTOCOL_ERROR),
    ("window-update-0-on-stream", lambda r: frame(WINDOW_UPDATE, 0, 1, u32(0)), ErrorCodes.PROTOCOL_ERROR),
    ("stream-window-overflow", lambda r: frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1)), ErrorCodes.FLOW_CONTROL_ERROR),
    ("stream-window-exceeded", lambda r: frame(DATA, 0, 1, bytes(16384)) * 4 + frame(DATA, 0, 1, bytes(1)),
     ErrorCodes.FLOW_CONTROL_ERROR),
]


@pytest.mark.parametrize(("wire", "code"), [pytest.param(w, c, id=n) for n, w, c in _SERVER_STREAM_ERRORS])
def test_stream_errors_engine_server(wire: Callable[[RawPeer], bytes], code: int) -> None:
    engine, raw = raw_server_engine(connection_window_size=1 << 20)
    engine.receive_data(raw.headers(1, POST))
    events = engine.receive_data(wire(raw))
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [(1, code, False)]
    assert events[-1] is resets[0]
    rst = [f for f in parse_frames(engine.data_to_send()) if isinstance(f, (RstStreamFrame, GoAwayFrame))]
    assert [(type(f), f.stream_id, f.error_code) for f in rst] == [(RstStreamFrame, 1, code)]
    assert engine.streams == {} and not engine.closed
    with pytest.raises(ProtocolError):
        engine.send_headers(1, RESPONSE, True)
    # Late frames on the reset stream are ignored (late trailers still feed the HPACK table);
    # stream 3 works, its head referring to what the late trailers added.
    events = engine.receive_data(frame(DATA, 0, 1, b"late") + raw.headers(1, [(b"x-n", b"2")], True)
                                 + raw.headers(3, [*POST, (b"x-n", b"2")])
                                 + frame(DATA, END_STREAM, 3, b"body"))
    received = engine_received(events)
    assert list(received) == [3]
    assert received[3].headers == [*POST, (b"x-n", b"2")] and received[3].data == b"body" and received[3].ended
    engine.send_headers(3, RESPONSE, True)
    assert [type(f) for f in parse_frames(engine.data_to_send())] == [HeadersFrame]
    assert engine.streams == {}


_CLIENT_STREAM_ERRORS: list[tuple[str, Callable[[RawPeer], bytes], int]] = [
    ("no-status", lambda r: r.headers(1, [(b"content-type", b"x")]), ErrorCodes.PROTOCOL_ERROR),
    ("status-of-2-digits", lambda r: r.headers(1, [(b":status", b"20")]), ErrorCodes.PROTOCOL_ERROR),
    ("status-not-digits", lambda r: r.headers(1, [(b":status", b"2x0")]), ErrorCodes.PROTOCOL_ERROR),
    ("status-101", lambda r: r.headers(1, [(b":status", b"101")]), ErrorCodes.PROTOCOL_ERROR),
    ("two-statuses", lambda r: r.headers(1, [(b":status", b"200"), (b":status", b"200")]), ErrorCodes.PROTOCOL_ERROR),
    ("request-pseudo-field", lambda r: r.headers(1, [(b":status", b"200"), (b":path", b"/")]),
     ErrorCodes.PROTOCOL_ERROR),
    ("pseudo-after-regular", lambda r: r.headers(1, [(b"x-a", b"1"), (b":status", b"200")]), ErrorCodes.PROTOCOL_ERROR),
    ("uppercase-name", lambda r: r.headers(1, [(b":status", b"200"), (b"X-Up", b"1")]), ErrorCodes.PROTOCOL_ERROR),
    ("connection-header", lambda r: r.headers(1, [(b":status", b"200"), (b"connection", b"close")]),
     ErrorCodes.PROTOCOL_ERROR),
    ("transfer-encoding", lambda r: r.headers(1, [(b":status", b"200"), (b"transfer-encoding", b"chunked")]),
     ErrorCodes.PROTOCOL_ERROR),
    ("newline-in-value", lambda r: r.headers(1, [(b":status", b"200"), (b"x-a", b"a\nb")]), ErrorCodes.PROTOCOL_ERROR),
    ("value-with-leading-space", lambda r: r.headers(1, [(b":status", b"200"), (b"x-a", b" a")]),
     ErrorCodes.PROTOCOL_ERROR),
    ("informational-ending-stream", lambda r: r.headers(1, [(b":status", b"100")], True), ErrorCodes.PROTOCOL_ERROR),
    ("bad-content-length", lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"1x")]),
     ErrorCodes.PROTOCOL_ERROR),
    ("conflicting-content-lengths",
     lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")]),
     ErrorCodes.PROTOCOL_ERROR),
    # More digits than int() converts (4,300): a ValueError once escaped the engine.
    ("content-length-4301-digits", lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"1" * 4301)]),
     ErrorCodes.PROTOCOL_ERROR),
    ("content-length-19-digits", lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"1" * 19)]),
     ErrorCodes.PROTOCOL_ERROR),
    ("more-data-than-content-length",
     lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"3")]) + frame(DATA, END_STREAM, 1, b"abcd"),
     ErrorCodes.PROTOCOL_ERROR),
    ("less-data-than-content-length",
     lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"5")]) + frame(DATA, END_STREAM, 1, b"abc"),
     ErrorCodes.PROTOCOL_ERROR),
    ("trailers-before-content-length",
     lambda r: r.headers(1, [(b":status", b"200"), (b"content-length", b"5")]) + frame(DATA, 0, 1, b"abc")
     + r.headers(1, [(b"x-t", b"1")], True), ErrorCodes.PROTOCOL_ERROR),
    ("data-before-response-head", lambda r: frame(DATA, 0, 1, b"abc"), ErrorCodes.PROTOCOL_ERROR),
    ("data-after-end-stream",
     lambda r: r.headers(1, RESPONSE, True) + frame(DATA, 0, 1, b"abc"), ErrorCodes.STREAM_CLOSED),
]


@pytest.mark.parametrize(("wire", "code"), [pytest.param(w, c, id=n) for n, w, c in _CLIENT_STREAM_ERRORS])
def test_stream_errors_engine_client(wire: Callable[[RawPeer], bytes], code: int) -> None:
    engine, raw = raw_client_engine()
    engine.send_headers(1, POST)  # the request stays open: the stream is in the table throughout
    engine.data_to_send()
    events = engine.receive_data(wire(raw))
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [(1, code, False)]
    assert events[-1] is resets[0]
    assert not any(isinstance(e, DataReceived) and e.data == b"abcd" for e in events)
    rst = [f for f in parse_frames(engine.data_to_send()) if isinstance(f, (RstStreamFrame, GoAwayFrame))]
    assert [(type(f), f.stream_id, f.error_code) for f in rst] == [(RstStreamFrame, 1, code)]
    assert engine.streams == {} and not engine.closed
    with pytest.raises(ProtocolError):
        engine.send_data(1, b"x")
    # Stream 3 works, late frames on stream 1 are ignored, the HPACK state is shared.
    engine.send_headers(3, REQUEST, True)
    events = engine.receive_data(frame(DATA, 0, 1, b"late") + raw.headers(3, [*RESPONSE, (b"content-length", b"2")])
                                 + frame(DATA, END_STREAM, 3, b"ok"))
    received = engine_received(events)
    assert list(received) == [3]
    assert received[3].headers == [*RESPONSE, (b"content-length", b"2")] and received[3].data == b"ok"
    assert received[3].ended and engine.streams == {}


def test_stream_error_against_h2_keeps_the_connection() -> None:
    # The RST_STREAM the engine sends is one h2 accepts; the next exchange runs normally.
    p = Pair(False, connection_window_size=1 << 20)
    p.peer.send_headers(1, POST)
    p.pump()
    p.peer.send_data(1, b"x", end_stream=True)
    p.to_engine()
    # h2 cannot send after END_STREAM: a hand-built DATA follows on the engine's wire.
    events = p.engine.receive_data(frame(DATA, 0, 1, b"y"))
    assert [(type(e), getattr(e, "error_code", None)) for e in events] == [(StreamReset, ErrorCodes.STREAM_CLOSED)]
    p.pump()
    assert peer_received(p.peer_events)[1].reset == ErrorCodes.STREAM_CLOSED
    run_exchanges(p, [Exchange(POST, b"abc", None, RESPONSE, b"def", None)])


# ---------------------------------------------------------------------- table hygiene

@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
def test_two_thousand_requests_leave_the_table_empty(engine_client: bool) -> None:
    p = Pair(engine_client)
    largest = 0
    for i in range(2000):
        if engine_client:
            sid = p.engine.get_next_available_stream_id()
            p.engine.send_headers(sid, REQUEST, True)
            p.to_peer()
            if i % 10 == 3:
                p.peer.reset_stream(sid, ErrorCodes.CANCEL)  # reset by the peer
            elif i % 10 == 7:
                p.engine.reset_stream(sid, ErrorCodes.CANCEL)  # reset by us
            else:
                p.peer.send_headers(sid, RESPONSE)
                p.peer.send_data(sid, b"r%d" % i, end_stream=True)
        else:
            sid = p.peer.get_next_available_stream_id()
            p.peer.send_headers(sid, POST)
            p.peer.send_data(sid, b"q%d" % i, end_stream=i % 2 == 0)
            p.to_engine()
            if i % 10 == 3:
                p.peer.reset_stream(sid, ErrorCodes.CANCEL)
            elif i % 10 == 7:
                p.engine.reset_stream(sid, ErrorCodes.CANCEL)
            else:
                p.engine.send_headers(sid, RESPONSE)
                p.engine.send_data(sid, b"r%d" % i, end_stream=True)
                if i % 2:
                    p.peer.end_stream(sid)
        p.pump()
        largest = max(largest, len(p.engine.streams))
    assert p.engine.streams == {} and largest <= 1
    got = engine_received(p.events) if engine_client else peer_received(p.peer_events)
    assert sum(1 for r in got.values() if r.ended and r.reset is None) == 1600
    assert not any(isinstance(e, StreamReset) and not e.remote_reset for e in p.events)


def test_late_data_on_a_reset_stream_reopens_the_connection_window() -> None:
    engine, raw = raw_server_engine()
    engine.receive_data(raw.headers(1, POST))
    engine.reset_stream(1, ErrorCodes.CANCEL)
    frames = parse_frames(engine.data_to_send())
    assert len(frames) == 1 and isinstance(frames[0], RstStreamFrame) and frames[0].error_code == ErrorCodes.CANCEL
    # The peer had not seen the RST_STREAM: 60000 bytes were on their way.
    late = b"".join(frame(DATA, 0, 1, bytes(15000)) for _ in range(4))
    assert engine.receive_data(late) == []
    increment = sum(f.window_increment for f in parse_frames(engine.data_to_send())
                    if isinstance(f, WindowUpdateFrame) and f.stream_id == 0)
    peer_window = 65535 - 60000 + increment
    assert peer_window >= 32768
    # The peer fills a new stream's whole window: no connection error.
    events = engine.receive_data(raw.headers(3, POST) + frame(DATA, 0, 3, bytes(16384)) * 3
                                 + frame(DATA, END_STREAM, 3, bytes(65535 - 3 * 16384)))
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 65535
    assert not engine.closed


def test_late_frames_from_h2_after_reset_are_harmless() -> None:
    # h2 sends a body while the engine resets the stream; what was in flight is dropped and
    # the connection window keeps up, so h2 can send another 300 KB on stream 3.
    p = Pair(False)
    p.peer.send_headers(1, POST)
    p.pump()
    p.engine.reset_stream(1, ErrorCodes.CANCEL)
    for _ in range(4):
        p.peer.send_data(1, bytes(15000))
    p.to_engine()  # h2 has not seen the RST_STREAM yet
    assert not any(isinstance(e, DataReceived) for e in p.events)
    p.pump()
    assert peer_received(p.peer_events)[1].reset == ErrorCodes.CANCEL
    run_exchanges(p, [Exchange(POST, body_of(300_000), None, RESPONSE, b"", None)])


# ---------------------------------------------------------------------- closed streams (h2spec http2/5.1, 5.1.1)
# What h2spec 2.0.0 sends, frame for frame; it accepts RST_STREAM or GOAWAY with the code, or
# a close, and these pin the engine's exact answer. A stream we reset may still get frames
# the peer sent before it read our RST_STREAM (dropped, above); a stream the peer ended or
# reset itself may not: DATA or HEADERS on it is a connection error STREAM_CLOSED (RFC 9113
# §5.1 allows one for any frame on a closed stream but PRIORITY, WINDOW_UPDATE and RST_STREAM
# that crossed our closing frame, which stay ignored).

def _closed_by_peer_reset(engine: H2Engine, raw: RawPeer) -> None:
    # h2spec 5.1 #8, #9: "closed: Sends a DATA / HEADERS frame after sending RST_STREAM frame".
    assert [type(e) for e in engine.receive_data(raw.headers(1, POST))] == [RequestReceived]
    events = engine.receive_data(frame(RST_STREAM, 0, 1, u32(ErrorCodes.CANCEL)))
    assert [(type(e), getattr(e, "stream_id", None)) for e in events] == [(StreamReset, 1)]


def _closed_by_both_ends(engine: H2Engine, raw: RawPeer) -> None:
    # h2spec 5.1 #11, #12: "closed: Sends a DATA / HEADERS frame" once both sides sent END_STREAM.
    assert [type(e) for e in engine.receive_data(raw.headers(1, POST, True))] == [RequestReceived]
    engine.send_headers(1, RESPONSE, True)
    engine.data_to_send()
    assert engine.streams == {}


_LATE_FRAMES: list[tuple[str, Callable[[RawPeer], bytes]]] = [
    ("data", lambda r: frame(DATA, END_STREAM, 1, b"test")),
    ("headers", lambda r: r.headers(1, POST, True)),
]


@pytest.mark.parametrize("late", [pytest.param(w, id=n) for n, w in _LATE_FRAMES])
@pytest.mark.parametrize("close", [_closed_by_peer_reset, _closed_by_both_ends], ids=["peer-reset", "both-ended"])
def test_frames_on_a_stream_the_peer_closed_are_stream_closed(close: Callable[[H2Engine, RawPeer], None],
                                                              late: Callable[[RawPeer], bytes]) -> None:
    engine, raw = raw_server_engine()
    close(engine, raw)
    # WINDOW_UPDATE and RST_STREAM (which may cross our closing frame) and PRIORITY are
    # still ignored, and get no answer.
    events = engine.receive_data(frame(WINDOW_UPDATE, 0, 1, u32(5)) + frame(RST_STREAM, 0, 1, u32(0))
                                 + frame(PRIORITY, 0, 1, u32(0) + b"\x0f"))
    assert [type(e) for e in events] == [PriorityUpdated]
    assert engine.data_to_send() == b""
    assert_connection_error(engine, late(raw), ErrorCodes.STREAM_CLOSED, 1)


_CLIENT_LATE_FRAMES: list[tuple[str, Callable[[RawPeer], bytes]]] = [
    ("data", lambda r: frame(DATA, END_STREAM, 1, b"test")),
    ("headers", lambda r: r.headers(1, [(b"x-t", b"1")], True)),
]


@pytest.mark.parametrize("late", [pytest.param(w, id=n) for n, w in _CLIENT_LATE_FRAMES])
@pytest.mark.parametrize("peer_reset", [True, False], ids=["peer-reset", "both-ended"])
def test_frames_on_a_stream_the_peer_closed_are_stream_closed_engine_client(
        peer_reset: bool, late: Callable[[RawPeer], bytes]) -> None:
    engine, raw = raw_client_engine()
    engine.send_headers(1, REQUEST, not peer_reset)
    engine.data_to_send()
    closing = frame(RST_STREAM, 0, 1, u32(ErrorCodes.CANCEL)) if peer_reset else raw.headers(1, RESPONSE, True)
    assert [type(e) for e in engine.receive_data(closing)] == [StreamReset if peer_reset else ResponseReceived]
    assert engine.streams == {}
    assert_connection_error(engine, late(raw), ErrorCodes.STREAM_CLOSED, 0)


@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
def test_every_frame_on_a_stream_we_reset_is_dropped(engine_client: bool) -> None:
    # The in-flight rule h2spec's cases must not break: whatever the peer sent before it read
    # our RST_STREAM (a body, trailers, window, its own reset) is dropped, trailers still
    # feeding the HPACK table, and the connection goes on.
    engine, raw = raw_client_engine() if engine_client else raw_server_engine()
    if engine_client:
        engine.send_headers(1, POST)
        engine.receive_data(raw.headers(1, RESPONSE))
    else:
        engine.receive_data(raw.headers(1, POST))
    engine.reset_stream(1, ErrorCodes.CANCEL)
    engine.data_to_send()
    late = (frame(DATA, 0, 1, b"body") + raw.headers(1, [(b"x-late", b"1")], True)
            + frame(WINDOW_UPDATE, 0, 1, u32(100)) + frame(RST_STREAM, 0, 1, u32(ErrorCodes.CANCEL)))
    assert engine.receive_data(late) == []
    assert [type(f) for f in parse_frames(engine.data_to_send())] in ([], [WindowUpdateFrame])
    if engine_client:
        engine.send_headers(3, REQUEST, True)
        events = engine.receive_data(raw.headers(3, [*RESPONSE, (b"x-late", b"1")], True))
    else:
        events = engine.receive_data(raw.headers(3, [*REQUEST, (b"x-late", b"1")], True))
    (head,) = events
    assert isinstance(head, ResponseReceived if engine_client else RequestReceived)
    assert head.headers[-1] == (b"x-late", b"1")
    assert not engine.closed


def test_streams_we_reset_are_remembered_in_a_bounded_ring() -> None:
    # 200 streams reset by us (more than the ring holds), then 2 closed normally. Late frames
    # on every reset stream are still dropped: the ones that left the ring are covered by the
    # highest id that left it. A stream above that id, closed normally, is an error.
    engine, raw = raw_server_engine()
    for sid in range(1, 401, 2):
        engine.receive_data(raw.headers(sid, POST))
        engine.reset_stream(sid, ErrorCodes.CANCEL)
    for sid in (401, 403):
        engine.receive_data(raw.headers(sid, REQUEST, True))
        engine.send_headers(sid, RESPONSE, True)
    engine.data_to_send()
    late = b"".join(frame(DATA, 0, sid, b"x") for sid in range(1, 401, 2))
    assert engine.receive_data(late) == []
    assert_connection_error(engine, frame(DATA, 0, 403, b"x"), ErrorCodes.STREAM_CLOSED, 403)
    assert len(engine._recent_resets) == 128  # bounded, however many streams were reset


def test_a_lower_stream_id_than_one_opened_is_a_connection_error() -> None:
    # h2spec 5.1.1 #2: HEADERS on 5, then on 3, which was never opened (RFC 9113 §5.1.1).
    engine, raw = raw_server_engine()
    assert [type(e) for e in engine.receive_data(raw.headers(5, REQUEST, True))] == [RequestReceived]
    assert_connection_error(engine, raw.headers(3, REQUEST, True), ErrorCodes.PROTOCOL_ERROR, 5)


def test_ids_skipped_over_are_closed_not_reopened() -> None:
    # Ids 1 and 3 were skipped when 5 opened: DATA on them is on a closed stream (§5.1.1:
    # they closed implicitly), and streams opened in turn after 5 are closed ones, not
    # unexpected ids, once they end.
    engine, raw = raw_server_engine()
    engine.receive_data(raw.headers(5, REQUEST, True) + raw.headers(7, REQUEST, True))
    engine.send_headers(7, RESPONSE, True)
    assert_connection_error(engine, frame(DATA, 0, 3, b"x"), ErrorCodes.STREAM_CLOSED, 7)
    engine, raw = raw_server_engine()
    engine.receive_data(raw.headers(5, REQUEST, True) + raw.headers(7, REQUEST, True))
    engine.send_headers(7, RESPONSE, True)
    assert_connection_error(engine, raw.headers(7, REQUEST, True), ErrorCodes.STREAM_CLOSED, 7)


# ---------------------------------------------------------------------- self-dependency (h2spec http2/5.3.1)

@pytest.mark.parametrize("flags_and_prefix", [(0, b""), (PADDED, b"\x02")], ids=["plain", "padded"])
@pytest.mark.parametrize("dependency", [1, 0x80000001], ids=["shared", "exclusive"])
def test_headers_depending_on_their_own_stream(flags_and_prefix: tuple[int, bytes], dependency: int) -> None:
    # h2spec 5.3.1 #1: HEADERS on stream 1 whose priority fields name stream 1 (weight 255).
    engine, raw = raw_server_engine()
    flags, prefix = flags_and_prefix
    payload = prefix + u32(dependency) + b"\xff" + raw.block(REQUEST) + bytes(len(prefix) and prefix[0])
    wire = frame(HEADERS, PRIORITY_FLAG | END_HEADERS | END_STREAM | flags, 1, payload)
    assert_connection_error(engine, wire, ErrorCodes.PROTOCOL_ERROR, 0)


def test_headers_depending_on_another_stream_are_fine() -> None:
    engine, raw = raw_server_engine()
    wire = frame(HEADERS, PRIORITY_FLAG | END_HEADERS | END_STREAM, 3, u32(1) + b"\xff" + raw.block(REQUEST))
    assert [type(e) for e in engine.receive_data(wire)] == [RequestReceived]


@pytest.mark.parametrize("dependency", [1, 0x80000001], ids=["shared", "exclusive"])
def test_priority_depending_on_its_own_stream(dependency: int) -> None:
    # h2spec 5.3.1 #2: PRIORITY on (idle) stream 1 naming stream 1.
    engine, _ = raw_server_engine()
    assert_connection_error(engine, frame(PRIORITY, 0, 1, u32(dependency) + b"\xff"), ErrorCodes.PROTOCOL_ERROR, 0)
    # The same on an open stream.
    engine, raw = raw_server_engine()
    engine.receive_data(raw.headers(1, POST))
    assert_connection_error(engine, frame(PRIORITY, 0, 1, u32(dependency) + b"\xff"), ErrorCodes.PROTOCOL_ERROR, 1)


# ---------------------------------------------------------------------- PING and GOAWAY

@pytest.mark.parametrize("engine_client", [False, True], ids=["engine-server", "engine-client"])
def test_ping_both_ways(engine_client: bool) -> None:
    p = Pair(engine_client)
    p.peer.ping(b"\x00peer\xff\x01!")
    p.pump()
    assert any(isinstance(e, PingReceived) for e in p.events)
    acks = [e for e in p.peer_events if isinstance(e, h2.events.PingAckReceived)]
    assert [e.ping_data for e in acks] == [b"\x00peer\xff\x01!"]
    p.engine.ping(b"engine!!")
    p.pump()
    assert [e.ping_data for e in p.peer_events if isinstance(e, h2.events.PingReceived)] == [b"engine!!"]
    assert sum(isinstance(e, PingAckReceived) for e in p.events) == 1
    with pytest.raises(ValueError):
        p.engine.ping(b"short")


def test_ping_ack_by_hand_carries_the_payload() -> None:
    engine, _ = raw_server_engine()
    assert [type(e) for e in engine.receive_data(frame(PING, 0, 0, b"abcdefgh"))] == [PingReceived]
    frames = parse_frames(engine.data_to_send())
    assert len(frames) == 1 and isinstance(frames[0], PingFrame)
    assert frames[0].opaque_data == b"abcdefgh" and "ACK" in frames[0].flags
    # A PING ACK is not answered.
    assert [type(e) for e in engine.receive_data(frame(PING, ACK, 0, b"abcdefgh"))] == [PingAckReceived]
    assert engine.data_to_send() == b""


def test_goaway_received_stops_new_streams() -> None:
    p = Pair(True)
    p.engine.send_headers(1, REQUEST, True)
    p.engine.send_headers(3, REQUEST, True)
    p.pump()
    p.peer.send_headers(1, RESPONSE, True)
    p.peer.close_connection(error_code=ErrorCodes.NO_ERROR, additional_data=b"bye", last_stream_id=1)
    p.pump()
    terminated = [e for e in p.events if isinstance(e, ConnectionTerminated)]
    assert [(e.error_code, e.last_stream_id, e.additional_data) for e in terminated] == [(0, 1, b"bye")]
    assert p.engine.goaway_received
    assert engine_received(p.events)[1].ended
    with pytest.raises(ProtocolError):
        p.engine.send_headers(p.engine.get_next_available_stream_id(), REQUEST, True)


def test_goaway_received_lets_open_streams_finish() -> None:
    engine, raw = raw_client_engine()
    engine.send_headers(1, POST)
    events = engine.receive_data(frame(GOAWAY, 0, 0, struct.pack(">LL", 1, ErrorCodes.NO_ERROR)))
    assert [type(e) for e in events] == [ConnectionTerminated]
    with pytest.raises(ProtocolError):
        engine.send_headers(3, REQUEST, True)
    engine.send_data(1, b"rest", True)
    events = engine.receive_data(raw.headers(1, RESPONSE) + frame(DATA, END_STREAM, 1, b"ok"))
    assert engine_received(events)[1].data == b"ok" and engine.streams == {}


def test_advisory_goaway_leaves_the_connection_usable() -> None:
    engine, raw = raw_server_engine()
    engine.receive_data(raw.headers(1, POST))
    engine.goaway(2**31 - 1)
    frames = parse_frames(engine.data_to_send())
    assert len(frames) == 1 and isinstance(frames[0], GoAwayFrame)
    assert (frames[0].last_stream_id, frames[0].error_code) == (2**31 - 1, ErrorCodes.NO_ERROR)
    assert not engine.closed
    # Streams go on, and new ones are still taken before the final GOAWAY.
    events = engine.receive_data(frame(DATA, END_STREAM, 1, b"abc") + raw.headers(3, REQUEST, True))
    assert [type(e) for e in events] == [DataReceived, RequestReceived]
    engine.send_headers(1, RESPONSE)
    engine.send_data(1, b"ok", True)
    engine.send_headers(3, RESPONSE, True)
    kinds = [type(f).__name__ for f in parse_frames(engine.data_to_send())]
    assert kinds == ["HeadersFrame", "DataFrame", "HeadersFrame"]
    assert engine.streams == {}
    # The advisory GOAWAY seen by h2: ConnectionTerminated with the id we gave.
    p = Pair(False)
    p.engine.goaway(2**31 - 1)
    p.pump()
    assert [e.last_stream_id for e in p.peer_events if isinstance(e, h2.events.ConnectionTerminated)] == [2**31 - 1]


def test_close_connection_ends_it() -> None:
    p = Pair(False)
    p.peer.send_headers(1, REQUEST, True)
    p.peer.send_headers(3, POST)
    p.pump()
    p.engine.close_connection(ErrorCodes.NO_ERROR)
    assert p.engine.closed
    out = p.engine.data_to_send()
    frames = parse_frames(out)
    assert len(frames) == 1 and isinstance(frames[0], GoAwayFrame)
    assert (frames[0].last_stream_id, frames[0].error_code) == (3, ErrorCodes.NO_ERROR)
    terminated = [e for e in p.peer.receive_data(out) if isinstance(e, h2.events.ConnectionTerminated)]
    assert [(e.error_code, e.last_stream_id) for e in terminated] == [(0, 3)]
    with pytest.raises(ProtocolError):
        p.engine.send_headers(1, RESPONSE, True)
    with pytest.raises(ProtocolError):
        p.engine.send_data(3, b"x")
    assert p.engine.sendable(3) == -1
    assert p.engine.receive_data(frame(DATA, 0, 3, b"late")) == []
    p.engine.close_connection(ErrorCodes.INTERNAL_ERROR)  # a second close sends nothing
    p.engine.ping(b"12345678")
    assert p.engine.data_to_send() == b""


def test_rst_stream_from_peer_is_a_remote_reset() -> None:
    p = Pair(False)
    p.peer.send_headers(1, POST)
    p.pump()
    p.peer.reset_stream(1, ErrorCodes.CANCEL)
    p.pump()
    resets = [e for e in p.events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [(1, ErrorCodes.CANCEL, True)]
    assert p.engine.streams == {}
    # A reset for a stream already gone is ignored; so is a WINDOW_UPDATE for it.
    assert p.engine.receive_data(frame(RST_STREAM, 0, 1, u32(8)) + frame(WINDOW_UPDATE, 0, 1, u32(5))) == []
