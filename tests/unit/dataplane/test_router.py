"""The router without sockets: request objects in, the decisions it makes out.

A real ``Router`` and runtime over a fake upstream side (carriers and streams that record
what they are told) and a fake downstream (which records what the client would get). The
tests drive the upstream callbacks by hand, so every branch of the attempt policy runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from dataplane.config import parse_config
from dataplane.message import BODY_LENGTH, BODY_NONE, NO_FIELDS, Fields, Request, Response, field_lines
from dataplane.metrics import Metrics
from dataplane.outlier import OutlierDetector
from dataplane.router import CUT, FAIL, FALLBACK, RETRY, Downstream, Exchange, Router, listener_plan, next_step
from dataplane.runtime import build_runtime
from dataplane.upstream import (
    NOT_CONNECTED,
    REFUSED,
    SENT,
    STALE,
    STARTED,
    Carrier,
    UpstreamError,
    UpstreamListener,
    UpstreamStream,
)
from dataplane.upstreams import Upstreams
from filters import Address, RequestHead

BASELINE = "10.0.0.1:80"
SANDBOX = "10.0.0.2:80"


# ------------------------------------------------------------------ fakes


class FakeStream(UpstreamStream):
    """Records what the exchange sends on it."""

    def __init__(self, carrier: FakeCarrier, listener: UpstreamListener, request: Request, fields: Fields,
                 extra: Fields, length: int) -> None:
        self.carrier = carrier
        self.listener = listener
        self.request = request
        self.fields = fields
        self.extra = extra
        self.length = length
        self.data: list[tuple[bytes, int]] = []
        self.ended: Fields | None = None
        self.acked = 0
        self.cancelled = False
        self.finished = False

    def send_data(self, data: bytes, flow_len: int) -> None:
        self.data.append((data, flow_len))

    def send_end(self, trailers: Fields) -> None:
        self.ended = trailers

    def acknowledge(self, flow_len: int) -> None:
        self.acked += flow_len

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self) -> None:
        self.finished = True


class FakeCarrier:
    """A connection with room for one request."""

    def __init__(self, address: Address, http2: bool) -> None:
        self.address = address
        self.http2 = http2
        self.key = (address.host, address.port)
        self.stream: FakeStream | None = None
        self.released = False

    def open_stream(self, listener: UpstreamListener, request: Request, fields: Fields, extra: Fields,
                    extra_lines: bytes, length: int) -> UpstreamStream:
        assert extra_lines == field_lines(extra)
        self.stream = FakeStream(self, listener, request, fields, extra, length)
        return self.stream

    def release(self) -> None:
        self.released = True


class FakeUpstreams(Upstreams):
    """Pooled carriers on demand; connects that succeed, fail, or wait for the test (no pools:
    ``Upstreams.__init__`` is not called)."""

    def __init__(self) -> None:
        self.outliers = OutlierDetector(consecutive_failures=3, base_ejection_s=10.0, max_ejection_s=300.0)
        self.pooled: set[str] = set()  # "host:port" with an idle pooled connection
        self.failing: dict[str, UpstreamError] = {}  # "host:port" -> what connecting raises
        self.gate: asyncio.Event | None = None  # connects wait for it when set
        self.carriers: list[FakeCarrier] = []
        self.acquired: list[str] = []
        self.connected: list[str] = []

    def acquire(self, address: Address, http2: bool) -> Carrier | None:
        self.acquired.append(str(address))
        if str(address) not in self.pooled:
            return None
        carrier = FakeCarrier(address, http2)
        self.carriers.append(carrier)
        return carrier

    async def connect(self, address: Address, http2: bool) -> Carrier:
        self.connected.append(str(address))
        if self.gate is not None:
            await self.gate.wait()
        error = self.failing.get(str(address))
        if error is not None:
            raise error
        carrier = FakeCarrier(address, http2)
        self.carriers.append(carrier)
        return carrier

    def streams(self) -> list[FakeStream]:
        return [c.stream for c in self.carriers if c.stream is not None]


class FakeDownstream(Downstream):
    """Records what the client would be sent."""

    def __init__(self, router: Router, tls: bool = False) -> None:
        self.peer = b"192.0.2.7"
        self.listener = router.runtime.config.listeners[0]
        self.forwarded = [(b"x-forwarded-for", self.peer), (b"x-forwarded-proto", b"https" if tls else b"http")]
        self.forwarded_lines = field_lines(self.forwarded)
        self.fixed_target, self.upstream_choice = listener_plan(self.listener)
        self.exchange: Exchange | None = None
        self.armed: list[float] = []
        self.acked = 0
        self.informational: list[int] = []
        self.head: Response | None = None
        self.extra: Fields = []
        self.body = b""
        self.end: Fields | None = None
        self.was_reset = False

    def arm(self, seconds: float) -> None:
        self.armed.append(seconds)

    def acknowledge(self, flow_len: int) -> None:
        self.acked += flow_len

    def send_informational(self, status: int) -> None:
        self.informational.append(status)

    def send_head(self, head: Response, extra: Fields) -> None:
        self.head = head
        self.extra = extra

    def send_response(self, head: Response, extra: Fields, body: bytes) -> None:
        self.head = head
        self.extra = extra
        self.body = body
        self.end = NO_FIELDS

    def send_data(self, data: bytes, flow_len: int) -> None:
        self.body += data
        if self.exchange is not None:
            self.exchange.response_taken(flow_len)

    def send_end(self, trailers: Fields) -> None:
        self.end = trailers

    def reset(self) -> None:
        self.was_reset = True

    def field(self, name: bytes) -> bytes | None:
        assert self.head is not None
        for n, v in [*self.head.fields, *self.extra]:
            if n == name:
                return v
        return None


CONFIG: dict[str, Any] = {
    "routing": {"debug_headers": True, "key_sources": [{"from": "baggage", "names": ["turnout-session"]},
                                                       {"from": "query", "names": ["turnout-session"]}]},
    "listeners": [{"name": "in", "address": "127.0.0.1:15001", "mode": "inbound", "service": "users",
                   "baseline": BASELINE}],
    "sessions": [
        {"id": "s1", "key": "k1", "routes": [{"service": "users", "destination": SANDBOX}]},
        {"id": "s-err", "key": "kerr", "routes": [{"service": "users", "destination": "10.0.0.3:80",
                                                   "fallback": "error"}]},
        {"id": "s-h2", "key": "kh2", "routes": [{"service": "users", "destination": "10.0.0.4:80",
                                                 "upstream_protocol": "http2"}]},
        {"id": "m1", "key": "km", "routes": [{"service": "users", "destination": "10.0.0.5:80", "mode": "mirror"}]},
    ],
}


class World:
    """A router over fakes, and the loop its background connects run on."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        proxy_config = parse_config(config or CONFIG)
        runtime = build_runtime(proxy_config, proxy_config.snapshot, "h11", "test")
        self.upstreams = FakeUpstreams()
        self.metrics = Metrics("0")
        self.router = Router(runtime, self.upstreams, self.metrics, self.loop)

    def request(self, *fields: tuple[bytes, bytes], method: bytes = b"GET", target: bytes = b"/x",
                body: int = BODY_NONE, length: int = 0, http2: bool = False, grpc: bool = False) -> Request:
        all_fields = [(b"host", b"users"), *fields]
        by_name = dict(all_fields)
        request = Request(method, target, b"2" if http2 else b"1.1", b"users", all_fields, body, length, True,
                          False, False, by_name if len(by_name) == len(all_fields) else None)
        request.http2 = http2
        request.grpc = grpc
        return request

    def start(self, request: Request, downstream: FakeDownstream | None = None) -> tuple[Exchange, FakeDownstream]:
        down = downstream or FakeDownstream(self.router)
        exchange = self.router.handle(down, request)
        assert exchange is not None
        down.exchange = exchange
        exchange.begin()
        self.settle()
        return exchange, down

    def settle(self) -> None:
        """Let background connects run."""
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def exposition(self) -> str:
        return self.metrics.exposition().decode()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    w.upstreams.pooled = {BASELINE, SANDBOX}
    yield w
    w.loop.close()


