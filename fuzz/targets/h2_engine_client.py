"""turnout's HTTP/2 engine as a client (dataplane/http2/engine.py, the proxy's upstream side),
with four requests open (a GET, a POST still sending its body, a HEAD, a gRPC call), fed
arbitrary bytes as the upstream's answer after its SETTINGS exchange. The owner sends
bodies as windows open, acknowledges every DATA, and opens a new request when one ends.

Findings: an exception other than the engine's ``ProtocolError``, anything malformed in
what the engine writes, a request head that does not decode to what was sent, a stream
table past the owner's limit. Seeds: what the ``h2`` library answers as a server to the
engine's own requests (bodies with content-length, trailers, a 1xx, padding, a header
block in CONTINUATIONs, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY).
"""

from __future__ import annotations

from dataplane.http2.engine import (
    DataReceived,
    H2Engine,
    ProtocolError,
    StreamReset,
    TrailersReceived,
)
from fuzz.targets._h2 import ACK, SETTINGS, Headers, OutboundChecker, check_bounded, continued, frame, reads

MAX_STREAMS = 8
MAX_REQUESTS = 24  # requests one input may make the owner open
_BODY = b"q" * 70000  # the POST's body: more than the initial window, so it waits for WINDOW_UPDATEs


def _request(method: bytes, path: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Headers:
    return [(b":method", method), (b":scheme", b"http"), (b":path", path), (b":authority", b"upstream"), *extra]


# The requests opened in turn: (head, end_stream with the head, body to send).
_REQUESTS: list[tuple[Headers, bool, bytes]] = [
    (_request(b"GET", b"/"), True, b""),
    (_request(b"POST", b"/up", ((b"content-length", b"70000"),)), False, _BODY),
    (_request(b"HEAD", b"/h"), True, b""),
    (_request(b"POST", b"/svc.Greeter/Hello", ((b"content-type", b"application/grpc"), (b"te", b"trailers"))),
     False, b"\x00\x00\x00\x00\x03abc"),
]


class Client:
    """The engine and an owner that behaves like turnout's HTTP/2 upstream client."""

    def __init__(self) -> None:
        self.engine = H2Engine(True, initial_window_size=1 << 20, connection_window_size=1 << 22)
        self.checker = OutboundChecker(self.engine, skip=24)
        self.body_left: dict[int, bytes] = {}
        self.opened = 0

    def write(self) -> None:
        """Check what the engine queued."""
        self.checker.check(self.engine.data_to_send())

    def begin(self) -> None:
        """The preface, then every request of ``_REQUESTS`` and as much of the bodies as fits."""
        self.engine.initiate_connection()
        for _ in _REQUESTS:
            self.open()
        self._pump()

    def open(self) -> None:
        """The next request in ``_REQUESTS``, on a new stream."""
        engine = self.engine
        head, end, body = _REQUESTS[self.opened % len(_REQUESTS)]
        stream_id = engine.get_next_available_stream_id()
        engine.send_headers(stream_id, head, end)
        self.checker.expect_headers(head)
        self.opened += 1
        if not end:
            self.body_left[stream_id] = body

    def feed(self, data: bytes) -> bool:
        """One read; False once the connection is over."""
        engine = self.engine
        try:
            events = engine.receive_data(data)
        except ProtocolError:
            assert engine.closed, "ProtocolError without closing the connection"
            self.write()
            return False
        for event in events:
            if isinstance(event, DataReceived):
                engine.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, (StreamReset, TrailersReceived)):
                self.body_left.pop(event.stream_id, None)
        self._pump()
        while (len(engine.streams) < 4 and self.opened < MAX_REQUESTS and not engine.goaway_received
               and not engine.closed):
            self.open()
        self.write()
        check_bounded(engine, MAX_STREAMS)
        return not engine.closed

    def _pump(self) -> None:
        engine = self.engine
        for stream_id, body in list(self.body_left.items()):
            window = engine.sendable(stream_id)
            if window < 0:
                del self.body_left[stream_id]
            elif window:
                piece = body[:window]
                engine.send_data(stream_id, piece, len(piece) == len(body))
                if len(piece) == len(body):
                    del self.body_left[stream_id]
                else:
                    self.body_left[stream_id] = body[window:]


def start() -> Client:
    """A client engine with its preface written and four requests open; the server's
    SETTINGS read and ours acknowledged."""
    client = Client()
    client.begin()
    client.write()
    assert client.feed(frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
    return client


def fuzz_one(data: bytes) -> None:
    """Feed ``data`` (its first byte picks how it is cut into reads) to a client engine."""
    client = start()
    for piece in reads(data):
        if not client.feed(piece):
            break
    if not client.engine.closed:
        client.engine.close_connection()
        client.write()


def seeds() -> list[bytes]:
    """What the ``h2`` library answers, as a server, to ``start()``'s requests, cut several ways."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import RequestReceived
    from h2.settings import SettingCodes

    def server() -> tuple[H2Connection, list[int]]:
        """An h2 server that read the engine's preface and requests; the stream ids."""
        client = Client()
        client.begin()
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        events = conn.receive_data(client.engine.data_to_send())
        return conn, [e.stream_id for e in events if isinstance(e, RequestReceived)]

    ok: Headers = [(b":status", b"200"), (b"content-type", b"text/plain")]
    sessions = []
    # Every stream answered: a body with content-length, a HEAD's content-length without
    # one, a gRPC reply with trailers; the POST's answer before its body is all sent.
    conn, (get, post, head, grpc) = server()
    conn.send_headers(get, [*ok, (b"content-length", b"5")])
    conn.send_data(get, b"hello", end_stream=True)
    conn.send_headers(post, [(b":status", b"100")])
    conn.send_headers(post, [(b":status", b"201")])
    conn.send_data(post, b"created", pad_length=9)
    conn.end_stream(post)
    conn.send_headers(head, [*ok, (b"content-length", b"1234")], end_stream=True)
    conn.send_headers(grpc, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    conn.send_data(grpc, b"\x00\x00\x00\x00\x02hi")
    conn.send_headers(grpc, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
    sessions.append(conn.data_to_send())
    # Control frames: SETTINGS (a smaller table, larger frames, a new initial window),
    # PING, WINDOW_UPDATE, a trailers-only reply, RST_STREAM and GOAWAY.
    conn, (get, post, head, grpc) = server()
    conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 100, SettingCodes.MAX_FRAME_SIZE: 65536,
                          SettingCodes.INITIAL_WINDOW_SIZE: 10})
    conn.ping(b"pingpong")
    conn.increment_flow_control_window(70000)
    conn.increment_flow_control_window(5000, stream_id=post)
    conn.send_headers(grpc, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                             (b"grpc-status", b"14")], end_stream=True)
    conn.reset_stream(post, 7)
    conn.send_headers(get, ok)
    conn.send_data(get, b"partial")
    conn.close_connection(0, last_stream_id=get)
    sessions.append(conn.data_to_send())
    # A response head in HEADERS and CONTINUATION frames, then a 204 and a 304.
    conn, (get, post, head, grpc) = server()
    conn.send_headers(get, [*ok, *((b"x-big-" + str(i).encode(), b"v" * 40) for i in range(20))],
                      end_stream=True)
    conn.send_headers(head, [(b":status", b"204")], end_stream=True)
    conn.send_headers(grpc, [(b":status", b"304"), (b"content-length", b"10")], end_stream=True)
    sessions.append(continued(conn.data_to_send(), 100))
    return [bytes([split]) + traffic for traffic in sessions for split in (0, 1, 9, 11)]
