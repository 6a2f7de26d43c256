"""turnout's validation layer over both HTTP/1.1 codecs (``dataplane/http1/semantics.py``).

Every head goes through ``check_head`` and ``read_request`` / ``read_response`` with httptools **and** h11
(``make_codec``), so the two codecs are shown to end in the same decision, status and cause
(when a codec refuses a head, turnout's rules applied to its own reading of it name the
problem):

* ``plan_request``: body framing (Content-Length, chunked, both, two lengths, codings that
  do not end in chunked, HTTP/1.0 with Transfer-Encoding), Host rules (missing, repeated,
  invalid, absolute-form authority winning and Host rewritten), hop-by-hop fields and the
  fields ``Connection`` names removed (``Connection: host`` refused), ``Expect``
  (100-continue relayed on HTTP/1.1, ignored on 1.0, anything else 417), WebSocket upgrade
  detection, keep-alive by version, and ``by_name`` only when no name repeats;
* ``plan_response``: status and reason, Content-Length/Transfer-Encoding conflicts (502),
  no body after HEAD, 204, 304 and 1xx, until-close bodies, keep-alive, and ``block``
  being exactly the forwarded fields serialized.
"""

from __future__ import annotations

import pytest

from dataplane.errors import HttpError
from dataplane.http1.codec import HeadCodec, make_codec
from dataplane.http1.scan import check_head
from dataplane.http1.semantics import read_request, read_response
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, Request, Response, field_lines


@pytest.fixture(params=["httptools", "h11"])
def codec(request: pytest.FixtureRequest) -> HeadCodec:
    return make_codec(request.param, 64 * 1024)


def req(codec: HeadCodec, head: bytes) -> Request:
    return read_request(codec, check_head(head, 100, 8192))


def resp(codec: HeadCodec, head: bytes, method: bytes = b"GET") -> Response:
    return read_response(codec, check_head(head, 100, 8192, "response"), method)


