"""The cleartext ``Sniffer``: whatever the reads, the same protocol gets the same bytes."""

from __future__ import annotations

import asyncio
import functools
from typing import cast

import pytest

from dataplane.http1.server import H1Server
from dataplane.http2.engine import PREFACE
from dataplane.http2.server import H2Connection
from dataplane.listen import Sniffer
from tests.unit.dataplane.fakes import CLIENT_IP, FakeTransport, VirtualLoop, make_proxy


def _sniff(loop: VirtualLoop, pieces: list[bytes]) -> tuple[str, bytes]:
    """The protocol the connection was handed to, and what it wrote, after ``pieces``."""
    proxy = make_proxy(loop, limits={"max_request_line_bytes": 64})
    sniffer = Sniffer(proxy.router, proxy.connections, proxy.runtime.config.listeners[0])
    transport = FakeTransport((CLIENT_IP, 40000), loop)
    transport.protocol = sniffer
    sniffer.connection_made(cast(asyncio.Transport, transport))
    for piece in pieces:
        loop.inside(functools.partial(transport.protocol.data_received, piece))  # HTTP/2 wants a running loop
    kind = {Sniffer: "undecided", H1Server: "http1", H2Connection: "http2"}[type(transport.protocol)]
    return kind, transport.data


@pytest.mark.parametrize(("wire", "kind"), [
    (PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "http2"),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", "http1"),
    (b"INVALID CONNECTION PREFACE\r\n\r\n", "http2"),
    (b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
    (b"\n" * 40 + b"GET", "undecided"),
    (b"\r\n" * 40 + b"GET", "http1"),
    (b"\r\n" * 10 + b"NOSLASH\r\n", "http2"),
    (b"G" * 40, "undecided"),
    (b"G" * 65, "http1"),
    (b"GET " + b"x" * 30 + b"/ HTTP/1.1\r\n", "http1"),
], ids=["preface", "near-preface", "invalid-preface", "empty-lines-then-request", "empty-lines",
        "empty-lines-past-the-line-limit", "empty-lines-then-no-slash", "line-without-end", "line-over-the-limit",
        "late-slash"])
def test_one_byte_at_a_time_decides_as_the_whole_does(loop: VirtualLoop, wire: bytes, kind: str) -> None:
    whole = _sniff(loop, [wire])
    assert whole[0] == kind
    assert _sniff(loop, [wire[i : i + 1] for i in range(len(wire))]) == whole
    assert _sniff(loop, [wire[:30], wire[30:]] if len(wire) > 30 else [wire]) == whole
