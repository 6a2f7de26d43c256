"""``H2Connection`` and ``H2ServerStream`` (``dataplane/http2/server.py``) behind a real ``Proxy``.

The ``h2`` library is the HTTP/2 client on the other side of a ``FakeTransport``
(``fakes.H2Peer``); upstreams are pooled ``H1Client``s on fake transports or, for gRPC,
HTTP/2 connections the proxy dials through ``VirtualLoop`` with ``h2`` as their server.
Covered:

* a request stream routed, and its head as the upstream receives it (``:authority`` as Host,
  cookie crumbs joined, ``te`` dropped for HTTP/1.1, the proxy's forwarded fields);
* response HEADERS, DATA and trailers back to the client; a head with no body leaves as one
  HEADERS frame with END_STREAM (a 204, a HEAD response, gRPC trailers-only replies made by
  the proxy or passed on from an upstream);
* malformed request heads (connection-specific fields, upper-case names, ``te`` other than
  trailers, content-length not matching the DATA, two different hosts, pseudo-header
  errors) get RST_STREAM PROTOCOL_ERROR, never reach an upstream, and the connection lives;
* streams beyond ``h2_max_concurrent_streams`` get REFUSED_STREAM;
* flow control: request DATA is given back to the client (WINDOW_UPDATE) only once the
  upstream took it;
* a client reset cancels the upstream; a response that breaks resets the stream.
"""

from __future__ import annotations

from typing import Any

import h2.events
import pytest
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from dataplane.http2.engine import ErrorCodes
from dataplane.proxy import Proxy
from tests.unit.dataplane.fakes import (
    BASELINE,
    CLIENT_IP,
    H2Peer,
    VirtualLoop,
    client_h2,
    frames,
    make_proxy,
    pooled_h1,
    upstream_h2,
)

Headers = list[tuple[bytes, bytes]]
XFF = b"x-forwarded-for: " + CLIENT_IP.encode() + b"\r\nx-forwarded-proto: http\r\n"
SMALL: dict[str, Any] = {"h2_max_concurrent_streams": 2, "h2_initial_stream_window_bytes": 32768}


@pytest.fixture
def proxy(loop: VirtualLoop) -> Proxy:
    return make_proxy(loop, limits=SMALL)


def request(method: bytes = b"GET", path: bytes = b"/x", *extra: tuple[bytes, bytes],
            authority: bytes = b"users") -> Headers:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path), *extra]


def stream_frames(peer: H2Peer, stream_id: int, since: int = 0) -> list[Any]:
    """The frames the proxy sent on ``stream_id`` (from byte ``since`` of what it sent)."""
    return [f for f in frames(peer.raw[since:]) if f.stream_id == stream_id]


def reset_code(peer: H2Peer, stream_id: int) -> int | None:
    resets = peer.of(h2.events.StreamReset, stream_id)
    return resets[0].error_code if resets else None


# ---------------------------------------------------------------------- requests and responses


def test_request_is_routed_and_its_head_reaches_the_upstream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"GET", b"/x?y=1", (b"user-agent", b"t"), (b"cookie", b"a=1"),
                                    (b"te", b"trailers"), (b"cookie", b"b=2")), end_stream=True)
    peer.pump()
    assert upstream.take() == (b"GET /x?y=1 HTTP/1.1\r\nhost: users\r\nuser-agent: t\r\ncookie: a=1; b=2\r\n" + XFF
                               + b"\r\n")


def test_routed_stream_goes_to_the_sandbox(proxy: Proxy, loop: VirtualLoop) -> None:
    _, _, peer = client_h2(proxy)
    _, baseline = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"GET", b"/s", (b"baggage", b"turnout-session=k1")), end_stream=True)
    peer.pump()
    assert baseline.data == b""
    assert [(d.host, d.port) for d in loop.dialed] == [("127.0.0.1", 18081)]  # the sandbox, dialed
    assert loop.dialed[0].transport.take().startswith(b"GET /s HTTP/1.1\r\nhost: users\r\nbaggage: turnout-session=k1")


def test_response_headers_data_and_trailers_come_back(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    mark = len(peer.raw)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    conn.data_received(b"2\r\nde\r\n0\r\nGrpc-Status: 0\r\nX-Sum: 5\r\n\r\n")
    peer.pump()
    assert [e.headers for e in peer.of(h2.events.ResponseReceived, 1)] == [
        [(b":status", b"200"), (b"content-type", b"text/plain")]]
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 1)) == b"abcde"
    assert [e.headers for e in peer.of(h2.events.TrailersReceived, 1)] == [[(b"grpc-status", b"0"), (b"x-sum", b"5")]]
    kinds = [(type(f).__name__, "END_STREAM" in f.flags) for f in stream_frames(peer, 1, mark)]
    assert kinds[0] == ("HeadersFrame", False) and kinds[-1] == ("HeadersFrame", True)
    assert all(kind == ("DataFrame", False) for kind in kinds[1:-1])