def ok(body: bytes = b"hi") -> Response:
    return Response(200, b"OK", [(b"content-length", b"%d" % len(body))], BODY_LENGTH, len(body))


def key(value: str) -> tuple[bytes, bytes]:
    return (b"baggage", b"turnout-session=" + value.encode())


# ------------------------------------------------------------------ the attempt policy


@pytest.mark.parametrize(("phase", "idempotent", "replayable", "retried", "can_fallback", "step"), [
    (STARTED, True, True, False, True, CUT),  # never a well-formed short response
    (NOT_CONNECTED, True, False, False, True, FAIL),  # body handed over: nothing can be sent again
    (REFUSED, False, True, False, True, RETRY),  # refused unprocessed: any method, same destination
    (REFUSED, False, True, True, True, FALLBACK),
    (REFUSED, False, True, True, False, FAIL),
    (STALE, True, True, False, True, RETRY),  # a stale keep-alive connection: idempotent only
    (STALE, False, True, False, False, FAIL),
    (NOT_CONNECTED, False, True, False, True, FALLBACK),  # nothing reached the sandbox: any method
    (NOT_CONNECTED, False, True, False, False, FAIL),
    (SENT, True, True, False, True, FALLBACK),  # may have been processed: only an idempotent one
    (SENT, False, True, False, True, FAIL),
])
def test_next_step(phase: int, idempotent: bool, replayable: bool, retried: bool, can_fallback: bool,
                   step: int) -> None:
    assert next_step(phase, idempotent=idempotent, replayable=replayable, retried=retried,
                     can_fallback=can_fallback) == step