def refused(fn: object, *args: object) -> HttpError:
    with pytest.raises(HttpError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


def head(start: bytes, *lines: bytes) -> bytes:
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


# ---------------------------------------------------------------------- request framing


def test_content_length_body(codec: HeadCodec) -> None:
    r = req(codec, head(b"POST /u HTTP/1.1", b"Host: a", b"Content-Length: 12"))
    assert (r.body, r.content_length) == (BODY_LENGTH, 12)
    assert r.fields == [(b"host", b"a")]  # content-length is the proxy's to write again


def test_zero_content_length_is_no_body(codec: HeadCodec) -> None:
    r = req(codec, head(b"POST /u HTTP/1.1", b"Host: a", b"Content-Length: 0"))
    assert (r.body, r.content_length) == (BODY_NONE, 0)


def test_no_framing_is_no_body(codec: HeadCodec) -> None:
    r = req(codec, head(b"POST /u HTTP/1.1", b"Host: a"))
    assert (r.body, r.content_length) == (BODY_NONE, 0)


def test_chunked_body(codec: HeadCodec) -> None:
    r = req(codec, head(b"POST /u HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked"))
    assert (r.body, r.content_length) == (BODY_CHUNKED, -1)
    assert r.fields == [(b"host", b"a")]


@pytest.mark.parametrize("lines", [
    (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
    (b"Content-Length: 5", b"Content-Length: 5"),  # even when they agree
    (b"Content-Length: 5", b"Content-Length: 6"),
    (b"Content-Length: 5, 5",),
    (b"Content-Length: -5",),
    (b"Content-Length: +5",),
    (b"Content-Length: 5x",),
    (b"Content-Length: 1000000000000000000",),  # 19 digits
    (b"Transfer-Encoding: gzip",),  # not ending in chunked: the length is unknowable
    (b"Transfer-Encoding: chunked, gzip",),
    (b"Transfer-Encoding: chunked, chunked",),
    (b"Transfer-Encoding: , chunked",),  # an empty element: llhttp reads chunked, h11 refuses
    (b"Transfer-Encoding: chunked,",),
    (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
])
def test_ambiguous_framing_is_refused(codec: HeadCodec, lines: tuple[bytes, ...]) -> None:
    error = refused(req, codec, head(b"POST /u HTTP/1.1", b"Host: a", *lines))
    assert (error.status, error.cause) == (400, "bad_framing")


def test_codings_before_chunked_are_not_implemented(codec: HeadCodec) -> None:
    error = refused(req, codec, head(b"POST /u HTTP/1.1", b"Host: a", b"Transfer-Encoding: gzip, chunked"))
    assert (error.status, error.cause) == (501, "unsupported_coding")


def test_whitespace_around_values_is_not_part_of_them(codec: HeadCodec) -> None:
    r = req(codec, head(b"POST /u HTTP/1.1", b"Host: a ", b"Content-Length:  5 ", b"X-A:\t a b \t"))
    assert (r.authority, r.body, r.content_length) == (b"a", BODY_LENGTH, 5)
    assert r.fields == [(b"host", b"a"), (b"x-a", b"a b")]


@pytest.mark.parametrize("method", [b"T", b"GETGT", b"get", b"Get", b"X-CUSTOM"])
def test_methods_turnout_does_not_know_are_501(codec: HeadCodec, method: bytes) -> None:
    error = refused(req, codec, head(method + b" / HTTP/1.1", b"Host: a"))
    assert (error.status, error.cause) == (501, "method_not_implemented")


@pytest.mark.parametrize("method", [b"PATCH", b"PROPFIND", b"PURGE", b"M-SEARCH", b"QUERY"])
def test_other_registered_methods_are_forwarded(codec: HeadCodec, method: bytes) -> None:
    assert req(codec, head(method + b" / HTTP/1.1", b"Host: a")).method == method


def test_transfer_encoding_in_http10_is_refused(codec: HeadCodec) -> None:
    error = refused(req, codec, head(b"POST /u HTTP/1.0", b"Host: a", b"Transfer-Encoding: chunked"))
    assert (error.status, error.cause) == (400, "bad_framing")


@pytest.mark.parametrize("target", [b"a:443", b"/x", b"*"])
def test_connect_is_not_supported(codec: HeadCodec, target: bytes) -> None:
    error = refused(req, codec, head(b"CONNECT " + target + b" HTTP/1.1", b"Host: a:443"))
    assert (error.status, error.cause) == (405, "method_not_allowed")


# ---------------------------------------------------------------------- Host


def test_missing_host_in_http11_is_refused(codec: HeadCodec) -> None:
    # h11 refuses these itself: turnout's rules still name the problem.
    for start in (b"GET / HTTP/1.1", b"GET http://other/p HTTP/1.1"):  # absolute-form too
        error = refused(req, codec, head(start))
        assert (error.status, error.cause) == (400, "bad_host")


def test_http10_may_omit_host(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET /p HTTP/1.0"))
    assert (r.authority, r.fields) == (b"", [])


def test_two_hosts_are_refused(codec: HeadCodec) -> None:
    for second in (b"Host: b", b"Host: a"):
        error = refused(req, codec, head(b"GET / HTTP/1.1", b"Host: a", second))
        assert (error.status, error.cause) == (400, "bad_host")


@pytest.mark.parametrize("value", [b"", b"a b", b"a/b", b"a@b", b"[::1", b"a:port"])
def test_invalid_host_is_refused(codec: HeadCodec, value: bytes) -> None:
    error = refused(req, codec, head(b"GET / HTTP/1.1", b"Host: " + value))
    assert (error.status, error.cause) == (400, "bad_host")


@pytest.mark.parametrize("value", [b"users", b"users.svc:8080", b"10.0.0.1:80", b"[::1]:8080", b"xn--n3h.example"])
def test_valid_hosts_become_the_authority(codec: HeadCodec, value: bytes) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: " + value))
    assert r.authority == value and r.fields == [(b"host", value)]


def test_absolute_form_authority_wins_and_host_is_rewritten(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET http://Other.Example:8080/p?q=1 HTTP/1.1", b"User-Agent: t", b"Host: a", b"X-B: 2"))
    assert r.target == b"/p?q=1"
    assert r.authority == b"other.example:8080"
    assert r.fields == [(b"user-agent", b"t"), (b"host", b"other.example:8080"), (b"x-b", b"2")]
    assert r.by_name is None  # not as parsed any more


def test_absolute_form_without_host_in_http10_adds_host(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET https://other HTTP/1.0"))
    assert (r.target, r.authority, r.fields) == (b"/", b"other", [(b"host", b"other")])


def test_absolute_form_query_without_path(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET http://other?x=1 HTTP/1.1", b"Host: other"))
    assert r.target == b"/?x=1"


@pytest.mark.parametrize("target", [b"ftp://other/p", b"http://user@other/p", b"http:///p", b"/p#frag",
                                    b"http://other/p#frag", b"p"])
def test_bad_targets_are_refused(codec: HeadCodec, target: bytes) -> None:
    assert refused(req, codec, head(b"GET " + target + b" HTTP/1.1", b"Host: other")).status == 400


def test_asterisk_form_for_options(codec: HeadCodec) -> None:
    r = req(codec, head(b"OPTIONS * HTTP/1.1", b"Host: a"))
    assert (r.method, r.target) == (b"OPTIONS", b"*")


# ---------------------------------------------------------------------- hop-by-hop


def test_hop_by_hop_fields_and_those_connection_names_are_removed(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: a", b"Connection: x-secret, keep-alive", b"Keep-Alive: timeout=5",
                        b"TE: trailers", b"Proxy-Connection: keep-alive", b"X-Secret: 1", b"Upgrade: h2c",
                        b"X-Kept: 2"))
    assert r.fields == [(b"host", b"a"), (b"x-kept", b"2")]
    assert not r.websocket


def test_connection_may_name_several_fields_in_several_lines(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: a", b"Connection: X-A", b"Connection: x-b ,x-c", b"X-A: 1",
                        b"X-B: 2", b"X-C: 3", b"X-D: 4"))
    assert r.fields == [(b"host", b"a"), (b"x-d", b"4")]


@pytest.mark.parametrize("name", [b"host", b"Host", b"content-length", b"transfer-encoding"])
def test_connection_naming_framing_or_host_is_refused(codec: HeadCodec, name: bytes) -> None:
    error = refused(req, codec, head(b"GET / HTTP/1.1", b"Host: a", b"Connection: close, " + name))
    assert (error.status, error.cause) == (400, "bad_connection")


# ---------------------------------------------------------------------- Expect


@pytest.mark.parametrize("value", [b"100-continue", b"100-Continue", b" 100-continue "])
def test_expect_100_continue_is_relayed_as_the_last_field(codec: HeadCodec, value: bytes) -> None:
    r = req(codec, head(b"PUT /u HTTP/1.1", b"Expect: " + value, b"Host: a", b"Content-Length: 3", b"X-A: 1"))
    assert r.expect_continue
    assert r.fields == [(b"host", b"a"), (b"x-a", b"1"), (b"expect", b"100-continue")]


def test_expect_100_continue_in_http10_is_ignored(codec: HeadCodec) -> None:
    r = req(codec, head(b"PUT /u HTTP/1.0", b"Expect: 100-continue", b"Host: a", b"Content-Length: 3"))
    assert not r.expect_continue
    assert r.fields == [(b"host", b"a")]


@pytest.mark.parametrize("value", [b"200-ok", b"100-continue, foo", b"foo"])
def test_other_expectations_fail_with_417(codec: HeadCodec, value: bytes) -> None:
    error = refused(req, codec, head(b"PUT /u HTTP/1.1", b"Host: a", b"Expect: " + value))
    assert (error.status, error.cause) == (417, "expectation_failed")


def test_repeated_expect_is_refused(codec: HeadCodec) -> None:
    error = refused(req, codec, head(b"PUT /u HTTP/1.1", b"Host: a", b"Expect: 100-continue",
                                     b"Expect: 100-continue"))
    assert error.status == 400


# ---------------------------------------------------------------------- WebSocket


def test_websocket_upgrade_is_detected_and_its_hop_fields_rebuilt(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET /chat HTTP/1.1", b"Host: a", b"Connection: keep-alive, Upgrade", b"Upgrade: WebSocket",
                        b"Sec-WebSocket-Key: k", b"Sec-WebSocket-Version: 13"))
    assert r.websocket
    assert r.fields == [(b"host", b"a"), (b"sec-websocket-key", b"k"), (b"sec-websocket-version", b"13"),
                        (b"connection", b"upgrade"), (b"upgrade", b"WebSocket")]


@pytest.mark.parametrize(("start", "lines"), [
    (b"POST /chat HTTP/1.1", (b"Connection: upgrade", b"Upgrade: websocket")),  # not GET
    (b"GET /chat HTTP/1.1", (b"Upgrade: websocket",)),  # Connection does not say upgrade
    (b"GET /chat HTTP/1.1", (b"Connection: upgrade", b"Upgrade: h2c")),  # not websocket
    (b"GET /chat HTTP/1.0", (b"Connection: upgrade", b"Upgrade: websocket")),  # not HTTP/1.1
])
def test_other_upgrades_are_plain_requests_without_upgrade_fields(codec: HeadCodec, start: bytes,
                                                                  lines: tuple[bytes, ...]) -> None:
    r = req(codec, head(start, b"Host: a", *lines))
    assert not r.websocket
    assert r.fields == [(b"host", b"a")]


# ---------------------------------------------------------------------- keep-alive and by_name


@pytest.mark.parametrize(("version", "connection", "keep_alive"), [
    (b"1.1", None, True), (b"1.1", b"close", False), (b"1.1", b"Close", False), (b"1.1", b"keep-alive", True),
    (b"1.0", None, False), (b"1.0", b"keep-alive", True), (b"1.0", b"Keep-Alive", True), (b"1.0", b"close", False),
])
def test_keep_alive_by_version(codec: HeadCodec, version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    lines = [b"Host: a"] + ([b"Connection: " + connection] if connection else [])
    r = req(codec, head(b"GET / HTTP/" + version, *lines))
    assert (r.version, r.keep_alive) == (version, keep_alive)
    assert b"connection" not in dict(r.fields)


def test_by_name_when_no_name_repeats_and_nothing_was_removed(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: a", b"Accept: */*", b"baggage: turnout-session=k"))
    assert r.by_name == {b"host": b"a", b"accept": b"*/*", b"baggage": b"turnout-session=k"}
    assert r.fields == [(b"host", b"a"), (b"accept", b"*/*"), (b"baggage", b"turnout-session=k")]


@pytest.mark.parametrize("lines", [
    (b"X-A: 1", b"X-A: 2"),  # a repeated name
    (b"Content-Length: 0",),  # a removed field
    (b"Connection: x-a", b"X-A: 1"),
])
def test_no_by_name_when_a_name_repeats_or_a_field_was_removed(codec: HeadCodec, lines: tuple[bytes, ...]) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: a", *lines))
    assert r.by_name is None


def test_repeated_fields_are_kept_in_order(codec: HeadCodec) -> None:
    r = req(codec, head(b"GET / HTTP/1.1", b"Host: a", b"X-A: 1", b"Accept: */*", b"x-a: 2"))
    assert r.fields == [(b"host", b"a"), (b"x-a", b"1"), (b"accept", b"*/*"), (b"x-a", b"2")]


# ---------------------------------------------------------------------- responses


def test_response_status_reason_and_fields(codec: HeadCodec) -> None:
    r = resp(codec, head(b"HTTP/1.1 404 Nope Not Here", b"Content-Length: 4", b"X-A: 1"))
    assert (r.status, r.reason) == (404, b"Nope Not Here")
    assert r.fields == [(b"content-length", b"4"), (b"x-a", b"1")]  # the length is passed on
    assert (r.body, r.content_length, r.keep_alive) == (BODY_LENGTH, 4, True)


def test_response_without_reason(codec: HeadCodec) -> None:
    r = resp(codec, head(b"HTTP/1.1 200 ", b"Content-Length: 0"))
    assert (r.status, r.reason, r.body) == (200, b"", BODY_NONE)


def test_chunked_response_drops_transfer_encoding(codec: HeadCodec) -> None:
    r = resp(codec, head(b"HTTP/1.1 201 Created", b"Transfer-Encoding: chunked", b"X-A: 1"))
    assert (r.body, r.content_length, r.fields) == (BODY_CHUNKED, -1, [(b"x-a", b"1")])


@pytest.mark.parametrize("lines", [
    (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
    (b"Content-Length: 5", b"Content-Length: 5"),
    (b"Content-Length: 5, 5",),
    (b"Content-Length: 5x",),
    (b"Transfer-Encoding: gzip",),
    (b"Transfer-Encoding: gzip, chunked",),
    (b"Transfer-Encoding: , chunked",),
])
def test_ambiguous_response_framing_is_a_502(codec: HeadCodec, lines: tuple[bytes, ...]) -> None:
    error = refused(resp, codec, head(b"HTTP/1.1 200 OK", *lines))
    assert (error.status, error.cause) == (502, "upstream_bad_framing")


@pytest.mark.parametrize("lines", [(), (b"Upgrade: h2c", b"Connection: upgrade")])
def test_101_without_upgrade_websocket_is_a_502(codec: HeadCodec, lines: tuple[bytes, ...]) -> None:
    error = refused(resp, codec, head(b"HTTP/1.1 101 Switching Protocols", *lines))
    assert (error.status, error.cause) == (502, "upstream_bad_head")


def test_whitespace_after_an_upstream_value_is_not_passed_on(codec: HeadCodec) -> None:
    r = resp(codec, head(b"HTTP/1.1 200 OK ", b"Content-Length:  2 ", b"X-A: a b "))
    assert (r.reason, r.content_length, r.fields) == (b"OK ", 2, [(b"content-length", b"2"), (b"x-a", b"a b")])


@pytest.mark.parametrize(("start", "method"), [
    (b"HTTP/1.1 200 OK", b"HEAD"), (b"HTTP/1.1 204 No Content", b"GET"), (b"HTTP/1.1 304 Not Modified", b"GET"),
    (b"HTTP/1.1 100 Continue", b"POST"), (b"HTTP/1.1 103 Early Hints", b"GET"),
])
def test_heads_that_never_have_a_body(codec: HeadCodec, start: bytes, method: bytes) -> None:
    bare = resp(codec, head(start), method)
    assert bare.body == BODY_NONE and bare.keep_alive  # not read until close
    if method == b"HEAD" or start.startswith(b"HTTP/1.1 304"):
        with_length = resp(codec, head(start, b"Content-Length: 7"), method)
        assert with_length.body == BODY_NONE
        assert with_length.fields == [(b"content-length", b"7")]  # what a GET would have had


def test_until_close_body_ends_the_connection(codec: HeadCodec) -> None:
    r = resp(codec, head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain"))
    assert (r.body, r.content_length, r.keep_alive) == (BODY_UNTIL_CLOSE, -1, False)


@pytest.mark.parametrize(("start", "lines", "keep_alive"), [
    (b"HTTP/1.1 200 OK", (), True), (b"HTTP/1.1 200 OK", (b"Connection: close",), False),
    (b"HTTP/1.0 200 OK", (), False), (b"HTTP/1.0 200 OK", (b"Connection: keep-alive",), True),
])
def test_response_keep_alive_by_version(codec: HeadCodec, start: bytes, lines: tuple[bytes, ...],
                                        keep_alive: bool) -> None:
    r = resp(codec, head(start, b"Content-Length: 1", *lines))
    assert r.keep_alive is keep_alive
    assert r.fields == [(b"content-length", b"1")]


@pytest.mark.parametrize("lines", [
    (b"Content-Length: 2", b"X-A: 1", b"Set-Cookie: a=1", b"Set-Cookie: b=2"),
    (b"Transfer-Encoding: chunked", b"X-A: 1"),
    (b"X-Z: 0", b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"Content-Length: 0", b"X-A: 1"),
    (b"Connection: X-Private", b"X-Private: s", b"Content-Length: 0", b"Upgrade: h2c", b"X-A: 1"),
])
def test_block_is_exactly_the_forwarded_fields(codec: HeadCodec, lines: tuple[bytes, ...]) -> None:
    r = resp(codec, head(b"HTTP/1.1 200 OK", *lines))
    assert r.block == field_lines(r.fields)
    names = [n for n, _ in r.fields]
    assert not {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"x-private"} & set(names)
    assert b"x-a" in names
