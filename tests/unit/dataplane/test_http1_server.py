"""``H1Server`` (``dataplane/http1/server.py``) behind a real ``Proxy``, on fake transports.

A client connection (``H1Server``) and pooled upstream connections (``H1Client``) sit on
``FakeTransport``s; the event loop is not run except where a timer must fire or a connect
must finish (``fakes.VirtualLoop``). Covered:

* a request in, and the exact bytes the upstream receives: request line, forwarded fields,
  ``x-forwarded-for``/``x-forwarded-proto``, Content-Length or chunked framing, trailers;
* the response out, framed for the client: Content-Length passed through, chunked for an
  until-close or chunked upstream body to HTTP/1.1, close-delimited for HTTP/1.0, no body
  after HEAD;
* keep-alive and pipelining: two requests in one buffer answered in order, the second not
  parsed before the first response ends, the pipeline buffer bounded;
* malformed heads answered 400/431/414 with ``connection: close``, the connection
  lingering (input discarded, closed at EOF or after ``lingering_timeout_s``);
* ``Expect: 100-continue`` relayed; an answer before the whole body closes the connection;
* request body flow control (``pause_reading`` above the high watermark unacknowledged
  upstream, ``resume_reading`` at the low one), also while the upstream is connecting;
* a response that breaks mid-body aborts the client, never ends cleanly.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import pytest

from dataplane.proxy import Proxy
from tests.unit.dataplane.fakes import (
    BASELINE,
    CLIENT_IP,
    ROUTED,
    SANDBOX,
    VirtualLoop,
    client_h1,
    make_proxy,
    pooled_h1,
)

XFF = b"x-forwarded-for: " + CLIENT_IP.encode() + b"\r\nx-forwarded-proto: http\r\n"
OK5 = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
SMALL: dict[str, Any] = {"max_head_bytes": 1024, "max_request_line_bytes": 256, "max_header_count": 10,
                         "write_high_watermark_bytes": 1024, "write_low_watermark_bytes": 256,
                         "pipeline_buffer_bytes": 512}


@pytest.fixture(params=["httptools", "h11"])
def proxy(request: pytest.FixtureRequest, loop: VirtualLoop) -> Proxy:
    return make_proxy(loop, request.param, SMALL)


def line(status: int) -> bytes:
    """The status line turnout writes for a registered code (Python's phrase for it)."""
    return b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())


def refusal(status_line: bytes, reason: bytes, cause: bytes) -> bytes:
    body = reason + b"\n"
    return (status_line + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"x-turnout-error: %s\r\nconnection: close\r\n\r\n" % (len(body), cause) + body)


# ---------------------------------------------------------------------- what the upstream receives


def test_get_is_forwarded_with_the_proxy_fields_and_answered(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"GET /a?b=1 HTTP/1.1\r\nHost: users\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n")
    assert upstream.take() == (b"GET /a?b=1 HTTP/1.1\r\nhost: users\r\nuser-agent: t/1\r\naccept: */*\r\n" + XFF
                               + b"\r\n")
    assert client.data == b""