# ------------------------------------------------------------------ the decision and the head


def test_routes_by_key_and_forwards_the_head_as_received(world: World) -> None:
    request = world.request(key("k1"), (b"accept", b"*/*"))
    exchange, down = world.start(request)
    (stream,) = world.upstreams.streams()
    assert stream.carrier.key == ("10.0.0.2", 80) and not stream.carrier.http2
    assert stream.fields is request.fields  # the common case forwards the parsed list itself
    assert stream.extra == down.forwarded
    assert stream.length == 0
    exchange.on_response(ok(), b"hi")
    assert down.head is not None and down.head.status == 200 and down.body == b"hi"
    assert down.field(b"x-turnout-route") == b"s1"
    assert stream.finished and exchange.finished
    assert 'turnout_requests_total{route="sandbox",service="users",status_class="2xx",worker="0"} 1.0' in \
        world.exposition()


def test_unknown_key_goes_to_baseline(world: World) -> None:
    exchange, down = world.start(world.request(key("nope")))
    (stream,) = world.upstreams.streams()
    assert stream.carrier.key == ("10.0.0.1", 80)
    exchange.on_response(ok(), b"hi")
    assert down.field(b"x-turnout-route") == b"baseline" and down.field(b"x-turnout-fallback") is None


def test_forwarded_for_is_appended_and_a_key_from_the_query_propagated_in_baggage(world: World) -> None:
    request = world.request((b"x-forwarded-for", b"203.0.113.1"), (b"baggage", b"a=b"), target=b"/x?turnout-session=k1")
    world.start(request, FakeDownstream(world.router, tls=True))
    (stream,) = world.upstreams.streams()
    assert stream.carrier.key == ("10.0.0.2", 80)
    assert (b"x-forwarded-for", b"203.0.113.1") not in stream.fields
    assert (b"baggage", b"a=b,turnout-session=k1") in stream.fields
    assert stream.extra == [(b"x-forwarded-for", b"203.0.113.1, 192.0.2.7"), (b"x-forwarded-proto", b"https")]