def test_whole_response_arrives_whole(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
    peer.pump()
    assert peer.of(h2.events.ResponseReceived, 1)[0].headers == [(b":status", b"200"), (b"content-length", b"5")]
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 1)) == b"hello"
    assert peer.of(h2.events.StreamEnded, 1)


def test_whole_response_is_headers_then_one_data_frame_with_end_stream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    mark = len(peer.raw)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    peer.pump()
    sent = stream_frames(peer, 1, mark)
    assert [type(f) for f in sent] == [HeadersFrame, DataFrame]
    assert "END_STREAM" in sent[1].flags and sent[1].data == b"hello"


@pytest.mark.parametrize(("method", "answer", "status"), [
    (b"GET", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", b"204"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"200"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", b"304"),
])
def test_a_head_without_body_is_one_headers_frame_with_end_stream(proxy: Proxy, method: bytes, answer: bytes,
                                                                  status: bytes) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(method), end_stream=True)
    peer.pump()
    mark = len(peer.raw)
    conn.data_received(answer)
    peer.pump()
    sent = stream_frames(peer, 1, mark)
    assert [type(f) for f in sent] == [HeadersFrame]
    assert "END_STREAM" in sent[0].flags
    assert peer.of(h2.events.ResponseReceived, 1)[0].headers[0] == (b":status", status)


def grpc_call(peer: H2Peer, stream_id: int = 1) -> None:
    peer.h2.send_headers(stream_id, request(b"POST", b"/pkg.Svc/Call", (b"content-type", b"application/grpc"),
                                            (b"te", b"trailers")))
    peer.h2.send_data(stream_id, b"\x00\x00\x00\x00\x00", end_stream=True)
    peer.pump()


def test_grpc_error_made_by_the_proxy_is_one_trailers_only_frame(proxy: Proxy, loop: VirtualLoop) -> None:
    loop.refused.add((BASELINE.host, BASELINE.port))  # gRPC goes over HTTP/2, and nobody listens
    _, _, peer = client_h2(proxy)
    mark = len(peer.raw)
    grpc_call(peer)
    sent = stream_frames(peer, 1, mark)
    assert [type(f) for f in sent] == [HeadersFrame] and "END_STREAM" in sent[0].flags
    headers = dict(peer.of(h2.events.ResponseReceived, 1)[0].headers)
    assert headers[b":status"] == b"200" and headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"14"  # UNAVAILABLE
    assert headers[b"x-turnout-error"] == b"connect_failed"


def test_grpc_trailers_only_reply_from_the_upstream_stays_one_frame(proxy: Proxy, loop: VirtualLoop) -> None:
    _, _, peer = client_h2(proxy)
    grpc_call(peer)
    upstream = upstream_h2(loop)
    (call,) = upstream.of(h2.events.RequestReceived)
    assert dict(call.headers)[b"content-type"] == b"application/grpc"
    mark = len(peer.raw)
    upstream.h2.send_headers(call.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                              (b"grpc-status", b"5"), (b"grpc-message", b"not found")],
                             end_stream=True)
    upstream.pump()
    peer.pump()
    sent = stream_frames(peer, 1, mark)
    assert [type(f) for f in sent] == [HeadersFrame] and "END_STREAM" in sent[0].flags
    assert peer.of(h2.events.ResponseReceived, 1)[0].headers == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"5"),
        (b"grpc-message", b"not found")]


def test_bad_upstream_answer_is_a_502_on_the_stream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    peer.pump()
    headers = dict(peer.of(h2.events.ResponseReceived, 1)[0].headers)
    assert headers[b":status"] == b"502" and headers[b"x-turnout-error"].startswith(b"upstream_bad")
    assert peer.of(h2.events.StreamEnded, 1)


def test_response_breaking_mid_body_resets_the_stream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    upstream.lose()
    peer.pump()
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 1)) == b"abc"
    assert not peer.of(h2.events.StreamEnded, 1)  # never a clean end to a short body
    assert reset_code(peer, 1) == ErrorCodes.INTERNAL_ERROR


def test_client_reset_cancels_the_upstream_request(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(), end_stream=True)
    peer.pump()
    assert upstream.data.startswith(b"GET /x HTTP/1.1")
    peer.h2.reset_stream(1, ErrorCodes.CANCEL)
    peer.pump()
    assert upstream.aborted


