"""The h2 library's share of one proxied HTTP/2 request, without sockets or turnout's code.

Usage (from the repository root; pin it like the proxy under test)::

    taskset -c 1 .venv/bin/python -m bench.http2.floor [--requests 20000] [--rounds 5]

One request as the proxy sees it, with turnout's own h2 connection classes
(``_ServerH2`` towards the client, ``_ClientH2`` towards the upstream) and the fields
h2load and nginx send: decode the client's HEADERS, encode the upstream HEADERS, decode
the upstream's HEADERS and DATA, encode the client's HEADERS and DATA, and the flow-control
acknowledgements. The peers' own work is not timed. The result is the CPU time per
request that no change to turnout's code can remove while h2 and hpack do the protocol
work, and the request rate one core could reach on that alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events

from dataplane.http2.server import _ServerH2
from dataplane.http2.upstream import _ClientH2

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"), (b":path", b"/bench"),
           (b"user-agent", b"h2load nghttp2/1.52.0"), (b"baggage", b"turnout-session=bench")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sun, 29 Nov 2026 23:50:00 GMT"),
            (b"content-type", b"text/plain"), (b"content-length", b"100")]
BODY = b"x" * 100


def _config(client: bool, validate: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client, header_encoding=None, validate_inbound_headers=validate,
                                     normalize_inbound_headers=validate, validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


def _connect(client: h2.connection.H2Connection, server: h2.connection.H2Connection) -> None:
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())


def measure(requests: int) -> float:
    """Seconds of h2 work in the proxy per request, over ``requests`` requests."""
    client = h2.connection.H2Connection(_config(True, True))
    proxy_in = _ServerH2(_config(False, False))  # as turnout's H2Connection configures it
    proxy_out = _ClientH2(_config(True, True))  # as turnout's H2Upstream configures it
    origin = h2.connection.H2Connection(_config(False, True))
    _connect(client, proxy_in)
    _connect(proxy_out, origin)
    spent = 0.0
    clock = time.perf_counter
    for i in range(requests):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        wire = client.data_to_send()
        t0 = clock()
        event = proxy_in.receive_data(wire)[0]
        assert isinstance(event, h2.events.RequestReceived) and event.headers is not None
        up_id = proxy_out.get_next_available_stream_id()
        proxy_out.send_headers(up_id, [*event.headers, (b"x-forwarded-for", b"127.0.0.1"),
                                       (b"x-forwarded-proto", b"http")], end_stream=True)
        upstream_wire = proxy_out.data_to_send()
        t1 = clock()
        origin.receive_data(upstream_wire)
        origin.send_headers(up_id, RESPONSE)
        origin.send_data(up_id, BODY, end_stream=True)
        response_wire = origin.data_to_send()
        t2 = clock()
        events = proxy_out.receive_data(response_wire)
        head = events[0]
        data = events[1]
        assert isinstance(head, h2.events.ResponseReceived) and isinstance(data, h2.events.DataReceived)
        assert head.headers is not None
        proxy_in.send_headers(sid, head.headers)
        proxy_in.send_data(sid, data.data, end_stream=True)
        proxy_out.acknowledge_received_data(data.flow_controlled_length, up_id)
        out = proxy_in.data_to_send()
        window_updates = proxy_out.data_to_send()
        if i % 128 == 127:
            proxy_in._open_streams(0)  # what H2Link.stream_done does
            proxy_out._open_streams(0)
        t3 = clock()
        spent += (t1 - t0) + (t3 - t2)
        for ev in client.receive_data(out):
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, sid)
        proxy_in.receive_data(client.data_to_send())
        origin.receive_data(window_updates)
        proxy_out.receive_data(origin.data_to_send())
        if i % 128 == 127:
            client._open_streams(1)
            origin._open_streams(1)
    return spent / requests


def main(argv: Sequence[str] | None = None) -> int:
    """Print the h2 library's CPU time per proxied request (median of the rounds)."""
    parser = argparse.ArgumentParser(prog="python -m bench.http2.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    args = parser.parse_args(argv)
    rounds = [measure(args.requests) for _ in range(args.rounds)]
    per_request = statistics.median(rounds)
    print(f"h2 library work per proxied request: {per_request * 1e6:.1f} us (median of {args.rounds} rounds of "
          f"{args.requests}; rounds {', '.join(f'{r * 1e6:.1f}' for r in rounds)} us)")
    print(f"=> at most {1 / per_request:,.0f} req/s per core from h2 alone, before any of turnout's own work")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