def test_routed_request_goes_to_the_sandbox(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    _, baseline = pooled_h1(proxy, BASELINE)
    sandbox_conn, sandbox = pooled_h1(proxy, SANDBOX)
    server.data_received(b"GET /s HTTP/1.1\r\nHost: users\r\n" + ROUTED + b"\r\n")
    assert baseline.data == b""
    assert sandbox.take() == b"GET /s HTTP/1.1\r\nhost: users\r\nbaggage: turnout-session=k1\r\n" + XFF + b"\r\n"
    sandbox_conn.data_received(OK5)
    assert client.take() == OK5


def test_client_forwarded_for_is_appended_to_and_its_proto_kept(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n"
                         b"X-Forwarded-For: 2.2.2.2\r\n\r\n")
    assert upstream.take() == (b"GET / HTTP/1.1\r\nhost: users\r\nx-forwarded-proto: https\r\n"
                               b"x-forwarded-for: 1.1.1.1, 2.2.2.2, " + CLIENT_IP.encode() + b"\r\n\r\n")


def test_content_length_body_is_forwarded_with_its_length(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"POST /u HTTP/1.1\r\nHost: users\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\n"
                         b"hello")
    assert upstream.take() == (b"POST /u HTTP/1.1\r\nhost: users\r\ncontent-type: text/plain\r\n" + XFF
                               + b"content-length: 11\r\n\r\nhello")
    server.data_received(b" world")
    assert upstream.take() == b" world"


def test_chunked_body_is_forwarded_chunked_with_its_trailers(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"POST /u HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    assert upstream.take() == (b"POST /u HTTP/1.1\r\nhost: users\r\n" + XFF + b"transfer-encoding: chunked\r\n\r\n"
                               b"3\r\nhel\r\n")
    server.data_received(b"lo\r\n0\r\nX-Sum: 1\r\nHost: evil\r\n\r\n")
    assert upstream.take() == b"2\r\nlo\r\n0\r\nx-sum: 1\r\n\r\n"  # Host is no trailer: dropped


def test_http10_request_without_host_gets_the_baseline_as_host(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"GET /old HTTP/1.0\r\nUser-Agent: t\r\n\r\n")
    assert upstream.take() == (b"GET /old HTTP/1.1\r\nuser-agent: t\r\nhost: 127.0.0.1:18080\r\n" + XFF + b"\r\n")


def test_hop_by_hop_fields_do_not_reach_the_upstream(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n"
                         b"Keep-Alive: 5\r\nTE: trailers\r\nX-End: 2\r\n\r\n")
    assert upstream.take() == b"GET / HTTP/1.1\r\nhost: users\r\nx-end: 2\r\n" + XFF + b"\r\n"


# ---------------------------------------------------------------------- the response, framed for the client


def test_content_length_response_is_passed_through_and_the_connection_kept(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: up\r\nConnection: keep-alive\r\n\r\nhel")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nserver: up\r\n\r\nhel"
    conn.data_received(b"lo")
    assert client.take() == b"lo"
    assert not client.closing and not client.eof_written
    assert proxy.upstreams.h1.stats() == {"open": 1, "idle": 1}  # back in the pool


def test_until_close_body_goes_chunked_to_an_http11_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1")
    assert client.take() == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\npart1\r\n")
    conn.data_received(b"part22")
    assert client.take() == b"6\r\npart22\r\n"
    conn.eof_received()
    assert client.take() == b"0\r\n\r\n"
    assert upstream.aborted  # a body that ended with the connection: the connection is not reused
    assert not client.closing  # the client's connection is kept: its response was framed
    server.data_received(b"GET /next HTTP/1.1\r\nHost: users\r\n\r\n")
    assert server.request is not None and server.request.target == b"/next"


def test_chunked_body_with_trailers_goes_chunked_to_an_http11_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
                       b"4\r\nabcd\r\n0\r\nX-Sum: 9\r\n\r\n")
    assert client.take() == (b"HTTP/1.1 200 OK\r\ntrailer: x-sum\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"4\r\nabcd\r\n0\r\nx-sum: 9\r\n\r\n")
    assert proxy.upstreams.h1.stats()["idle"] == 1


def test_streamed_body_goes_close_delimited_to_an_http10_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.0\r\nHost: users\r\nConnection: keep-alive\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabcd"
    conn.data_received(b"0\r\nx-t: 1\r\n\r\n")
    assert client.take() == b""  # no chunk framing, no trailers: the close ends the body
    assert client.eof_written


def test_content_length_response_keeps_an_http10_keep_alive_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.0\r\nHost: users\r\nConnection: keep-alive\r\n\r\n")
    conn.data_received(OK5)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\nhello"
    assert not client.eof_written and not client.closing


def test_http10_client_without_keep_alive_is_closed_after_its_response(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.0\r\nHost: users\r\n\r\n")
    conn.data_received(OK5)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
    assert client.eof_written


def test_client_asking_to_close_gets_connection_close(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n")
    conn.data_received(OK5)
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
    assert client.eof_written


def test_head_response_has_its_length_but_no_body(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"HEAD / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
    server.data_received(b"GET /2 HTTP/1.1\r\nHost: users\r\n\r\n")  # the connection goes on
    assert server.request is not None and server.request.target == b"/2"


def test_unregistered_status_with_reason_and_without(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 299 Fine Indeed\r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 299 Fine Indeed\r\ncontent-length: 0\r\n\r\n"
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 299 Unknown\r\ncontent-length: 0\r\n\r\n"


# ---------------------------------------------------------------------- keep-alive and pipelining


def test_pipelined_requests_are_answered_in_order_one_at_a_time(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"GET /1 HTTP/1.1\r\nHost: users\r\n\r\nGET /2 HTTP/1.1\r\nHost: users\r\n\r\n")
    # Only the first was parsed and sent; the second waits for the first response to end.
    assert upstream.take() == b"GET /1 HTTP/1.1\r\nhost: users\r\n" + XFF + b"\r\n"
    assert server.request is not None and server.request.target == b"/1"
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    # The first answer is out, then the second request went on the same (pooled) connection.
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none"
    assert upstream.take() == b"GET /2 HTTP/1.1\r\nhost: users\r\n" + XFF + b"\r\n"
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
    assert client.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo"


def test_pipelined_request_after_a_body_and_a_streamed_response(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"POST /1 HTTP/1.1\r\nHost: users\r\nContent-Length: 3\r\n\r\nabcGET /2 HTTP/1.1\r\n")
    assert upstream.take().endswith(b"content-length: 3\r\n\r\nabc")
    server.data_received(b"Host: users\r\n\r\n")  # the rest of the second head, held
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
    assert upstream.take() == b""  # the first response has not ended
    conn.data_received(b"0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    assert upstream.take() == b"GET /2 HTTP/1.1\r\nhost: users\r\n" + XFF + b"\r\n"


def test_pipeline_buffer_is_bounded_by_pausing_the_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET /1 HTTP/1.1\r\nHost: users\r\n\r\n")
    server.data_received(b"GET /2 HTTP/1.1\r\nHost: users\r\nX-Pad: " + b"p" * 400 + b"\r\n")
    assert client.pauses == 0  # 442 bytes held: under pipeline_buffer_bytes (512)
    server.data_received(b"X-Pad2: " + b"p" * 100 + b"\r\n\r\n")
    assert client.pauses == 1 and not client.is_reading()
    conn.data_received(OK5)
    assert client.resumes == 1 and client.is_reading()  # the next request is being served
    assert server.request is not None and server.request.target == b"/2"


def test_leading_empty_lines_before_a_request_are_ignored(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"\r\n\r\nGET /x HTTP/1.1\r\nHost: users\r\n\r\n")
    assert upstream.take().startswith(b"GET /x HTTP/1.1\r\n")


# ---------------------------------------------------------------------- malformed heads


@pytest.mark.parametrize(("data", "status_line", "reason", "cause"), [
    (b"GET / HTTP/1.1\r\n\r\n", line(400), None, None),  # missing Host
    (b"GET / HTTP/1.1\nHost: users\n\n", line(400), b"bare LF in message head",
     b"bad_line_ending"),
    (b"GET / HTTP/1.1\r\nHost: users\r\nX-A: 1\r\n folded\r\n\r\n", line(400),
     b"obsolete line folding in header", b"obs_fold"),
    (b"POST / HTTP/1.1\r\nHost: users\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", line(400),
     None, None),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: users\r\n\r\n", line(414),
     b"request line too long", b"uri_too_long"),
    (b"GET / HTTP/1.1\r\nHost: users\r\n" + b"X-A: 1\r\n" * 11 + b"\r\n", line(431),
     b"too many header fields", b"too_many_headers"),
    (b"GET / HTTP/1.1\r\nHost: users\r\nX-Big: " + b"b" * 1100 + b"\r\n\r\n",
     line(431), b"request head too large", b"head_too_large"),
    (b"PUT / HTTP/1.1\r\nHost: users\r\nExpect: teapot\r\n\r\n", line(417),
     b"only 'Expect: 100-continue' is supported", b"expectation_failed"),
])
def test_malformed_heads_are_answered_and_the_connection_lingers(proxy: Proxy, loop: VirtualLoop, data: bytes,
                                                                 status_line: bytes, reason: bytes | None,
                                                                 cause: bytes | None) -> None:
    server, client = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(data)
    out = client.take()
    if reason is None or cause is None:  # the two codecs give different reasons: the status is what counts
        assert out.startswith(status_line + b"\r\n") and b"connection: close\r\n" in out
    else:
        assert out == refusal(status_line, reason, cause)
    assert upstream.data == b""  # never forwarded
    # Lingering: FIN sent, the connection still reads (and drops) what the client sends.
    assert client.eof_written and not client.closing
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    assert client.take() == b"" and upstream.data == b""
    loop.advance(1.9)
    assert not client.closing
    loop.advance(0.2)  # lingering_timeout_s (2 s) after the reply
    assert client.closing


def test_lingering_ends_when_the_client_closes(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\n\r\n")
    assert client.eof_written and not client.closing
    server.eof_received()
    assert client.closing


def test_half_close_after_the_request_keeps_the_response_flowing(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    assert server.eof_received() is True  # keep the transport open for the response
    assert not client.closing
    conn.data_received(OK5)
    out = client.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n") and out.endswith(b"\r\n\r\nhello")


def test_half_closed_connection_closes_once_its_response_is_out(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    server.eof_received()
    conn.data_received(OK5)
    assert client.take().endswith(b"hello")
    assert client.closing or client.eof_written


def test_a_head_arriving_in_pieces_is_parsed_once_complete(proxy: Proxy) -> None:
    server, _ = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    request = b"GET /p HTTP/1.1\r\nHost: users\r\nX-A: 1\r\n\r\n"
    for i in range(len(request) - 1):
        server.data_received(request[i:i + 1])
        assert upstream.data == b""
    server.data_received(request[-1:])
    assert upstream.take().startswith(b"GET /p HTTP/1.1\r\nhost: users\r\nx-a: 1\r\n")


def test_an_incomplete_head_times_out_with_408(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: us")
    loop.advance(9.9)
    assert client.data == b""
    loop.advance(0.2)  # header_read_timeout_s: 10 s
    assert client.take().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert client.eof_written


def test_bad_chunked_request_body_is_a_400_and_the_upstream_request_is_dropped(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    _, upstream = pooled_h1(proxy)
    server.data_received(b"POST / HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nAXX")
    assert upstream.take().endswith(b"1\r\nA\r\n")
    out = client.take()
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"x-turnout-error: bad_chunked\r\n" in out
    assert upstream.aborted  # the upstream never sees a request that looks complete


# ---------------------------------------------------------------------- Expect: 100-continue


def test_expect_100_continue_is_relayed_from_the_upstream(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"PUT /u HTTP/1.1\r\nHost: users\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert upstream.take() == (b"PUT /u HTTP/1.1\r\nhost: users\r\nexpect: 100-continue\r\n" + XFF
                               + b"content-length: 5\r\n\r\n")
    assert client.data == b""  # the proxy does not answer 100 itself over HTTP/1.1
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    server.data_received(b"hello")
    assert upstream.take() == b"hello"
    conn.data_received(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"
    assert not client.eof_written


def test_an_answer_before_the_whole_body_closes_the_connection(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"PUT /u HTTP/1.1\r\nHost: users\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    conn.data_received(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    assert client.eof_written  # lingering: what the client still sends is read and dropped
    assert upstream.aborted  # the request was not sent whole: the connection cannot be reused
    server.data_received(b"hello")
    assert client.take() == b""


# ---------------------------------------------------------------------- request body flow control


def test_client_is_paused_while_the_upstream_holds_too_much_of_the_body(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"POST /u HTTP/1.1\r\nHost: users\r\nContent-Length: 4096\r\n\r\n")
    conn.pause_writing()  # the upstream's socket buffer is full
    server.data_received(b"a" * 1024)
    assert client.pauses == 0  # at the high watermark (1024), not above it
    server.data_received(b"b")
    assert client.pauses == 1 and not client.is_reading()
    assert upstream.take().endswith(b"a" * 1024 + b"b")  # written, not yet taken
    conn.resume_writing()  # the upstream took it all
    assert client.resumes == 1 and client.is_reading()


def test_client_resumes_only_at_the_low_watermark(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"POST /u HTTP/1.1\r\nHost: users\r\nContent-Length: 4096\r\n\r\n")
    conn.pause_writing()
    server.data_received(b"x" * 1500)
    assert client.pauses == 1
    exchange = server.exchange
    assert exchange is not None
    exchange.on_request_taken(1000)  # as the upstream reports it: 500 still held
    assert client.resumes == 0
    exchange.on_request_taken(244)  # 256 left: the low watermark
    assert client.resumes == 1 and client.is_reading()


def test_client_is_paused_while_the_upstream_is_still_connecting(proxy: Proxy, loop: VirtualLoop) -> None:
    server, client = client_h1(proxy)  # no pooled connection: the proxy connects
    server.data_received(b"POST /u HTTP/1.1\r\nHost: users\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000)
    assert client.pauses == 1  # nothing was taken: 2000 bytes unacknowledged
    loop.settle()  # the connect finishes, the held body goes out
    assert len(loop.dialed) == 1
    assert loop.dialed[0].transport.take().endswith(b"content-length: 2000\r\n\r\n" + b"z" * 2000)
    assert client.resumes == 1 and client.is_reading()


# ---------------------------------------------------------------------- broken responses


def test_response_breaking_mid_body_aborts_the_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    upstream.lose()  # the upstream went away after 3 of 10 bytes
    assert client.data == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"  # nothing that looks complete
    assert client.aborted


def test_chunked_response_breaking_mid_body_never_gets_a_last_chunk(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\r\nabc")  # until close, sent chunked
    conn.data_received(b"def")
    conn.connection_lost(ConnectionResetError())  # a reset is not an orderly end
    assert client.data == (b"HTTP/1.1 200 OK\r\ncontent-type: a/b\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n3\r\ndef\r\n")
    assert client.aborted


def test_eof_inside_a_content_length_response_aborts_the_client(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, _ = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.eof_received()
    assert client.aborted
    assert client.data.endswith(b"\r\n\r\nabc")


def test_client_gone_mid_response_closes_the_upstream(proxy: Proxy) -> None:
    server, client = client_h1(proxy)
    conn, upstream = pooled_h1(proxy)
    server.data_received(b"GET / HTTP/1.1\r\nHost: users\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.lose()
    assert upstream.aborted
    assert proxy.upstreams.h1.stats()["idle"] == 0