@pytest.mark.parametrize(("listener", "route_key", "http2_client", "grpc", "expected"), [
    (None, "k1", True, False, False),  # the default: HTTP/1.1 towards upstreams
    (None, "k1", False, True, True),  # gRPC always HTTP/2
    (None, "kh2", False, False, True),  # the route says http2
    ("http2", "k1", False, False, True),  # a route without one follows its listener
    ("http2", "nope", False, False, True),  # so does baseline
    ("auto", "k1", True, False, True),  # the client's protocol
    ("auto", "k1", False, False, False),
])
def test_which_protocol_goes_upstream(listener: str | None, route_key: str, http2_client: bool, grpc: bool,
                                      expected: bool) -> None:
    config = {**CONFIG, "listeners": [{**CONFIG["listeners"][0],
                                       **({"upstream_protocol": listener} if listener else {})}]}
    w = World(config)
    w.upstreams.pooled = {BASELINE, SANDBOX, "10.0.0.4:80"}
    try:
        w.start(w.request(key(route_key), http2=http2_client, grpc=grpc))
        (stream,) = w.upstreams.streams()
        assert stream.carrier.http2 is expected
    finally:
        w.loop.close()


# ------------------------------------------------------------------ failures


def test_a_sandbox_that_refuses_connections_falls_back_to_baseline_visibly(world: World) -> None:
    world.upstreams.pooled = {BASELINE}
    world.upstreams.failing[SANDBOX] = UpstreamError(503, "connect failed", "connect_failed", NOT_CONNECTED)
    exchange, down = world.start(world.request(key("k1"), method=b"POST"))
    (stream,) = world.upstreams.streams()
    assert stream.carrier.key == ("10.0.0.1", 80)  # re-sent to baseline: nothing reached the sandbox
    exchange.on_response(ok(), b"hi")
    assert down.field(b"x-turnout-route") == b"baseline"
    assert down.field(b"x-turnout-fallback") == b"s1; cause=connect_failed"
    metrics = world.exposition()
    assert 'turnout_fallbacks_total{cause="connect_failed",service="users",worker="0"} 1.0' in metrics
    assert 'turnout_upstream_errors_total{cause="connect_failed",route="sandbox",service="users",worker="0"} 1.0' \
        in metrics


def test_fallback_error_answers_503_naming_the_session_and_the_cause(world: World) -> None:
    world.upstreams.failing["10.0.0.3:80"] = UpstreamError(503, "connect to 10.0.0.3:80 failed", "connect_failed",
                                                           NOT_CONNECTED)
    exchange, down = world.start(world.request(key("kerr")))
    assert world.upstreams.streams() == []
    assert down.head is not None and down.head.status == 503
    assert down.field(b"x-turnout-error") == b"connect_failed; session=s-err"
    assert down.body == b"connect to 10.0.0.3:80 failed\n"
    assert exchange.finished and exchange.status == 503


def test_grpc_callers_get_a_trailers_only_unavailable(world: World) -> None:
    world.upstreams.failing["10.0.0.3:80"] = UpstreamError(503, "down", "connect_failed", NOT_CONNECTED)
    exchange, down = world.start(world.request(key("kerr"), http2=True, grpc=True))
    assert down.head is not None and down.head.status == 200 and down.head.body == BODY_NONE
    assert down.field(b"grpc-status") == b"14" and down.field(b"content-type") == b"application/grpc"
    assert down.end == NO_FIELDS and down.body == b""
    assert exchange.grpc_status == b"14"


def test_a_stale_keep_alive_connection_is_retried_once_for_get_on_a_new_connection(world: World) -> None:
    exchange, down = world.start(world.request(key("nope")))
    (first,) = world.upstreams.streams()
    exchange.on_upstream_error(UpstreamError(502, "upstream closed", "upstream_reset", STALE))
    world.settle()
    assert first.cancelled
    assert world.upstreams.connected == [BASELINE]  # a fresh connection, not the next pooled one
    second = world.upstreams.streams()[-1]
    assert second is not first
    second.listener.on_upstream_error(UpstreamError(502, "upstream closed", "upstream_reset", STALE))
    world.settle()
    assert down.head is not None and down.head.status == 502  # only once


def test_a_stale_connection_is_not_retried_for_post(world: World) -> None:
    exchange, down = world.start(world.request(key("nope"), method=b"POST"))
    exchange.on_upstream_error(UpstreamError(502, "upstream closed", "upstream_reset", STALE))
    world.settle()
    assert world.upstreams.connected == []
    assert down.head is not None and down.head.status == 502 and down.field(b"x-turnout-error") == b"upstream_reset"


