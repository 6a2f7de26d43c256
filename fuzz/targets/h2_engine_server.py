"""turnout's HTTP/2 engine as a server (dataplane/http2/engine.py), fed arbitrary bytes after
the client preface and a SETTINGS exchange, with an owner that answers like the proxy's
server does (responses with bodies and trailers, REFUSED_STREAM past the stream limit,
some streams cancelled, every DATA acknowledged).

Findings: an exception other than the engine's ``ProtocolError`` (a connection error, with
its GOAWAY written), anything malformed in what the engine writes (``_h2.OutboundChecker``),
a header block that does not decode to what was sent, a stream table past the limit.
Seeds: what the ``h2`` library sends as a client (bodies, trailers, CONTINUATION, padding,
PRIORITY, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY), cut into reads several ways.
"""

from __future__ import annotations

from dataplane.http2.engine import (
    PREFACE,
    DataReceived,
    ErrorCodes,
    H2Engine,
    ProtocolError,
    RequestReceived,
    StreamReset,
    WindowUpdated,
)
from fuzz.targets._h2 import ACK, SETTINGS, Headers, OutboundChecker, check_bounded, continued, frame, reads

MAX_STREAMS = 8  # what the owner lets be open at once (server.py: max_concurrent_streams)
_RESPONSE: Headers = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-fuzz", b"1")]
_TRAILERS: Headers = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]


class Server:
    """The engine and an owner that behaves like turnout's HTTP/2 server."""

    def __init__(self) -> None:
        self.engine = H2Engine(False, max_concurrent_streams=MAX_STREAMS, initial_window_size=1024,
                               connection_window_size=1 << 20)
        self.checker = OutboundChecker(self.engine)
        self.body_left: dict[int, int] = {}  # streams being answered: body bytes still to send

    def write(self) -> None:
        """Check what the engine queued."""
        self.checker.check(self.engine.data_to_send())

    def feed(self, data: bytes) -> bool:
        """One read; False once the connection is over."""
        try:
            events = self.engine.receive_data(data)
        except ProtocolError:
            assert self.engine.closed, "ProtocolError without closing the connection"
            self.write()
            return False
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event.stream_id)
            elif isinstance(event, DataReceived):
                self.engine.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, StreamReset):
                self.body_left.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                pass  # the pump below sends what the window allows
        self._pump()
        self.write()
        check_bounded(self.engine, MAX_STREAMS)
        return not self.engine.closed

    def _request(self, stream_id: int) -> None:
        engine = self.engine
        if stream_id not in engine.streams:  # reset later in the same read: events come after the whole read
            return
        if len(engine.streams) > MAX_STREAMS:
            engine.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if stream_id % 11 == 0:  # now and then the upstream is gone: the stream is cancelled
            engine.reset_stream(stream_id, ErrorCodes.CANCEL)
            return
        engine.send_headers(stream_id, _RESPONSE)
        self.checker.expect_headers(_RESPONSE)
        self.body_left[stream_id] = (stream_id * 37) % 3000

    def _pump(self) -> None:
        engine = self.engine
        for stream_id, left in list(self.body_left.items()):
            window = engine.sendable(stream_id)
            if window < 0:  # reset, or the connection is closing
                del self.body_left[stream_id]
                continue
            take = min(window, left)
            trailers = stream_id % 3 == 0
            if take or not left:
                last = take == left
                engine.send_data(stream_id, b"x" * take, last and not trailers)
                self.body_left[stream_id] = left - take
                if last:
                    if trailers:
                        engine.send_headers(stream_id, _TRAILERS, end_stream=True)
                        self.checker.expect_headers(_TRAILERS)
                    del self.body_left[stream_id]


def start() -> Server:
    """A server engine after the preface: the client's SETTINGS read, ours acknowledged."""
    server = Server()
    server.engine.initiate_connection()
    server.write()
    assert server.feed(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
    return server


def fuzz_one(data: bytes) -> None:
    """Feed ``data`` (its first byte picks how it is cut into reads) to a server engine."""
    server = start()
    for piece in reads(data):
        if not server.feed(piece):
            break
    if not server.engine.closed:
        server.engine.close_connection()
        server.write()


def seeds() -> list[bytes]:
    """What the ``h2`` library sends as a client, after its preface, cut several ways."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.settings import SettingCodes

    def client() -> H2Connection:
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        return conn

    def request(path: bytes, method: bytes = b"GET", extra: Headers | None = None) -> Headers:
        return [(b":method", method), (b":scheme", b"http"), (b":path", path), (b":authority", b"svc"),
                *(extra or [])]

    sessions: list[bytes] = []
    # A GET, a POST with a body in two DATA frames, a request with trailers (gRPC).
    conn = client()
    conn.send_headers(1, request(b"/", extra=[(b"baggage", b"turnout-session=k1")]), end_stream=True)
    conn.send_headers(3, request(b"/upload", b"POST", [(b"content-length", b"10")]))
    conn.send_data(3, b"hello")
    conn.send_data(3, b"world", end_stream=True)
    conn.send_headers(5, request(b"/svc.Greeter/Hello", b"POST", [(b"content-type", b"application/grpc"),
                                                                  (b"te", b"trailers")]))
    conn.send_data(5, b"\x00\x00\x00\x00\x03abc")
    conn.send_headers(5, [(b"grpc-timeout", b"1S")], end_stream=True)
    sessions.append(conn.data_to_send())
    # Padding, PRIORITY, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM and GOAWAY.
    conn = client()
    conn.send_headers(1, request(b"/p"), priority_weight=200, priority_depends_on=0, priority_exclusive=True)
    conn.send_data(1, b"padded body", pad_length=7)
    conn.prioritize(1, weight=16, depends_on=0)
    conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 256, SettingCodes.INITIAL_WINDOW_SIZE: 100000,
                          SettingCodes.MAX_FRAME_SIZE: 32768})
    conn.ping(b"12345678")
    conn.increment_flow_control_window(5000)
    conn.increment_flow_control_window(100, stream_id=1)
    conn.end_stream(1)
    conn.send_headers(3, request(b"/cancelled"))
    conn.reset_stream(3, 8)
    conn.close_connection(0, last_stream_id=1)
    sessions.append(conn.data_to_send())
    # Header blocks in HEADERS and CONTINUATION frames (cut here: h2 cuts only blocks larger
    # than 16 KiB, which make slow inputs); then the same names indexed.
    conn = client()
    big = [(b"x-big-" + str(i).encode(), b"v" * 40) for i in range(20)]
    conn.send_headers(1, request(b"/big", extra=big), end_stream=True)
    conn.send_headers(3, request(b"/big", extra=big[:3]), end_stream=True)
    traffic = conn.data_to_send()
    sessions.append(traffic[:len(PREFACE)] + continued(traffic[len(PREFACE):], 100))
    # Many streams: past the owner's limit, each with a body.
    conn = client()
    for stream_id in range(1, 2 * MAX_STREAMS * 2 + 2, 2):
        conn.send_headers(stream_id, request(b"/s/" + str(stream_id).encode(), b"PUT"))
        conn.send_data(stream_id, b"b" * 50, end_stream=True)
    sessions.append(conn.data_to_send())
    out = []
    for traffic in sessions:
        assert traffic.startswith(PREFACE)
        for split in (0, 1, 9, 11):  # see _h2.SPLITS: whole, 1 byte, 8 bytes, 4096 bytes per read
            out.append(bytes([split]) + traffic[len(PREFACE):])
    return out
