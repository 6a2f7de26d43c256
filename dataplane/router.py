"""The router: everything between a parsed request and an upstream, once for every protocol.

Both servers hand the router a protocol-neutral ``Request`` and a ``Downstream`` to answer
through; the router makes one ``Exchange`` per request, which

* decides where the request goes (``Snapshot.decide`` on the runtime current when it
  arrived, which it keeps to the end);
* builds the head sent upstream: the client's fields as forwarded, then the proxy's own
  (``x-forwarded-for``, ``x-forwarded-proto``, the routing key copied into ``baggage``);
* sends it through the one upstream interface (``upstream.py``) over HTTP/1.1 or HTTP/2,
  as the route and listener say;
* decides what to do when an attempt fails (``next_step``: retry when safe, fall back to
  baseline, answer an error, or cut a broken response off), with passive outlier detection
  so a sandbox that keeps failing is skipped for a while;
* answers errors it makes itself the same way for both protocols (``local_response``;
  gRPC callers get trailers-only replies);
* starts a mirrored copy, enforces timeouts and ``grpc-timeout``, and records the finished
  request for metrics, the access log and tracing.

The servers only validate and serialize.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import mypyc_attr

from dataplane.http2.grpc import GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, parse_grpc_timeout, trailers_only
from dataplane.message import BODY_LENGTH, BODY_NONE, NO_FIELDS, Fields, Request, Response, field_lines
from dataplane.mirror import MirrorManager
from dataplane.upstream import (
    NOT_CONNECTED,
    REFUSED,
    SENT,
    STALE,
    STARTED,
    UpstreamError,
    UpstreamListener,
    UpstreamStream,
)
from filters import RequestHead
from filters.head import joined_fields

if TYPE_CHECKING:
    from dataplane.config import Listener
    from dataplane.metrics import Metrics
    from dataplane.mirror import MirrorCopy
    from dataplane.runtime import Runtime
    from dataplane.upstream import Carrier
    from dataplane.upstreams import Upstreams
    from filters import Address, Decision

# Methods a request may be sent twice with (RFC 9110 §9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# What to do after a failed attempt.
RETRY, FALLBACK, FAIL, CUT = range(4)
# How an attempt is carried upstream, per listener and route (Listener.upstream_protocol).
_HTTP1, _HTTP2, _AUTO = range(3)
_PROTOCOLS: Final = {"http1": _HTTP1, "http2": _HTTP2, "auto": _AUTO}
_TEXT_PLAIN: Final = b"text/plain; charset=utf-8"
# Failures that count against a sandbox for outlier detection: not a stale pooled
# connection (the retry decides), not a client that went away.
_TIMEOUTS: Final = frozenset({"upstream_timeout", "connect_timeout"})


def next_step(phase: int, *, idempotent: bool, replayable: bool, retried: bool, can_fallback: bool) -> int:
    """What follows a failed attempt.

    ``phase`` says how far the attempt got (``upstream.NOT_CONNECTED`` … ``STARTED``);
    ``replayable``: no request body byte was handed to the failed upstream, so the request
    can be sent whole again; ``can_fallback``: a sandbox route with ``fallback: baseline``
    not yet used. A request the upstream may have processed is sent again only when its
    method is idempotent; a broken response is never turned into a well-formed short one.
    """
    if phase == STARTED:
        return CUT
    if not replayable:
        return FAIL
    if not retried and (phase == REFUSED or (phase == STALE and idempotent)):
        return RETRY  # the same destination, on a new connection
    if can_fallback and (phase <= REFUSED or idempotent):
        return FALLBACK
    return FAIL


def local_response(status: int, reason: str, cause: str, session: str | None = None) -> tuple[Response, bytes]:
    """An error turnout answers itself: the reason as text and ``x-turnout-error`` naming the
    cause (and the session whose sandbox failed)."""
    body = reason.encode("utf-8", "replace") + b"\n"
    error = cause if session is None else cause + "; session=" + session
    fields: Fields = [(b"content-type", _TEXT_PLAIN), (b"content-length", b"%d" % len(body)),
                      (b"x-turnout-error", error.encode("latin-1", "replace"))]
    return Response(status, b"", fields, BODY_LENGTH, len(body)), body


def grpc_local_response(code: bytes, reason: str, cause: str, session: str | None = None) -> Response:
    """A gRPC error turnout answers itself: a trailers-only reply (one HEADERS frame)."""
    message = reason if session is None else reason + " (session " + session + ")"
    error = cause if session is None else cause + "; session=" + session
    return Response(200, b"", trailers_only(code, message, error.encode("latin-1", "replace")), BODY_NONE, -1)


# Test doubles subclass it (a downstream that records what the client would get).
@mypyc_attr(allow_interpreted_subclasses=True)
class Downstream:
    """The client side of an exchange: what the router answers through. An HTTP/1.1
    connection (one exchange at a time) or one HTTP/2 stream."""

    peer: bytes  # the client's address, for x-forwarded-for
    listener: Listener
    # (x-forwarded-for, the client's address), (x-forwarded-proto, http|https): the proxy's
    # own fields for a request that brings neither; the same for every request of a connection,
    # so their HTTP/1.1 form is made once too.
    forwarded: Fields
    forwarded_lines: bytes
    # Decided once per connection from its listener (see ``listener_plan``): the service and
    # baseline of an inbound listener (None: by authority), and how its upstreams are spoken to.
    fixed_target: tuple[str, Address] | None
    upstream_choice: int

    def arm(self, seconds: float) -> None:
        """Call the exchange's ``timed_out`` in ``seconds`` unless armed again before."""
        raise NotImplementedError

    def acknowledge(self, flow_len: int) -> None:
        """Request bytes the exchange was given are on their way upstream: read more."""
        raise NotImplementedError

    def send_informational(self, status: int) -> None:
        """An interim response (``100 Continue``)."""
        raise NotImplementedError

    def send_head(self, head: Response, extra: Fields) -> None:
        """The response head, then ``extra`` (debug) fields; body and end follow, unless
        ``head.body`` is ``BODY_NONE`` (then ``send_end`` still closes the exchange)."""
        raise NotImplementedError

    def send_response(self, head: Response, extra: Fields, body: bytes) -> None:
        """A whole response at once; the exchange is over. The client's taking ``body`` is
        reported through ``response_taken`` like any data."""
        raise NotImplementedError

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Response body bytes; ``response_taken(flow_len)`` once they are on their way."""
        raise NotImplementedError

    def send_end(self, trailers: Fields) -> None:
        """The response is complete; the exchange is over."""
        raise NotImplementedError

    def reset(self) -> None:
        """The response broke after it started: cut the client off; the exchange is over."""
        raise NotImplementedError


def listener_plan(listener: Listener) -> tuple[tuple[str, Address] | None, int]:
    """What a connection decides once from its listener: ``Downstream.fixed_target`` and
    ``Downstream.upstream_choice``."""
    fixed = listener.target("") if listener.mode == "inbound" else None
    return fixed, _PROTOCOLS[listener.upstream_protocol]


class Router:
    """One worker's router: the current runtime, its upstreams, metrics and mirrors."""

    def __init__(self, runtime: Runtime, upstreams: Upstreams, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime  # swapped whole by the worker; every exchange keeps the one it started with
        self.upstreams = upstreams
        self.metrics = metrics
        self.loop = loop
        self.clock: Callable[[], float] = time.perf_counter  # loop.time() on uvloop ticks in whole milliseconds
        self.wall_time: Callable[[], float] = time.time
        self.mirrors = MirrorManager(upstreams, metrics, loop, self.spawn)
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, downstream: Downstream, request: Request) -> Exchange | None:
        """Route a request: its exchange, to ``begin`` once the caller holds it; or None when
        it was answered at once (an authority the listener cannot route)."""
        rt = self.runtime
        authority = request.authority
        target = downstream.fixed_target
        if target is None:
            try:
                target = downstream.listener.target(authority.decode("latin-1").lower())
            except ValueError:
                self.reply(downstream, request, 400, "cannot route to authority "
                           + repr(authority.decode("latin-1")), "bad_authority")
                return None
        service, baseline = target
        if not authority:
            # HTTP/1.0 without Host: the upstream request is HTTP/1.1, which requires one.
            request.authority = authority = str(baseline).encode("latin-1")
            request.fields = [*request.fields, (b"host", authority)]
            request.by_name = None
        # The decision reads a few headers: they are decoded when read (``RequestHead.header``).
        by_name = request.by_name
        host = authority.decode("latin-1") if request.http2 else None
        if by_name is not None:
            head = RequestHead(request.method.decode("latin-1"), request.target.decode("latin-1"), raw=by_name,
                               host=host)
        else:
            fields = joined_fields(request.fields)
            if host is not None:
                fields["host"] = host
            head = RequestHead(request.method.decode("latin-1"), request.target.decode("latin-1"), fields)
        decision = rt.snapshot.decide(service, head, self.wall_time())
        return Exchange(self, downstream, request, rt, service, baseline, decision, head)

    def reply(self, downstream: Downstream, request: Request | None, status: int, reason: str, cause: str) -> None:
        """Answer a request that was refused before routing (gRPC: trailers-only)."""
        self.metrics.local_reply(status)
        if request is not None and request.grpc:
            downstream.send_head(grpc_local_response(GRPC_UNAVAILABLE, reason, cause), NO_FIELDS)
            downstream.send_end(NO_FIELDS)
            return
        head, body = local_response(status, reason, cause)
        downstream.send_response(head, NO_FIELDS, body)

    def finished(self, exchange: Exchange) -> None:
        """Metrics, the access log and the trace span of a finished request."""
        ended_at = self.clock()
        seconds = ended_at - exchange.started_at
        self.metrics.request(exchange.service, exchange.route_kind, exchange.status, seconds)
        grpc_status = exchange.grpc_status.decode("latin-1") if exchange.grpc_status else None
        if grpc_status is not None:
            self.metrics.grpc_response(exchange.service, exchange.route_kind, grpc_status)
        rt = exchange.rt
        if rt.tracer is not None:
            rt.tracer.finished(exchange, ended_at)
        if rt.access_log is not None:
            request = exchange.request
            rt.access_log.record(
                time.time(), exchange.peer.decode("latin-1"), request.method.decode("latin-1"),
                request.target.decode("latin-1"), exchange.status, exchange.service, exchange.route_kind,
                exchange.decision.session_id, str(exchange.destination), round(seconds * 1000, 3),
                exchange.bytes_out, exchange.fallback_cause or None, grpc_status,
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Exchange(UpstreamListener):
    """One request and its response, from the routing decision to the last byte."""

    def __init__(self, router: Router, downstream: Downstream, request: Request, rt: Runtime, service: str,
                 baseline: Address, decision: Decision, head: RequestHead) -> None:
        self.router = router
        self.downstream = downstream
        self.request = request
        self.rt = rt
        self.service = service
        self.baseline = baseline
        self.decision = decision
        kind = decision.kind
        self.route_kind = kind
        self.destination: Address = (
            decision.destination if kind == "sandbox" and decision.destination is not None else baseline)
        self.peer = downstream.peer
        self.started_at = router.clock()
        self.upstream: UpstreamStream | None = None
        self.http2 = False  # the current attempt goes upstream over HTTP/2
        self.pending: list[tuple[bytes, int]] | None = None  # request body held until a stream takes it
        self.trailers: Fields = NO_FIELDS
        self.request_done = request.body == BODY_NONE
        self.body_sent = False  # request body was handed to an upstream: it cannot be sent again
        self.response_started = False
        self.finished = False
        self.status = 0
        self.bytes_out = 0
        self.grpc_status = b""
        self.retried = False
        self.fallback_cause = ""  # why the sandbox's answer came from baseline, when it did
        self.mirror: MirrorCopy | None = None
        self._attempt = 0  # counts attempts, so a connect that finishes late is recognised
        self._deadline: asyncio.TimerHandle | None = None
        self.fields, self.extra, self.extra_lines = self._forwarded(head)

    # ------------------------------------------------------------------ the upstream head

    def _forwarded(self, head: RequestHead) -> tuple[Fields, Fields, bytes]:
        """The client's fields as forwarded, the proxy's own after them, and those as
        HTTP/1.1 field lines."""
        request = self.request
        by_name = request.by_name
        found = head.found_key
        propagate = found is not None and found.source.propagate
        downstream = self.downstream
        if by_name is not None and not propagate and b"x-forwarded-for" not in by_name:
            # The usual request: every field as received, then the connection's own two.
            if b"x-forwarded-proto" not in by_name:
                return request.fields, downstream.forwarded, downstream.forwarded_lines
            own = downstream.forwarded[:1]
            return request.fields, own, field_lines(own)
        fields: Fields = []
        xff = None
        proto = False
        baggage_index = -1
        for name, value in request.fields:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value  # one list, the client appended
                continue
            if name == b"x-forwarded-proto":
                proto = True
            elif name == b"baggage":
                baggage_index = len(fields)
            fields.append((name, value))
        if propagate:
            assert found is not None
            # The key came from elsewhere (a query parameter, a cookie, a legacy header):
            # copied into baggage so the service passes it on to the next hop.
            member = self.rt.propagate_member + b"=" + found.value.encode("latin-1", "replace")
            if baggage_index == -1:
                fields.append((b"baggage", member))
            else:
                fields[baggage_index] = (b"baggage", fields[baggage_index][1] + b"," + member)
        peer = downstream.peer
        extra: Fields = [(b"x-forwarded-for", peer if xff is None else xff + b", " + peer)]
        if not proto:
            extra.append(downstream.forwarded[1])
        return fields, extra, field_lines(extra)

    # ------------------------------------------------------------------ attempts

    def begin(self) -> None:
        """Start: the mirrored copy, ``grpc-timeout``, then the first attempt."""
        request = self.request
        router = self.router
        if self.route_kind == "mirror":
            decision = self.decision
            assert decision.session_id is not None
            if decision.destination is None:
                router.metrics.mirror_dropped("tunnel_disconnected")  # no local process to copy to
            else:
                self.mirror = router.mirrors.start(decision.destination, decision.session_id, request, self.fields,
                                                   self.extra, self.rt.limits,
                                                   self._over_http2(decision.upstream_protocol), self.request_done)
        if request.grpc_timeout:
            seconds = parse_grpc_timeout(request.grpc_timeout)
            if seconds is not None:
                self._deadline = router.loop.call_later(seconds, self.deadline_exceeded)
        if self.route_kind == "sandbox":
            if self.decision.destination is None:
                # A tunnel route with no local process attached: its fallback applies at once.
                session = str(self.decision.session_id)
                self._failed(UpstreamError(503, "session " + session + ": local process disconnected (no tunnel "
                                           "attached)", "tunnel_disconnected", NOT_CONNECTED), False)
                return
            destination = self.destination
            if router.upstreams.outliers.ejected((destination.host, destination.port), router.loop.time()):
                # Skipped while ejected: its fallback applies at once.
                self._failed(UpstreamError(503, "sandbox " + str(destination) + " is ejected after repeated "
                                           "failures", "sandbox_ejected", NOT_CONNECTED), False)
                return
        self._send()

    def _send(self, fresh: bool = False) -> None:
        """One attempt: a pooled connection at once, or a new one (``fresh``: a new HTTP/1.1 one)."""
        self._attempt += 1
        self.http2 = http2 = self._over_http2(self.decision.upstream_protocol if self.route_kind == "sandbox"
                                              else "")
        if self.request_done:
            self.downstream.arm(self._response_timeout())
        # A retry after a stale keep-alive connection takes a new one; HTTP/2 streams take any
        # connection with room (a refusing one is going away and no longer handed out).
        carrier = None if fresh and not http2 else self.router.upstreams.acquire(self.destination, http2)
        if carrier is not None:
            self._open(carrier)
        else:
            self.router.spawn(self._connect(self._attempt))

    async def _connect(self, attempt: int) -> None:
        try:
            carrier = await self.router.upstreams.connect(self.destination, self.http2)
        except UpstreamError as exc:
            if attempt == self._attempt and not self.finished:
                self._failed(exc)
            return
        if attempt != self._attempt or self.finished:
            carrier.release()
            return
        self._open(carrier)

    def _open(self, carrier: Carrier) -> None:
        request = self.request
        pending = self.pending
        body = request.body
        if body == BODY_NONE:
            length = 0
        elif body == BODY_LENGTH:
            length = request.content_length
        elif self.request_done and not self.trailers:
            length = sum(len(data) for data, _ in pending) if pending else 0  # all of it is here
        else:
            length = -1
        try:
            stream = carrier.open_stream(self, request, self.fields, self.extra, self.extra_lines, length)
        except UpstreamError as exc:
            self._failed(exc)
            return
        self.upstream = stream
        if request.expect_continue and self.http2:
            self.downstream.send_informational(100)  # not forwarded on HTTP/2: answered here
        if pending:
            self.pending = None
            self.body_sent = True
            for data, flow_len in pending:
                stream.send_data(data, flow_len)
        if self.request_done and body != BODY_NONE and self.upstream is stream:
            stream.send_end(self.trailers)

    def _over_http2(self, route_protocol: str) -> bool:
        """Whether a request goes upstream over HTTP/2: what the route says, else what its
        listener says (``http1`` unless configured); gRPC always, an upgrade never."""
        request = self.request
        choice = _PROTOCOLS[route_protocol] if route_protocol else self.downstream.upstream_choice
        return not request.websocket and (request.grpc or choice == _HTTP2 or (choice == _AUTO and request.http2))

    def _response_timeout(self) -> float:
        limits = self.rt.limits
        # gRPC calls may hold their response for as long as the call lives (streams).
        return limits.h2_stream_idle_timeout_s if self.request.grpc else limits.upstream_response_timeout_s

    def _idle_timeout(self) -> float:
        limits = self.rt.limits
        return limits.h2_stream_idle_timeout_s if self.request.http2 else limits.body_idle_timeout_s

    # ------------------------------------------------------------------ the request body (from the downstream)

    def on_request_data(self, data: bytes, flow_len: int) -> None:
        """Request body bytes from the client."""
        if self.mirror is not None:
            self.mirror.feed(data)
        upstream = self.upstream
        if upstream is not None:
            self.body_sent = True
            upstream.send_data(data, flow_len)
        elif self.finished:
            self.downstream.acknowledge(flow_len)
        elif self.pending is None:
            self.pending = [(data, flow_len)]  # not acknowledged: the client waits for a connection
        else:
            self.pending.append((data, flow_len))

    def on_request_end(self, trailers: Fields) -> None:
        """The client's request is complete."""
        self.request_done = True
        self.trailers = trailers
        if self.mirror is not None:
            self.mirror.end(trailers)
        if self.finished:
            return
        if self.upstream is not None:
            self.upstream.send_end(trailers)
        if not self.response_started:
            self.downstream.arm(self._response_timeout())

    def response_taken(self, flow_len: int) -> None:
        """The client took response bytes: the upstream may send more."""
        upstream = self.upstream
        if upstream is not None:
            upstream.acknowledge(flow_len)

    def client_gone(self, status: int = 499) -> None:
        """The client went away, reset the request or sent a broken body (``status``, when
        nothing was answered yet: 499 is nginx's "client closed request"): drop the upstream
        side and record it."""
        self._cancel_upstream()
        if self.mirror is not None and not self.request_done:
            self.mirror.cancel()
        if not self.finished:
            if self.status == 0:
                self.status = status
            self._complete()

    # ------------------------------------------------------------------ UpstreamListener

    def on_request_taken(self, flow_len: int) -> None:
        """The upstream took request bytes: the client may send more."""
        self.downstream.acknowledge(flow_len)

    def on_informational(self, status: int) -> None:
        """Relay ``100 Continue`` when the client asked for it; drop other 1xx."""
        if status == 100 and self.request.expect_continue and not self.body_sent:
            self.downstream.send_informational(100)

    def on_response_head(self, head: Response) -> None:
        """Pass the response head on."""
        if self.finished:
            return
        self._responded(head)
        self.downstream.arm(self._idle_timeout())
        self.downstream.send_head(head, self._debug_fields())

    def on_response(self, head: Response, body: bytes) -> None:
        """A whole response in one piece: on to the client in one piece."""
        if self.finished:
            return
        self._responded(head)
        self.bytes_out = len(body)
        self._release_upstream()
        self._complete()
        self.downstream.send_response(head, self._debug_fields(), body)

    def on_response_data(self, data: bytes, flow_len: int) -> None:
        """Response body bytes: on to the client."""
        if self.finished:
            return
        self.bytes_out += len(data)
        downstream = self.downstream
        downstream.arm(self._idle_timeout())
        downstream.send_data(data, flow_len)

    def on_response_end(self, trailers: Fields) -> None:
        """The response is complete."""
        if self.finished:
            return
        if trailers and self.request.grpc:
            for name, value in trailers:
                if name == b"grpc-status":
                    self.grpc_status = value
        self._release_upstream()
        self._complete()
        self.downstream.send_end(trailers)

    def _release_upstream(self) -> None:
        # Before the client hears the end: a pipelined request that follows finds the
        # connection back in the pool. Late acknowledgements go nowhere from now on.
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            if self.request_done:
                upstream.finish()
            else:
                upstream.cancel()  # answered before the whole request: the rest is not sent

    def _cancel_upstream(self) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.cancel()

    def on_upstream_error(self, error: UpstreamError) -> None:
        """The attempt failed: retry, fall back, answer an error, or cut the client off."""
        if self.finished:
            return
        self._cancel_upstream()
        self._failed(error)

    def _responded(self, head: Response) -> None:
        self.response_started = True
        self.status = head.status
        if self.request.grpc:
            for name, value in head.fields:
                if name == b"grpc-status":
                    self.grpc_status = value  # a trailers-only response
        if self.route_kind == "sandbox":
            destination = self.destination
            self.router.upstreams.outliers.success((destination.host, destination.port))

    def _debug_fields(self) -> Fields:
        if not self.rt.debug_headers:
            return NO_FIELDS
        if self.route_kind == "baseline":
            extra: Fields = [(b"x-turnout-route", b"baseline")]
            if self.fallback_cause:
                # The sandbox failed and baseline answered: never silent.
                session = str(self.decision.session_id).encode("latin-1", "replace")
                extra.append((b"x-turnout-fallback", session + b"; cause=" + self.fallback_cause.encode()))
            return extra
        return [(b"x-turnout-route", str(self.decision.session_id).encode("latin-1", "replace"))]

    # ------------------------------------------------------------------ failure

    def _failed(self, error: UpstreamError, count: bool = True) -> None:
        router = self.router
        cause = error.cause
        router.metrics.upstream_error(self.service, self.route_kind, cause)
        sandbox = self.route_kind == "sandbox"
        if sandbox and count and error.phase != STALE:
            destination = self.destination
            if router.upstreams.outliers.failure((destination.host, destination.port), router.loop.time(), cause,
                                                 cause in _TIMEOUTS):
                router.metrics.outlier_ejection(self.service)
        decision = self.decision
        step = next_step(error.phase, idempotent=self.request.method in IDEMPOTENT,
                         replayable=not self.body_sent, retried=self.retried,
                         can_fallback=sandbox and decision.fallback == "baseline" and not self.fallback_cause)
        if step == RETRY:
            self.retried = True
            self._send(fresh=True)
        elif step == FALLBACK:
            self.fallback_cause = cause
            self.route_kind = "baseline"
            self.destination = self.baseline
            self.retried = False
            router.metrics.fallback(self.service, cause)
            self._send()
        elif step == CUT:
            self._complete()
            self.downstream.reset()
        else:
            self._local_reply(error, decision.session_id if sandbox else None)

    def timed_out(self) -> None:
        """The downstream's timer fired: no response head, or no response bytes, in time."""
        if self.finished:
            return
        if self.response_started:
            error = UpstreamError(504, "upstream response stalled", "upstream_timeout", STARTED)
        else:
            error = UpstreamError(504, "upstream did not answer in time", "upstream_timeout", SENT)
        self.on_upstream_error(error)

    def deadline_exceeded(self) -> None:
        """``grpc-timeout`` fired: cancel upstream, answer DEADLINE_EXCEEDED."""
        self._deadline = None
        if self.finished:
            return
        self._cancel_upstream()
        self.router.metrics.upstream_error(self.service, self.route_kind, "grpc_deadline")
        if not self.response_started:
            self._local_reply(UpstreamError(504, "deadline exceeded", "grpc_deadline", SENT), None,
                              GRPC_DEADLINE_EXCEEDED)
            return
        self.grpc_status = GRPC_DEADLINE_EXCEEDED
        self._complete()
        self.downstream.send_end([(b"grpc-status", GRPC_DEADLINE_EXCEEDED), (b"grpc-message", b"deadline exceeded")])

    def _local_reply(self, error: UpstreamError, session: str | None, grpc_code: bytes = GRPC_UNAVAILABLE) -> None:
        """Answer the client with an error turnout made."""
        self.response_started = True
        downstream = self.downstream
        if self.request.grpc:
            self.status = 200
            self.grpc_status = grpc_code
            self.router.metrics.local_reply(200)
            self._complete()
            downstream.send_head(grpc_local_response(grpc_code, error.reason, error.cause, session), NO_FIELDS)
            downstream.send_end(NO_FIELDS)
            return
        self.status = error.status
        self.router.metrics.local_reply(error.status)
        head, body = local_response(error.status, error.reason, error.cause, session)
        self._complete()
        downstream.send_response(head, NO_FIELDS, body)

    def _complete(self) -> None:
        """The exchange is over (the downstream hears it next): record it."""
        if self.finished:
            return
        self.finished = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.mirror is not None and not self.request_done:
            self.mirror.cancel()  # never a partial copy
        self.router.finished(self)

    # ------------------------------------------------------------------ for records

    @property
    def listener_mode(self) -> str:
        """``inbound`` or ``outbound``: whether the proxy served the request or made it for an app."""
        return self.downstream.listener.mode

