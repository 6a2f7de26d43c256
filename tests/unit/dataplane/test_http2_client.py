"""``H2Client`` and ``H2ClientStream`` (``dataplane/http2/client.py``) behind a real ``Proxy``.

Requests come in over HTTP/1.1 (``H1Server`` on a fake transport) to a listener with
``upstream_protocol: http2``; the proxy dials its upstream through
``VirtualLoop.create_connection`` and the ``h2`` library answers as the HTTP/2 server
(``fakes.upstream_h2``). Covered:

* the request stream's head: pseudo-headers (``:authority``, ``:path``), no ``host``,
  ``expect`` or ``content-length`` copied from fields, content-length added when the
  length is known (also for a chunked body that arrived whole while connecting), END_STREAM
  on the head for no body, DATA and trailers otherwise; ``100 Continue`` answered by the proxy;
* the response back to the HTTP/1.1 client (chunked without content-length, passed through
  with one), response flow control (WINDOW_UPDATE only once the client took the bytes);
* REFUSED_STREAM and a GOAWAY below the stream's id reported as the ``REFUSED`` phase (the
  request is retried: same connection after REFUSED_STREAM, a new one after GOAWAY),
  other resets as ``SENT``/``STARTED``;
* an HTTP/1.1 answer to the preface reported as ``upstream_protocol_mismatch``;
* connection reuse, and a reset mid-response cutting the client off.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import h2.events
import pytest
from hyperframe.frame import GoAwayFrame

from dataplane.http2.client import H2Client
from dataplane.http2.engine import ErrorCodes
from dataplane.message import BODY_NONE, Request
from dataplane.proxy import Proxy
from dataplane.upstream import REFUSED, SENT, STARTED
from tests.unit.dataplane.fakes import (
    BASELINE,
    CLIENT_IP,
    FakeTransport,
    H2Peer,
    Recorder,
    VirtualLoop,
    client_h1,
    make_proxy,
    upstream_errors,
    upstream_h2,
)

IP = CLIENT_IP.encode()
GET = b"GET /p?q=1 HTTP/1.1\r\nHost: users\r\nUser-Agent: t\r\n\r\n"
SMALL: dict[str, Any] = {"h2_initial_stream_window_bytes": 32768, "write_high_watermark_bytes": 1024,
                         "write_low_watermark_bytes": 256}


@pytest.fixture
def proxy(loop: VirtualLoop) -> Proxy:
    return make_proxy(loop, limits=SMALL, listener={"upstream_protocol": "http2"})


def connected(loop: VirtualLoop) -> H2Peer:
    """Let the proxy's connect run, then answer it as an HTTP/2 server."""
    loop.settle()
    return upstream_h2(loop)


def respond(peer: H2Peer, stream_id: int, body: bytes = b"ok") -> None:
    peer.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(body))])
    peer.h2.send_data(stream_id, body, end_stream=True)
    peer.pump()


def requests(peer: H2Peer) -> list[h2.events.RequestReceived]:
    return peer.of(h2.events.RequestReceived)


# ---------------------------------------------------------------------- the request stream


def test_request_stream_pseudo_headers_and_fields(proxy: Proxy, loop: VirtualLoop) -> None:
    server, _ = client_h1(proxy)
    server.data_received(b"GET /p?q=1 HTTP/1.1\r\nHost: users\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n")
    peer = connected(loop)
    (received,) = requests(peer)
    assert received.headers == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"users"),
                                (b":path", b"/p?q=1"), (b"user-agent", b"t"), (b"accept", b"*/*"),
                                (b"x-forwarded-for", IP), (b"x-forwarded-proto", b"http")]
    assert peer.of(h2.events.StreamEnded, received.stream_id)  # no body: END_STREAM on the head


def test_body_with_known_length_and_expect_continue(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(b"POST /p?q=1 HTTP/1.1\r\nHost: users\r\nUser-Agent: t\r\nContent-Length: 5\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    peer = connected(loop)
    (received,) = requests(peer)
    assert received.headers == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"users"),
                                (b":path", b"/p?q=1"), (b"user-agent", b"t"), (b"x-forwarded-for", IP),
                                (b"x-forwarded-proto", b"http"), (b"content-length", b"5")]
    # expect is not forwarded on HTTP/2: the proxy says 100 Continue itself.
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    server.data_received(b"hello")
    peer.pump()
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 1)) == b"hello"
    assert peer.of(h2.events.StreamEnded, 1)
    respond(peer, 1, b"done")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone"


