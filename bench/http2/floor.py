"""The protocol engine's share of one proxied HTTP/2 request, without sockets or turnout's
other code: turnout's own engine (``dataplane/http2/engine.py``) next to the h2 library it
replaced on that path.

Usage (from the repository root; pin it like the proxy under test)::

    taskset -c 1 .venv/bin/python -m bench.http2.floor [--requests 20000] [--rounds 5]

One request as the proxy sees it, with the fields h2load and nginx send: decode the
client's HEADERS, encode the upstream HEADERS, decode the upstream's HEADERS and DATA,
encode the client's HEADERS and DATA (with END_STREAM), and the flow-control
acknowledgements. The peers (h2 connections) are not timed. The result is the CPU time per
request that no change to turnout's other code can remove, and the request rate one core
could reach on that alone; for h2, as turnout used it until it had its own engine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events

from dataplane.http2 import engine
from dataplane.http2.hpack import Decoder, Encoder

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"), (b":path", b"/bench"),
           (b"user-agent", b"h2load nghttp2/1.52.0"), (b"baggage", b"turnout-session=bench")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sun, 29 Nov 2026 23:50:00 GMT"),
            (b"content-type", b"text/plain"), (b"content-length", b"100")]
BODY = b"x" * 100
FORWARDED = [(b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"http")]


def _config(client: bool, validate: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=validate,
                                     normalize_inbound_headers=validate, validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


def _connect(client: h2.connection.H2Connection | engine.H2Engine,
             server: h2.connection.H2Connection | engine.H2Engine) -> None:
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())


def _h2_with_turnout_hpack(client: bool) -> h2.connection.H2Connection:
    # As turnout used h2 last: its own HPACK plugged in, h2's validation where it had it.
    conn = h2.connection.H2Connection(_config(client, client))
    conn.encoder = Encoder()  # type: ignore[assignment]
    conn.decoder = Decoder()  # type: ignore[assignment]
    return conn


def _round_trip(client: h2.connection.H2Connection, origin: h2.connection.H2Connection,
                proxy_request: Callable[[bytes], bytes], proxy_response: Callable[[bytes], tuple[bytes, bytes]],
                requests: int) -> float:
    spent = 0.0
    clock = time.perf_counter
    for i in range(requests):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        wire = client.data_to_send()
        t0 = clock()
        upstream_wire = proxy_request(wire)
        t1 = clock()
        for event in origin.receive_data(upstream_wire):
            if isinstance(event, h2.events.RequestReceived):
                origin.send_headers(event.stream_id, RESPONSE)
                origin.send_data(event.stream_id, BODY, end_stream=True)
        response_wire = origin.data_to_send()
        t2 = clock()
        out, window_updates = proxy_response(response_wire)
        t3 = clock()
        spent += (t1 - t0) + (t3 - t2)
        for ev in client.receive_data(out):
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, sid)
        wire = client.data_to_send()
        if wire:
            proxy_request(wire)
        if window_updates:
            origin.receive_data(window_updates)
        wire = origin.data_to_send()
        if wire:
            proxy_response(wire)
        if i % 128 == 127:
            client._open_streams(1)  # h2 drops closed streams from its table when counting
            origin._open_streams(1)
    return spent / requests


def measure_engine(requests: int) -> float:
    """Seconds of turnout's engine's work in the proxy per request."""
    client = h2.connection.H2Connection(_config(True, True))
    origin = h2.connection.H2Connection(_config(False, True))
    proxy_in = engine.H2Engine(False, max_concurrent_streams=128, initial_window_size=262144,
                               connection_window_size=1 << 20, max_header_list_size=61440)
    proxy_out = engine.H2Engine(True, initial_window_size=262144, connection_window_size=1 << 20,
                                max_header_list_size=61440)
    _connect(client, proxy_in)
    _connect(proxy_out, origin)
    up_to_down: dict[int, int] = {}

    def request(wire: bytes) -> bytes:
        for event in proxy_in.receive_data(wire):
            if isinstance(event, engine.RequestReceived):
                up_id = proxy_out.get_next_available_stream_id()
                proxy_out.send_headers(up_id, [*event.headers, *FORWARDED], end_stream=event.stream_ended)
                up_to_down[up_id] = event.stream_id
        return proxy_out.data_to_send()

    def response(wire: bytes) -> tuple[bytes, bytes]:
        for event in proxy_out.receive_data(wire):
            if isinstance(event, engine.ResponseReceived):
                proxy_in.send_headers(up_to_down[event.stream_id], event.headers, event.stream_ended)
            elif isinstance(event, engine.DataReceived):
                sid = up_to_down.pop(event.stream_id) if event.stream_ended else up_to_down[event.stream_id]
                proxy_in.send_data(sid, event.data, event.stream_ended)
                proxy_out.acknowledge(event.stream_id, event.flow_controlled_length)
        return proxy_in.data_to_send(), proxy_out.data_to_send()

    return _round_trip(client, origin, request, response, requests)


def measure_h2(requests: int) -> float:
    """Seconds of h2's work in the proxy per request (with turnout's HPACK, as last used)."""
    client = h2.connection.H2Connection(_config(True, True))
    origin = h2.connection.H2Connection(_config(False, True))
    proxy_in = _h2_with_turnout_hpack(False)
    proxy_out = _h2_with_turnout_hpack(True)
    _connect(client, proxy_in)
    _connect(proxy_out, origin)
    up_to_down: dict[int, int] = {}
    count = [0]

    def request(wire: bytes) -> bytes:
        for event in proxy_in.receive_data(wire):
            if isinstance(event, h2.events.RequestReceived) and event.headers is not None:
                up_id = proxy_out.get_next_available_stream_id()
                proxy_out.send_headers(up_id, [*event.headers, *FORWARDED], end_stream=event.stream_ended is not None)
                up_to_down[up_id] = event.stream_id
        return proxy_out.data_to_send()

    def response(wire: bytes) -> tuple[bytes, bytes]:
        for event in proxy_out.receive_data(wire):
            if isinstance(event, h2.events.ResponseReceived) and event.headers is not None:
                proxy_in.send_headers(up_to_down[event.stream_id], event.headers)
            elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                ended = event.stream_ended is not None
                sid = up_to_down.pop(event.stream_id) if ended else up_to_down[event.stream_id]
                proxy_in.send_data(sid, event.data or b"", end_stream=ended)
                proxy_out.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        count[0] += 1
        if count[0] % 128 == 0:  # what turnout's H2Link.stream_done did
            proxy_in._open_streams(0)
            proxy_out._open_streams(0)
        return proxy_in.data_to_send(), proxy_out.data_to_send()

    return _round_trip(client, origin, request, response, requests)


def main(argv: Sequence[str] | None = None) -> int:
    """Print each protocol engine's CPU time per proxied request (median of the rounds)."""
    parser = argparse.ArgumentParser(prog="python -m bench.http2.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    args = parser.parse_args(argv)
    for name, measure in (("turnout engine", measure_engine), ("h2 library", measure_h2)):
        rounds = [measure(args.requests) for _ in range(args.rounds)]
        per_request = statistics.median(rounds)
        print(f"{name}: {per_request * 1e6:.1f} us per proxied request, at most {1 / per_request:,.0f} req/s "
              f"per core from it alone (median of {args.rounds} rounds of {args.requests}; "
              f"rounds {', '.join(f'{r * 1e6:.1f}' for r in rounds)} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