# ---------------------------------------------------------------------- malformed request heads


MALFORMED: list[tuple[str, Headers]] = [
    ("connection", request(b"GET", b"/x", (b"connection", b"keep-alive"))),
    ("keep-alive", request(b"GET", b"/x", (b"keep-alive", b"timeout=5"))),
    ("proxy-connection", request(b"GET", b"/x", (b"proxy-connection", b"keep-alive"))),
    ("transfer-encoding", request(b"GET", b"/x", (b"transfer-encoding", b"chunked"))),
    ("upgrade", request(b"GET", b"/x", (b"upgrade", b"websocket"))),
    ("upper-case-name", request(b"GET", b"/x", (b"X-Upper", b"1"))),
    ("te-gzip", request(b"GET", b"/x", (b"te", b"gzip"))),
    ("te-trailers-and-more", request(b"GET", b"/x", (b"te", b"trailers, deflate"))),
    ("two-hosts", request(b"GET", b"/x", (b"host", b"other"))),
    ("bad-value", request(b"GET", b"/x", (b"x-a", b" padded"))),
    ("no-path", [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"users")]),
    ("empty-path", request(b"GET", b"")),
    ("no-method", [(b":scheme", b"http"), (b":authority", b"users"), (b":path", b"/")]),
    ("no-scheme", [(b":method", b"GET"), (b":authority", b"users"), (b":path", b"/")]),
    ("two-paths", [*request(b"GET", b"/a"), (b":path", b"/b")]),
    ("pseudo-after-regular", [(b":method", b"GET"), (b":scheme", b"http"), (b"x-a", b"1"), (b":path", b"/")]),
    ("unknown-pseudo", [*request(), (b":protocol", b"websocket")]),
    ("connect", [(b":method", b"CONNECT"), (b":authority", b"users:443")]),
    ("content-length-not-digits", request(b"POST", b"/x", (b"content-length", b"5x"))),
    ("two-content-lengths", request(b"POST", b"/x", (b"content-length", b"0"), (b"content-length", b"0"))),
]