def test_absolute_form_authority_becomes_the_authority(proxy: Proxy, loop: VirtualLoop) -> None:
    server, _ = client_h1(proxy)
    server.data_received(b"GET http://Users:8080/a HTTP/1.1\r\nHost: ignored\r\n\r\n")
    peer = connected(loop)
    headers = requests(peer)[0].headers
    assert headers[2:4] == [(b":authority", b"users:8080"), (b":path", b"/a")]
    assert b"host" not in dict(headers)


def test_chunked_body_that_arrived_whole_while_connecting_gets_a_length(proxy: Proxy, loop: VirtualLoop) -> None:
    server, _ = client_h1(proxy)
    server.data_received(b"POST /c HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
    peer = connected(loop)
    assert requests(peer)[0].headers[-1] == (b"content-length", b"8")
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 1)) == b"helloabc"
    assert peer.of(h2.events.StreamEnded, 1)


def test_streamed_body_on_an_open_connection_has_no_length_and_keeps_trailers(proxy: Proxy,
                                                                               loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    respond(peer, 1)
    client.take()
    # The connection is pooled now: the next request's stream opens before its body arrives.
    server.data_received(b"POST /s HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    peer.pump()
    assert len(loop.dialed) == 1
    received = requests(peer)[1]
    assert received.stream_id == 3
    assert b"content-length" not in dict(received.headers)
    server.data_received(b"0\r\nX-Sum: 5\r\n\r\n")
    peer.pump()
    assert b"".join(e.data for e in peer.of(h2.events.DataReceived, 3)) == b"hello"
    assert [e.headers for e in peer.of(h2.events.TrailersReceived, 3)] == [[(b"x-sum", b"5")]]


def test_open_stream_never_copies_host_expect_or_content_length(proxy: Proxy, loop: VirtualLoop) -> None:
    # The head H2Client builds from whatever fields it is given.
    conn = H2Client(proxy.upstreams, BASELINE, proxy.runtime.limits, loop)
    transport = FakeTransport((BASELINE.host, BASELINE.port), loop)
    transport.protocol = conn
    loop.inside(lambda: conn.connection_made(cast(asyncio.Transport, transport)))
    peer = H2Peer(loop, conn, transport, client_side=False)
    peer.start()
    peer.pump()
    conn.reserved += 1
    fields = [(b"host", b"h"), (b"expect", b"100-continue"), (b"content-length", b"9"), (b"x-a", b"1")]
    request = Request(b"PUT", b"/z", b"1.1", b"auth", fields, BODY_NONE, 0, True, True, False)
    conn.open_stream(Recorder(), request, fields, [(b"x-b", b"2")], b"x-b: 2\r\n", 3)
    peer.pump()
    assert requests(peer)[0].headers == [(b":method", b"PUT"), (b":scheme", b"http"), (b":authority", b"auth"),
                                         (b":path", b"/z"), (b"x-a", b"1"), (b"x-b", b"2"),
                                         (b"content-length", b"3")]


# ---------------------------------------------------------------------- the response


def test_response_without_length_goes_chunked_to_the_http11_client(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    peer.h2.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
    peer.h2.send_data(1, b"abc")
    peer.h2.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    peer.pump()
    assert client.take() == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n")


def test_connection_is_reused_for_the_next_request(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    respond(peer, 1, b"one")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none"
    server.data_received(GET)
    peer.pump()
    respond(peer, 3, b"two")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo"
    assert len(loop.dialed) == 1


def test_response_data_is_acknowledged_only_once_the_client_took_it(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    server.pause_writing()  # the client does not read
    peer.h2.send_headers(1, [(b":status", b"200"), (b"content-length", b"30000")])
    peer.h2.send_data(1, b"a" * 10000)
    peer.h2.send_data(1, b"b" * 10000)
    peer.pump()
    assert client.data.endswith(b"a" * 10000 + b"b" * 10000)
    assert peer.of(h2.events.WindowUpdated, 1) == []
    assert peer.h2.local_flow_control_window(1) == 32768 - 20000
    server.resume_writing()
    peer.pump()
    assert [e.delta for e in peer.of(h2.events.WindowUpdated, 1)] == [20000]


def test_reset_mid_response_cuts_the_client_off(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    peer.h2.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")])
    peer.h2.send_data(1, b"abc")
    peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
    peer.pump()
    assert client.data == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    assert client.aborted


# ---------------------------------------------------------------------- refused streams


def test_refused_stream_is_retried_on_the_same_connection(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    peer.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    peer.pump()
    assert [r.stream_id for r in requests(peer)] == [1, 3]  # sent again: it was never processed
    assert requests(peer)[1].headers == requests(peer)[0].headers
    respond(peer, 3)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert upstream_errors(proxy, "upstream_refused") == 1


def test_a_stream_refused_twice_is_a_503(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    peer.h2.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    peer.pump()
    peer.h2.reset_stream(3, ErrorCodes.REFUSED_STREAM)
    peer.pump()
    out = client.take()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"x-turnout-error: upstream_refused" in out


def test_other_resets_are_not_retried(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
    peer.pump()
    assert len(requests(peer)) == 1
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"x-turnout-error: upstream_reset" in out


def test_goaway_below_the_stream_is_retried_on_a_new_connection(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(b"POST /p HTTP/1.1\r\nHost: users\r\n\r\n")  # not idempotent: REFUSED still retries
    peer = connected(loop)
    peer.h2.close_connection(last_stream_id=0)
    peer.pump()
    assert client.data == b""
    second = connected(loop)
    assert len(loop.dialed) == 2
    assert requests(second)[0].headers[:4] == [(b":method", b"POST"), (b":scheme", b"http"),
                                               (b":authority", b"users"), (b":path", b"/p")]
    respond(second, 1)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_goaway_at_or_above_the_stream_lets_it_finish(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    # An advisory GOAWAY (h2 cannot send one and go on): stream 1 may still be answered.
    peer.protocol.data_received(GoAwayFrame(0, last_stream_id=1).serialize())
    peer.pump()
    respond(peer, 1)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert len(loop.dialed) == 1
    server.data_received(GET)  # the next one cannot use a connection that is going away
    loop.settle()
    assert len(loop.dialed) == 2


@pytest.mark.parametrize(("action", "phase"), [
    ("refused", REFUSED), ("goaway", REFUSED), ("cancel", SENT), ("reset-after-head", STARTED),
    ("closed", SENT),
])
def test_phases_reported_to_the_listener(proxy: Proxy, loop: VirtualLoop, action: str, phase: int) -> None:
    server, _ = client_h1(proxy)
    server.data_received(GET)
    peer = connected(loop)
    respond(peer, 1)
    conn = loop.dialed[0].protocol
    assert isinstance(conn, H2Client)
    listener = Recorder()
    conn.reserved += 1
    request = Request(b"GET", b"/x", b"1.1", b"users", [], BODY_NONE, 0, True, False, False)
    conn.open_stream(listener, request, [], [], b"", 0)
    peer.pump()
    if action == "refused":
        peer.h2.reset_stream(3, ErrorCodes.REFUSED_STREAM)
    elif action == "goaway":
        peer.h2.close_connection(last_stream_id=1)
    elif action == "cancel":
        peer.h2.reset_stream(3, ErrorCodes.CANCEL)
    elif action == "reset-after-head":
        peer.h2.send_headers(3, [(b":status", b"200")])
        peer.h2.reset_stream(3, ErrorCodes.CANCEL)
    if action == "closed":
        loop.dialed[0].transport.lose()
    else:
        peer.pump()
    assert [e.phase for e in listener.errors] == [phase]


# ---------------------------------------------------------------------- an HTTP/1.1 server answering


def test_http11_answer_to_the_preface_is_a_protocol_mismatch(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    loop.settle()
    dialed = loop.dialed[0]
    assert dialed.transport.take().startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    dialed.protocol.data_received(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    loop.settle()
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"x-turnout-error: upstream_protocol_mismatch\r\n" in out
    assert b"upstream_protocol: http1" in out  # the reason says what to configure
    assert dialed.transport.closing
    assert upstream_errors(proxy, "upstream_protocol_mismatch") == 1


def test_http11_answer_split_across_reads_is_still_a_protocol_mismatch(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(GET)
    loop.settle()
    dialed = loop.dialed[0]
    dialed.protocol.data_received(b"HTTP/")
    dialed.protocol.data_received(b"1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    loop.settle()
    assert b"x-turnout-error: upstream_protocol_mismatch\r\n" in client.take()
