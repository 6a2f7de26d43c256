"""h2 keeps every stream in its table until it counts open streams, which turnout's
connections no longer ask it to do per stream: ``H2Link.stream_done`` must drop closed
streams, or a long-lived connection grows by one stream object (~600 bytes) per request."""

from __future__ import annotations

import h2.config
import h2.connection

from dataplane.http2.link import H2Link
from dataplane.http2.server import _ServerH2
from dataplane.http2.upstream import _ClientH2

HEAD = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"users"), (b":path", b"/")]


def _pair() -> tuple[h2.connection.H2Connection, H2Link]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    link = H2Link()
    link.h2 = _ServerH2(h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    link.h2.initiate_connection()
    link.h2.receive_data(client.data_to_send())
    client.receive_data(link.h2.data_to_send())
    return client, link


def test_a_long_lived_server_connection_keeps_a_bounded_stream_table() -> None:
    client, link = _pair()
    for _ in range(2000):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, HEAD, end_stream=True)
        link.h2.receive_data(client.data_to_send())
        link.h2.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
        client.receive_data(link.h2.data_to_send())
        link.stream_done()
    assert len(link.h2.streams) <= 128


def test_without_stream_done_the_table_grows() -> None:
    # The reason for stream_done: h2 alone keeps them all (the server never counts).
    client, link = _pair()
    for _ in range(300):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, HEAD, end_stream=True)
        link.h2.receive_data(client.data_to_send())
        link.h2.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
        client.receive_data(link.h2.data_to_send())
    assert len(link.h2.streams) == 300


def test_the_upstream_client_does_not_walk_its_table_per_stream_and_still_drops_closed_ones() -> None:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    link = H2Link()
    link.h2 = _ClientH2(h2.config.H2Configuration(client_side=True, header_encoding=None))
    link.h2.initiate_connection()
    server.initiate_connection()
    server.receive_data(link.h2.data_to_send())
    link.h2.receive_data(server.data_to_send())
    assert link.h2.open_outbound_streams == 0  # H2Upstream.has_capacity counts streams itself
    for _ in range(1000):
        stream_id = link.h2.get_next_available_stream_id()
        link.h2.send_headers(stream_id, HEAD, end_stream=True)
        server.receive_data(link.h2.data_to_send())
        server.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
        link.h2.receive_data(server.data_to_send())
        link.stream_done()
    assert len(link.h2.streams) <= 128
