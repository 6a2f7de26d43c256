"""``H1Client`` (``dataplane/http1/client.py``) behind a real ``Proxy``, on fake transports.

Requests come in through an ``H1Server`` (or, for the head translation from HTTP/2, are
handed to ``open_stream`` directly); the upstream side is ``H1Client`` on a
``FakeTransport``, pooled beforehand or dialed through ``VirtualLoop.create_connection``.
Covered:

* the request head written upstream: framing by length (none, ``content-length: 0`` for
  methods that take a body, Content-Length, chunked with trailers), an HTTP/2 request's
  head in HTTP/1.1 (``:authority`` as Host, cookie crumbs joined, ``te`` dropped);
* response flow control: the upstream transport paused when the client's transport
  reports ``pause_writing`` and resumed once it drained;
* upstream framing errors (CL+TE, two lengths, bad lengths, bad heads) answered 502 with
  the connection closed and out of the pool; a bad chunk after the head cuts the client off;
* a reused pooled connection closing before any byte: retried once on a new connection
  for GET, never for POST;
* an HTTP/2 server's answer to an HTTP/1.1 request reported as ``upstream_protocol_mismatch``
  (phase ``NOT_CONNECTED``: a sandbox falls back even for POST);
* 1xx handling, bytes after a response, unsolicited bytes, ``101`` unasked and asked.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import pytest

from dataplane.http2.engine import H2Engine, ProtocolError
from dataplane.message import BODY_CHUNKED, BODY_NONE, Request, field_lines
from dataplane.proxy import Proxy
from dataplane.upstream import SENT, STALE, STARTED
from tests.unit.dataplane.fakes import (
    BASELINE,
    CLIENT_IP,
    ROUTED,
    SANDBOX,
    Recorder,
    VirtualLoop,
    client_h1,
    make_proxy,
    pooled_h1,
    upstream_errors,
)

XFF = b"x-forwarded-for: " + CLIENT_IP.encode() + b"\r\nx-forwarded-proto: http\r\n"
GET = b"GET / HTTP/1.1\r\nHost: users\r\n\r\n"
# The codecs refuse some framing themselves (upstream_bad_head), turnout's checks the rest.
FRAMING = {b"upstream_bad_framing", b"upstream_bad_head"}
SMALL: dict[str, Any] = {"write_high_watermark_bytes": 1024, "write_low_watermark_bytes": 256,
                         "max_head_bytes": 2048}


@pytest.fixture(params=["httptools", "h11"])
def proxy(request: pytest.FixtureRequest, loop: VirtualLoop) -> Proxy:
    return make_proxy(loop, request.param, SMALL)


def error_cause(response: bytes) -> bytes:
    for line in response.split(b"\r\n"):
        if line.startswith(b"x-turnout-error: "):
            return line[len(b"x-turnout-error: "):]
    raise AssertionError("no x-turnout-error in " + repr(response))


# ---------------------------------------------------------------------- the request head


@pytest.mark.parametrize(("method", "framing"), [
    (b"GET", b""), (b"HEAD", b""), (b"DELETE", b""), (b"OPTIONS", b""),
    (b"POST", b"content-length: 0\r\n"), (b"PUT", b"content-length: 0\r\n"), (b"PATCH", b"content-length: 0\r\n"),
])
def test_a_request_without_body_says_so_for_methods_that_take_one(proxy: Proxy, method: bytes,
                                                                  framing: bytes) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(method + b" /x HTTP/1.1\r\nHost: users\r\n\r\n")
    assert upstream.take() == method + b" /x HTTP/1.1\r\nhost: users\r\n" + XFF + framing + b"\r\n"


def test_open_stream_frames_by_length(proxy: Proxy) -> None:
    conn, upstream = pooled_h1(proxy)
    request = Request(b"POST", b"/p", b"1.1", b"users", [(b"host", b"users")], BODY_CHUNKED, -1, True, False, False)
    extra = [(b"x-extra", b"1")]
    conn.open_stream(Recorder(), request, request.fields, extra, field_lines(extra), 7)
    assert upstream.take() == b"POST /p HTTP/1.1\r\nhost: users\r\nx-extra: 1\r\ncontent-length: 7\r\n\r\n"
    conn.send_data(b"1234567", 7)
    conn.send_end([(b"x-t", b"1")])  # a Content-Length body carries no trailers
    assert upstream.take() == b"1234567"


def test_open_stream_chunked_with_trailers(proxy: Proxy) -> None:
    conn, upstream = pooled_h1(proxy)
    listener = Recorder()
    request = Request(b"POST", b"/p", b"1.1", b"users", [(b"host", b"users")], BODY_CHUNKED, -1, True, False, False)
    conn.open_stream(listener, request, request.fields, [], b"", -1)
    conn.send_data(b"abc", 3)
    conn.send_end([(b"x-sum", b"7")])
    assert upstream.take() == (b"POST /p HTTP/1.1\r\nhost: users\r\ntransfer-encoding: chunked\r\n\r\n"
                               b"3\r\nabc\r\n0\r\nx-sum: 7\r\n\r\n")
    assert listener.taken == 3  # on its way: the client may send more


def test_an_empty_piece_of_a_chunked_body_writes_nothing(proxy: Proxy) -> None:
    conn, upstream = pooled_h1(proxy)
    request = Request(b"POST", b"/p", b"2", b"users", [], BODY_CHUNKED, -1, True, False, False)
    request.http2 = True
    conn.open_stream(Recorder(), request, [], [], b"", -1)
    upstream.take()
    conn.send_data(b"", 0)
    conn.send_data(b"abc", 3)
    conn.send_end([])
    assert upstream.take() == b"3\r\nabc\r\n0\r\n\r\n"


def test_http2_request_head_in_http11(proxy: Proxy) -> None:
    conn, upstream = pooled_h1(proxy)
    fields = [(b"cookie", b"a=1"), (b"user-agent", b"h2"), (b"te", b"trailers"), (b"cookie", b"b=2")]
    request = Request(b"GET", b"/q?x=1", b"2", b"users:8080", fields, BODY_NONE, -1, True, False, False)
    request.http2 = True
    conn.open_stream(Recorder(), request, fields, [(b"x-forwarded-for", b"10.0.0.1")],
                     b"x-forwarded-for: 10.0.0.1\r\n", 0)
    assert upstream.take() == (b"GET /q?x=1 HTTP/1.1\r\nhost: users:8080\r\nuser-agent: h2\r\n"
                               b"cookie: a=1; b=2\r\nx-forwarded-for: 10.0.0.1\r\n\r\n")


# ---------------------------------------------------------------------- response flow control


def test_upstream_is_paused_while_the_client_does_not_read(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    server.pause_writing()  # the client's transport buffer is full
    conn.data_received(b"a" * 600)
    assert upstream.pauses == 0
    conn.data_received(b"b" * 600)  # 1200 unacknowledged > 1024
    assert upstream.pauses == 1 and not upstream.is_reading()
    assert client.data.endswith(b"a" * 600 + b"b" * 600)  # handed to the client's transport anyway
    server.resume_writing()  # drained: what it took meanwhile is reported
    assert upstream.resumes == 1 and upstream.is_reading()


def test_upstream_is_not_paused_while_the_client_keeps_up(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(10):
        conn.data_received(b"c" * 1000)
    assert upstream.pauses == 0


def test_a_paused_connection_is_read_again_when_it_goes_back_to_the_pool(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n")
    server.pause_writing()
    conn.data_received(b"d" * 2000)  # the whole body, the client still not reading
    assert upstream.pauses == 1
    assert proxy.upstreams.h1.stats()["idle"] == 1
    assert upstream.is_reading()  # idle in the pool: it must see the peer's close


# ---------------------------------------------------------------------- upstream framing errors


@pytest.mark.parametrize(("head", "causes"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", FRAMING),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", FRAMING),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", FRAMING),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc", FRAMING),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", FRAMING),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", {b"upstream_bad_head"}),
    (b"HTTP/2 200\r\n\r\n", {b"upstream_bad_head"}),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", {b"bad_line_ending"}),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", {b"obs_fold"}),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 2100 + b"\r\n\r\n", {b"upstream_head_too_large"}),
])
def test_bad_response_heads_are_a_502_and_the_connection_is_not_reused(proxy: Proxy, head: bytes,
                                                                       causes: set[bytes]) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    upstream.take()
    conn.data_received(head)
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert error_cause(out) in causes
    assert upstream.aborted
    assert proxy.upstreams.h1.stats() == {"open": 0, "idle": 0}
    assert not client.closing  # the client's connection goes on
    server.data_received(GET)
    assert upstream.take() == b""  # not on the broken connection


def test_a_bad_chunk_after_the_head_cuts_the_client_off_and_closes_the_upstream(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    conn.data_received(b"zz\r\n")
    # The head went out already: a 502 is no longer possible, a short clean response must not be.
    assert client.data == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert client.aborted
    assert upstream.aborted and proxy.upstreams.h1.stats() == {"open": 0, "idle": 0}
    assert upstream_errors(proxy, "upstream_bad_chunked") == 1


def test_bytes_after_a_response_keep_the_connection_out_of_the_pool(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"  # only what was asked for
    assert upstream.aborted and proxy.upstreams.h1.stats()["idle"] == 0


def test_bytes_after_a_streamed_response_keep_the_connection_out_of_the_pool(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.data_received(b"1\r\na\r\n0\r\n\r\nHTTP/1.1")
    assert client.take().endswith(b"1\r\na\r\n0\r\n\r\n")
    assert upstream.aborted and proxy.upstreams.h1.stats()["idle"] == 0


@pytest.mark.parametrize(("head", "reused"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_the_response_decides_whether_the_connection_is_reused(proxy: Proxy, head: bytes, reused: bool) -> None:
    server, _ = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(head)
    assert proxy.upstreams.h1.stats()["idle"] == (1 if reused else 0)
    assert upstream.aborted is not reused


def test_unsolicited_bytes_on_an_idle_connection_close_it(proxy: Proxy) -> None:
    conn, upstream = pooled_h1(proxy)
    conn.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert upstream.aborted and proxy.upstreams.h1.stats() == {"open": 0, "idle": 0}


def test_an_idle_connection_closed_by_the_peer_is_forgotten(proxy: Proxy, loop: VirtualLoop) -> None:
    server, _ = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    conn.eof_received()
    upstream.lose()
    assert proxy.upstreams.h1.stats() == {"open": 0, "idle": 0}
    server.data_received(GET)
    loop.settle()  # no pooled connection: a new one is dialed
    assert [d.port for d in loop.dialed] == [BASELINE.port]
    assert loop.dialed[0].transport.take().startswith(b"GET / HTTP/1.1\r\n")


# ---------------------------------------------------------------------- stale keep-alive connections


def test_get_on_a_stale_pooled_connection_is_retried_once_on_a_new_one(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    _, stale = pooled_h1(proxy)
    server.data_received(GET)
    sent = stale.take()
    stale.lose()  # the peer had closed it while idle: not a byte of an answer
    assert client.data == b""
    loop.settle()
    assert len(loop.dialed) == 1
    fresh = loop.dialed[0]
    assert fresh.transport.take() == sent  # the same request, whole, on a new connection
    fresh.protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert upstream_errors(proxy, "upstream_reset") == 1


def test_a_stale_get_is_retried_only_once(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    _, stale = pooled_h1(proxy)
    server.data_received(GET)
    stale.lose()
    loop.settle()
    loop.dialed[0].transport.lose()  # the new connection fails the same way: that is an answer
    loop.settle()
    assert len(loop.dialed) == 1
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and error_cause(out) == b"upstream_reset"


@pytest.mark.parametrize("request_bytes", [
    b"POST /p HTTP/1.1\r\nHost: users\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /p HTTP/1.1\r\nHost: users\r\n\r\n",  # no body, still not idempotent
])
def test_post_on_a_stale_pooled_connection_is_not_retried(proxy: Proxy, loop: VirtualLoop,
                                                          request_bytes: bytes) -> None:
    server, client = client_h1(proxy)
    _, stale = pooled_h1(proxy)
    server.data_received(request_bytes)
    stale.lose()
    loop.settle()
    assert loop.dialed == []
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and error_cause(out) == b"upstream_reset"


def test_a_connection_closing_after_part_of_the_answer_is_not_stale(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    conn, stale = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 200")
    stale.lose()
    loop.settle()
    assert loop.dialed == []
    assert client.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_upstream_phases_reported_by_the_connection(proxy: Proxy) -> None:
    # What each failure is reported as (the router's retry decisions rest on it).
    for reused, answer, phase in ((True, b"", STALE), (False, b"", SENT), (True, b"HTTP/1.1 2", SENT),
                                  (True, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", STARTED)):
        conn, transport = pooled_h1(proxy)
        conn.reused = reused
        listener = Recorder()
        request = Request(b"GET", b"/", b"1.1", b"users", [(b"host", b"users")], BODY_NONE, 0, True, False, False)
        conn.open_stream(listener, request, request.fields, [], b"", 0)
        if answer:
            conn.data_received(answer)
        transport.lose()
        assert [e.phase for e in listener.errors] == [phase], (reused, answer)


# ---------------------------------------------------------------------- an HTTP/2 server answering


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    payload = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
    return struct.pack(">BHBBL", 0, len(payload), 4, 0, 0) + payload


def h2_library_answer(request: bytes) -> bytes:
    """What the ``h2`` library, as an HTTP/2-only server, writes to an HTTP/1.1 client."""
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    with pytest.raises(Exception, match="preamble"):
        peer.receive_data(request)
    return peer.data_to_send()


def turnout_answer(request: bytes) -> bytes:
    """What turnout's own HTTP/2 engine, as an HTTP/2-only server, writes: SETTINGS,
    WINDOW_UPDATE and GOAWAY PROTOCOL_ERROR."""
    engine = H2Engine(False, max_concurrent_streams=128, initial_window_size=256 * 1024,
                      connection_window_size=1024 * 1024)
    engine.initiate_connection()
    with pytest.raises(ProtocolError):
        engine.receive_data(request)
    return engine.data_to_send()


def test_http2_answer_is_a_protocol_mismatch(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    # SETTINGS with MAX_CONCURRENT_STREAMS 10 and a GOAWAY: bytes no HTTP/1.1 response starts with.
    conn.data_received(settings_frame((3, 10), (4, 65535)) + struct.pack(">BHBBLLL", 0, 8, 7, 0, 0, 0, 1))
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert error_cause(out) == b"upstream_protocol_mismatch"
    assert b"upstream_protocol: http2" in out  # the reason says what to configure
    assert upstream.aborted
    assert upstream_errors(proxy, "upstream_protocol_mismatch") == 1


def test_a_mismatched_sandbox_falls_back_to_baseline_even_for_post(proxy: Proxy) -> None:
    # NOT_CONNECTED: the sandbox never processed the request, so even a POST may go to baseline.
    server, client = client_h1(proxy)
    sandbox_conn, _ = pooled_h1(proxy, SANDBOX)
    baseline_conn, baseline = pooled_h1(proxy, BASELINE)
    server.data_received(b"POST /p HTTP/1.1\r\nHost: users\r\n" + ROUTED + b"\r\n")
    sandbox_conn.data_received(settings_frame((3, 10)))
    assert baseline.take().startswith(b"POST /p HTTP/1.1\r\n")
    baseline_conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert upstream_errors(proxy, "upstream_protocol_mismatch", route="sandbox") == 1


def test_an_http2_server_speaking_before_the_first_request_is_a_protocol_mismatch(proxy: Proxy,
                                                                                  loop: VirtualLoop) -> None:
    # An HTTP/2-only server sends its SETTINGS as soon as it accepts: on a new connection
    # they may arrive before the request is written, split over reads.
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    frame = settings_frame((3, 10), (4, 65535))
    conn.data_received(frame[:4])
    conn.data_received(frame[4:])
    assert not upstream.aborted
    server.data_received(GET)
    loop.settle()
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert error_cause(out) == b"upstream_protocol_mismatch"


@pytest.mark.parametrize("answer", [h2_library_answer, turnout_answer], ids=["h2-library", "turnout-engine"])
def test_http2_servers_answer_then_close_is_a_protocol_mismatch(proxy: Proxy, loop: VirtualLoop,
                                                                answer: Any) -> None:
    # Real HTTP/2 servers' SETTINGS hold no CR or LF: the head scan alone would wait for more.
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(answer(upstream.take()))
    conn.eof_received()
    upstream.lose()
    loop.settle()
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert error_cause(out) == b"upstream_protocol_mismatch"


# ---------------------------------------------------------------------- 1xx and upgrades


def test_100_continue_the_client_did_not_ask_for_is_not_relayed(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"POST / HTTP/1.1\r\nHost: users\r\nContent-Length: 1\r\n\r\n")
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    assert client.data == b""
    server.data_received(b"x")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def test_101_unasked_is_a_502(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(GET)
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    out = client.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and error_cause(out) == b"upstream_bad_head"
    assert upstream.aborted


def test_websocket_upgrade_becomes_a_tunnel(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"GET /ws HTTP/1.1\r\nHost: users\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: k\r\n\r\n")
    assert upstream.take() == (b"GET /ws HTTP/1.1\r\nhost: users\r\nsec-websocket-key: k\r\nconnection: upgrade\r\n"
                               b"upgrade: websocket\r\n" + XFF + b"\r\n")
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                       b"Sec-WebSocket-Accept: a\r\n\r\n\x81\x02hi")
    assert client.take() == (b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: a\r\n"
                             b"connection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x02hi")
    server.data_received(b"\x81\x82mask")  # raw, both ways
    assert upstream.take() == b"\x81\x82mask"
    conn.data_received(b"\x88\x00")
    assert client.take() == b"\x88\x00"
    server.eof_received()
    assert upstream.eof_written  # the client's half-close reaches the upstream