def test_a_response_that_breaks_is_cut_off(world: World) -> None:
    exchange, down = world.start(world.request(key("k1")))
    exchange.on_response_head(Response(200, b"OK", [(b"content-length", b"10")], BODY_LENGTH, 10))
    exchange.on_response_data(b"12345", 5)
    exchange.on_upstream_error(UpstreamError(502, "upstream closed mid-response", "upstream_reset", STARTED))
    assert down.was_reset and down.end is None
    assert exchange.finished


def test_a_timeout_ejects_the_sandbox_and_later_requests_skip_it(world: World) -> None:
    exchange, down = world.start(world.request(key("k1")))
    exchange.timed_out()
    sandbox_stream, baseline_stream = world.upstreams.streams()
    assert sandbox_stream.cancelled and baseline_stream.carrier.key == ("10.0.0.1", 80)  # GET: replayed
    baseline_stream.listener.on_response(ok(), b"hi")
    assert down.field(b"x-turnout-fallback") == b"s1; cause=upstream_timeout"
    world.upstreams.acquired.clear()
    _later, later_down = world.start(world.request(key("k1")))
    assert world.upstreams.acquired == [BASELINE]  # the ejected sandbox was not tried at all
    world.upstreams.streams()[-1].listener.on_response(ok(), b"hi")
    assert later_down.field(b"x-turnout-fallback") == b"s1; cause=sandbox_ejected"
    assert 'turnout_outlier_ejections_total{service="users",worker="0"} 1.0' in world.exposition()


def test_a_post_whose_body_went_out_is_never_sent_twice(world: World) -> None:
    request = world.request(key("k1"), method=b"POST", body=BODY_LENGTH, length=4)
    exchange, down = world.start(request)
    exchange.on_request_data(b"abcd", 4)
    exchange.on_request_end(NO_FIELDS)
    exchange.timed_out()
    assert len(world.upstreams.streams()) == 1
    assert down.head is not None and down.head.status == 504
    assert down.field(b"x-turnout-error") == b"upstream_timeout; session=s1"


def test_the_body_waits_unacknowledged_while_connecting(world: World) -> None:
    world.upstreams.pooled = set()
    world.upstreams.gate = asyncio.Event()
    request = world.request(key("k1"), method=b"PUT", body=BODY_LENGTH, length=10)
    exchange, down = world.start(request)
    exchange.on_request_data(b"hello", 5)
    assert down.acked == 0 and world.upstreams.streams() == []  # held: the client is not told to send more
    exchange.on_request_data(b"world", 5)
    exchange.on_request_end(NO_FIELDS)
    world.upstreams.gate.set()
    world.settle()
    (stream,) = world.upstreams.streams()
    assert stream.length == 10 and stream.data == [(b"hello", 5), (b"world", 5)] and stream.ended == NO_FIELDS
    stream.listener.on_request_taken(10)
    assert down.acked == 10


def test_response_bytes_are_acknowledged_once_the_client_took_them(world: World) -> None:
    exchange, down = world.start(world.request(key("k1")))
    (stream,) = world.upstreams.streams()
    exchange.on_response_head(Response(200, b"OK", [], 2, -1))
    exchange.on_response_data(b"x" * 100, 100)
    assert stream.acked == 100
    exchange.on_response_end([(b"x-checksum", b"1")])
    assert down.end == [(b"x-checksum", b"1")] and stream.finished


def test_an_unroutable_authority_is_answered_400_before_routing() -> None:
    config = {**CONFIG, "listeners": [{"name": "out", "address": "127.0.0.1:15002", "mode": "outbound"}]}
    w = World(config)
    try:
        down = FakeDownstream(w.router)
        down.fixed_target = None  # an outbound listener routes by authority
        request = w.request()
        request.authority = b"bad host"
        assert w.router.handle(down, request) is None
        assert down.head is not None and down.head.status == 400
        assert down.field(b"x-turnout-error") == b"bad_authority"
    finally:
        w.loop.close()