@pytest.mark.parametrize("headers", [h for _, h in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_request_heads_are_reset_and_the_connection_lives(proxy: Proxy, headers: Headers) -> None:
    _, transport, peer = client_h2(proxy, validate=False)
    conn, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, headers, end_stream=True)
    peer.pump()
    assert reset_code(peer, 1) == ErrorCodes.PROTOCOL_ERROR
    assert upstream.data == b""  # never routed
    assert not transport.closing and not peer.of(h2.events.ConnectionTerminated)
    peer.h2.send_headers(3, request(b"GET", b"/ok"), end_stream=True)  # the next stream is served
    peer.pump()
    assert upstream.take().startswith(b"GET /ok HTTP/1.1\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    peer.pump()
    assert peer.of(h2.events.ResponseReceived, 3)[0].headers[0] == (b":status", b"200")


def test_content_length_given_with_end_stream_on_headers_is_malformed(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy, validate=False)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x", (b"content-length", b"5")), end_stream=True)
    peer.pump()
    assert reset_code(peer, 1) == ErrorCodes.PROTOCOL_ERROR and upstream.data == b""


@pytest.mark.parametrize(("length", "data", "forwarded"), [
    (b"5", [b"abc"], b""),  # ends short: the short body is not passed on
    (b"2", [b"abc"], b""),  # too long at once
    (b"4", [b"ab", b"cd", b"e"], b"abcd"),  # too long by the last frame: only what fitted went on
])
def test_content_length_not_matching_the_data_is_reset_and_the_upstream_dropped(proxy: Proxy, length: bytes,
                                                                                data: list[bytes],
                                                                                forwarded: bytes) -> None:
    _, transport, peer = client_h2(proxy, validate=False)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x", (b"content-length", length)))
    peer.pump()
    head = upstream.take()
    assert head.endswith(b"content-length: " + length + b"\r\n\r\n")
    for i, piece in enumerate(data):
        peer.h2.send_data(1, piece, end_stream=i == len(data) - 1)
    peer.pump()
    assert reset_code(peer, 1) == ErrorCodes.PROTOCOL_ERROR
    assert upstream.take() == forwarded
    assert upstream.aborted  # the upstream never sees a body that looks complete
    assert not transport.closing


def test_content_length_not_matching_data_and_trailers_is_reset(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x", (b"content-length", b"5")))
    peer.h2.send_data(1, b"abc")
    peer.h2.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    peer.pump()
    assert reset_code(peer, 1) == ErrorCodes.PROTOCOL_ERROR
    assert upstream.aborted


# ---------------------------------------------------------------------- concurrency and flow control


def test_streams_over_the_concurrency_limit_are_refused(proxy: Proxy, loop: VirtualLoop) -> None:
    # The client has not read the proxy's SETTINGS yet, so h2 does not hold the third stream back.
    _, _, peer = client_h2(proxy, start=False)
    first, first_transport = pooled_h1(proxy)
    pooled_h1(proxy)
    for stream_id in (1, 3, 5):
        peer.h2.send_headers(stream_id, request(b"GET", b"/%d" % stream_id), end_stream=True)
    peer.pump()
    assert reset_code(peer, 1) is None and reset_code(peer, 3) is None
    assert reset_code(peer, 5) == ErrorCodes.REFUSED_STREAM
    assert loop.dialed == []  # the refused stream never went anywhere
    first.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # one stream ends: room again
    peer.pump()
    peer.h2.send_headers(7, request(b"GET", b"/7"), end_stream=True)
    peer.pump()
    assert reset_code(peer, 7) is None
    assert b"GET /7 HTTP/1.1" in first_transport.data


def test_request_data_is_acknowledged_only_once_the_upstream_took_it(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/up", (b"content-length", b"30000")))
    peer.pump()
    conn.pause_writing()  # the upstream's socket buffer is full
    peer.h2.send_data(1, b"a" * 10000)
    peer.h2.send_data(1, b"b" * 10000)  # the stream stays open: its window matters
    peer.pump()
    assert upstream.take().endswith(b"a" * 10000 + b"b" * 10000)
    assert peer.of(h2.events.WindowUpdated, 1) == []  # written, not yet taken: no window back
    assert peer.h2.local_flow_control_window(1) == 32768 - 20000
    conn.resume_writing()
    peer.pump()
    assert [e.delta for e in peer.of(h2.events.WindowUpdated, 1)] == [20000]


def test_request_data_taken_at_once_is_acknowledged_at_once(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/up", (b"content-length", b"40000")))
    peer.h2.send_data(1, b"a" * 16384)
    peer.h2.send_data(1, b"b" * 16384)
    peer.pump()
    assert sum(e.delta for e in peer.of(h2.events.WindowUpdated, 1)) >= 16384  # the window keeps opening


def test_request_data_waits_unacknowledged_while_the_upstream_connects(proxy: Proxy, loop: VirtualLoop) -> None:
    _, _, peer = client_h2(proxy)
    loop.refused.add((BASELINE.host, BASELINE.port))
    peer.h2.send_headers(1, request(b"POST", b"/up", (b"content-length", b"20000")))
    peer.h2.send_data(1, b"c" * 10000)
    peer.h2.send_data(1, b"c" * 10000)
    peer.pump()  # the connect fails: nothing was taken, the stream is answered 503
    assert peer.of(h2.events.WindowUpdated, 1) == []
    assert dict(peer.of(h2.events.ResponseReceived, 1)[0].headers)[b":status"] == b"503"


def test_empty_data_frame_ending_a_stream_adds_nothing_upstream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x"))  # no content-length: chunked upstream
    peer.h2.send_data(1, b"hello")
    peer.pump()
    peer.h2.end_stream(1)  # h2's end_stream: an empty DATA frame with END_STREAM
    peer.pump()
    assert upstream.take() == (b"POST /x HTTP/1.1\r\nhost: users\r\n" + XFF + b"transfer-encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n0\r\n\r\n")


def test_request_trailers_reach_a_chunked_upstream(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    _, upstream = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x"))
    peer.h2.send_data(1, b"hello")
    peer.h2.send_headers(1, [(b"x-sum", b"5")], end_stream=True)
    peer.pump()
    assert upstream.take().endswith(b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 5\r\n\r\n")


def test_answer_before_the_request_ended_stops_the_rest_of_it(proxy: Proxy) -> None:
    _, _, peer = client_h2(proxy)
    conn, _ = pooled_h1(proxy)
    peer.h2.send_headers(1, request(b"POST", b"/x", (b"content-length", b"100")))
    peer.h2.send_data(1, b"a" * 10)
    peer.pump()
    conn.data_received(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    peer.pump()
    assert peer.of(h2.events.ResponseReceived, 1)[0].headers[0] == (b":status", b"413")
    assert peer.of(h2.events.StreamEnded, 1)
    rst = [f for f in frames(peer.raw) if isinstance(f, RstStreamFrame) and f.stream_id == 1]
    assert [f.error_code for f in rst] == [ErrorCodes.NO_ERROR]  # RFC 9113 §8.1