def test_a_mirror_copies_the_request_and_baseline_answers(world: World) -> None:
    world.upstreams.pooled = {BASELINE, "10.0.0.5:80"}
    request = world.request(key("km"), method=b"POST", body=BODY_LENGTH, length=3)
    exchange, down = world.start(request)
    exchange.on_request_data(b"abc", 3)
    exchange.on_request_end(NO_FIELDS)
    world.settle()
    answer, copy = world.upstreams.streams()
    assert answer.carrier.key == ("10.0.0.1", 80)
    assert copy.carrier.key == ("10.0.0.5", 80) and copy.data == [(b"abc", 0)] and copy.length == 3
    assert copy.extra[-1] == (b"x-turnout-mirror", b"m1")
    copy.listener.on_response(ok(), b"ignored")
    answer.listener.on_response(ok(), b"hi")
    assert down.body == b"hi"
    assert 'turnout_mirror_requests_total{result="sent",worker="0"} 1.0' in world.exposition()


# ------------------------------------------------------------------ tunnel routes (docs/remocal.md)

TUNNEL_CONFIG: dict[str, Any] = {
    **CONFIG,
    "sessions": [
        {"id": "t-fb", "key": "ktfb", "routes": [{"service": "users", "destination": "tunnel"}]},
        {"id": "t-err", "key": "kterr", "routes": [{"service": "users", "destination": "tunnel",
                                                    "fallback": "error"}]},
        {"id": "t-mirror", "key": "ktm", "routes": [{"service": "users", "destination": "tunnel", "mode": "mirror"}]},
        {"id": "t-up", "key": "ktup", "routes": [{"service": "users", "destination": SANDBOX,
                                                  "tunnel": "t-1 on gateway gw"}]},
    ],
}


@pytest.fixture
def tunnels() -> Iterator[World]:
    w = World(TUNNEL_CONFIG)
    w.upstreams.pooled = {BASELINE, SANDBOX}
    yield w
    w.loop.close()


def test_a_tunnel_route_without_a_tunnel_falls_back_to_baseline_at_once(tunnels: World) -> None:
    exchange, down = tunnels.start(tunnels.request(key("ktfb")))
    assert tunnels.upstreams.acquired == [BASELINE], "nothing is dialled for the missing local process"
    exchange.on_response(ok(), b"hi")
    assert down.field(b"x-turnout-fallback") == b"t-fb; cause=tunnel_disconnected"
    assert 'turnout_fallbacks_total{cause="tunnel_disconnected",service="users",worker="0"} 1.0' \
        in tunnels.exposition()


def test_a_tunnel_route_with_fallback_error_answers_503_local_process_disconnected(tunnels: World) -> None:
    _exchange, down = tunnels.start(tunnels.request(key("kterr")))
    assert tunnels.upstreams.acquired == []
    assert down.head is not None and down.head.status == 503
    assert down.field(b"x-turnout-error") == b"tunnel_disconnected; session=t-err"
    assert b"local process disconnected" in down.body and b"t-err" in down.body
    _, grpc_down = tunnels.start(tunnels.request(key("kterr"), http2=True, grpc=True))
    assert grpc_down.field(b"grpc-status") == b"14"
    assert b"local process disconnected" in (grpc_down.field(b"grpc-message") or b"")


def test_a_mirror_to_a_missing_tunnel_copies_nothing_and_baseline_answers(tunnels: World) -> None:
    exchange, _down = tunnels.start(tunnels.request(key("ktm")))
    assert tunnels.upstreams.acquired == [BASELINE] and exchange.mirror is None
    assert 'turnout_mirror_requests_total{result="dropped_tunnel_disconnected",worker="0"} 1.0' \
        in tunnels.exposition()


def test_an_attached_tunnel_route_goes_to_the_gateway_like_any_sandbox(tunnels: World) -> None:
    exchange, _down = tunnels.start(tunnels.request(key("ktup")))
    assert tunnels.upstreams.acquired == [SANDBOX]
    assert exchange.decision.tunnel == "t-1 on gateway gw"
    assert tunnels.router.runtime.snapshot.explain("users", RequestHead.from_pairs(
        "GET", "/", [("baggage", "turnout-session=ktup")]), 0)["decision"]["tunnel"] == "t-1 on gateway gw"
