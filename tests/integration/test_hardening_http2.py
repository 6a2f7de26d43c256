"""HTTP/2 bad input (docs/hardening.md), with the h2 library (and raw frames) as the abusive client.

Every test ends by checking that a second, well-behaved client is served by the same proxy.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
)

from tests.integration.test_http2 import H2Client, H2Stack, h2_stack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Stack]:
    """A proxy with small HTTP/2 budgets, in front of HTTP/2 upstreams."""
    with h2_stack(tmp_path_factory.mktemp("h2hard"), h2_max_concurrent_streams=10, h2_max_premature_resets=50,
                  header_read_timeout_s=1.0) as stack:
        yield stack


def assert_served(stack: H2Stack) -> None:
    """A well-behaved client gets a normal answer."""
    c = H2Client(stack.port)
    try:
        headers, _ = c.response(c.request("/ok"))
        assert headers[b":status"] == b"200"
    finally:
        c.close()


def read_all(c: H2Client, timeout_s: float = 5.0) -> None:
    """Read until the proxy closes (h2 errors after its GOAWAY end the reading too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not c.closed:
        try:
            c.pump(lambda: False, timeout_s=deadline - time.monotonic())
        except h2.exceptions.ProtocolError:
            return


def test_rapid_reset_gets_goaway_and_cancels_upstream_work(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        sent = 0
        with contextlib.suppress(OSError):  # the proxy may hang up mid-flood
            for _ in range(2000):
                stream = c.conn.get_next_available_stream_id()
                c.conn.send_headers(stream, [(":method", "GET"), (":scheme", "http"), (":authority", "users"),
                                             (":path", "/hang")], end_stream=True)
                c.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                c.send()
                sent += 1
        read_all(c)
        goaway = c.goaway()
        assert goaway is not None and goaway.error_code == CALM
        assert sent >= 50
    finally:
        c.close()
    # Whatever reached the upstream was cancelled there too.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hangs = sum(1 for r in hard.baseline.requests if r.header(b":path") == b"/hang")
        if len(hard.baseline.resets) >= hangs:
            break
        time.sleep(0.05)
    assert len(hard.baseline.resets) >= hangs
    assert_served(hard)


def test_streams_over_the_limit_are_refused(hard: H2Stack) -> None:
    c = H2Client(hard.port)  # its SETTINGS are not read yet, so h2 lets the client exceed them
    try:
        streams = [c.request("/hang") for _ in range(15)]
        c.pump(lambda: sum(1 for s in streams if c.reset_code(s) is not None) >= 5, timeout_s=5)
        codes = [c.reset_code(s) for s in streams]
        assert codes.count(h2.errors.ErrorCodes.REFUSED_STREAM) == 5
        assert codes[:10] == [None] * 10  # the first ten are being served
        assert c.goaway() is None
        assert_served(hard)
    finally:
        c.close()


def test_ping_flood_while_not_reading_gets_goaway(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    c.sock.settimeout(2)
    try:
        with contextlib.suppress(OSError):  # the proxy may hang up mid-flood
            payload = b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(5000))
            c.sock.sendall(payload)
        read_all(c)
        goaway = c.goaway()
        assert c.closed
        assert goaway is None or goaway.error_code == CALM
    finally:
        c.close()
    assert_served(hard)


def test_priority_flood_gets_goaway(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        with contextlib.suppress(OSError):  # the proxy may hang up mid-flood
            c.sock.sendall(b"".join(PriorityFrame(2 * i + 1, depends_on=0, stream_weight=16).serialize()
                                    for i in range(5000)))
        read_all(c)
        goaway = c.goaway()
        assert goaway is not None and goaway.error_code == CALM
    finally:
        c.close()
    assert_served(hard)


def test_empty_data_frames_get_goaway(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        stream = c.conn.get_next_available_stream_id()
        c.conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                                     (":path", "/hang")])
        c.send()
        c.sock.sendall(b"".join(DataFrame(stream, data=b"").serialize() for _ in range(100)))
        read_all(c)
        goaway = c.goaway()
        assert goaway is not None and goaway.error_code == CALM
    finally:
        c.close()
    assert_served(hard)


def test_continuation_flood_is_a_connection_error(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "users"),
                                        (":path", "/")])
        frames = [HeadersFrame(1, data=block).serialize()]  # no END_HEADERS: CONTINUATION must follow
        frames += [ContinuationFrame(1, data=b"\x00" * 16384).serialize() for _ in range(300)]
        with contextlib.suppress(OSError):  # the proxy may hang up mid-flood
            c.sock.sendall(b"".join(frames))
        read_all(c)
        assert c.closed
    finally:
        c.close()
    assert_served(hard)


def test_hpack_bomb_is_a_connection_error(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        encoder = hpack.Encoder()
        block = encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "users"), (":path", "/"),
                                ("x-bomb", "a" * 4000)])
        # Each byte refers to the 4 KB entry in the dynamic table: 16 KiB decode to 64 MB.
        bomb = HeadersFrame(1, data=block + b"\xbe" * 16000, flags=["END_HEADERS", "END_STREAM"])
        with contextlib.suppress(OSError):  # the proxy may hang up mid-flood
            c.sock.sendall(bomb.serialize())
        read_all(c)
        goaway = c.goaway()
        assert c.closed
        assert goaway is None or goaway.error_code != h2.errors.ErrorCodes.NO_ERROR
    finally:
        c.close()
    assert_served(hard)


def test_header_phase_timeout_closes_a_silent_or_trickling_client(hard: H2Stack) -> None:
    with socket.create_connection(("127.0.0.1", hard.port), timeout=5) as s:
        block = hpack.Encoder().encode([(":method", "GET"), (":path", "/")])
        s.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + HeadersFrame(1, data=block).serialize())
        started = time.monotonic()
        while True:
            data = s.recv(65536)
            if not data:
                break
        assert time.monotonic() - started < 4
    assert_served(hard)


def test_malformed_request_is_a_stream_error_and_the_connection_lives(hard: H2Stack) -> None:
    c = H2Client(hard.port)
    try:
        c.conn.config.validate_outbound_headers = False
        c.conn.config.normalize_outbound_headers = False
        bad = c.request("/x", extra=[("transfer-encoding", "chunked")])
        good = c.request("/ok")
        headers, _ = c.response(good)
        assert headers[b":status"] == b"200"
        assert c.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    finally:
        c.close()


def test_content_length_too_long_to_convert_is_a_stream_error(hard: H2Stack) -> None:
    # 4,301 digits are more than Python's int() converts: once a ValueError that closed the
    # connection with nothing sent and logged a traceback per request (RFC 9113 §8.1.1: a
    # malformed request is a stream error of type PROTOCOL_ERROR).
    c = H2Client(hard.port)
    try:
        c.conn.config.validate_outbound_headers = False
        bad = c.request("/x", "POST", body=b"abc", extra=[("content-length", "1" * 4301)])
        good = c.request("/ok")
        headers, _ = c.response(good)
        assert headers[b":status"] == b"200"
        assert c.reset_code(bad) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert c.goaway() is None
        again = c.request("/ok")  # the connection still serves
        assert c.response(again)[0][b":status"] == b"200"
    finally:
        c.close()
    log = hard.proxy.log()
    assert "Traceback" not in log and "Fatal error" not in log, log[-2000:]


def test_many_streams_in_turn_on_one_connection(hard: H2Stack) -> None:
    # Well-behaved churn is not mistaken for abuse: 300 streams, 10 at a time, none reset.
    c = H2Client(hard.port)
    try:
        for _ in range(30):
            streams = [c.request("/ok") for _ in range(10)]
            for s in streams:
                assert c.response(s)[0][b":status"] == b"200"
        assert c.goaway() is None
    finally:
        c.close()


def test_mass_reset_after_responses_is_not_counted_as_abuse(tmp_path: Path) -> None:
    # Resets of streams whose response already ended are not premature.
    with h2_stack(tmp_path, h2_max_premature_resets=5) as stack:
        c = H2Client(stack.port)
        try:
            for _ in range(20):
                s = c.request("/ok")
                c.response(s)
                # h2 would refuse to reset a closed stream: a raw frame, as an abuser sends it.
                c.sock.sendall(RstStreamFrame(s, error_code=h2.errors.ErrorCodes.CANCEL).serialize())
            assert c.response(c.request("/ok"))[0][b":status"] == b"200"
            assert c.goaway() is None
        finally:
            c.close()



def worker_rss_bytes(stack: H2Stack) -> int:
    """Resident memory of the proxy's worker processes (children of the supervisor)."""
    pid = stack.proxy.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for child in children:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def test_window_zero_with_large_responses_keeps_memory_bounded(hard: H2Stack) -> None:
    # Ten 8 MB responses to a client that never opens its window: 80 MB if buffered; the
    # proxy holds about one window per stream per side instead.
    before = worker_rss_bytes(hard)
    c = H2Client(hard.port)
    try:
        streams = [c.request("/big?8000000") for _ in range(10)]
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # read frames but never acknowledge any DATA
            try:
                c.sock.settimeout(0.1)
                c.conn.receive_data(c.sock.recv(1 << 16))
            except TimeoutError:
                continue
        grown = worker_rss_bytes(hard) - before
        assert grown < 30 * 1024 * 1024, f"the worker grew by {grown} bytes"
        assert all(not c.ended(s) for s in streams)
    finally:
        c.close()
    assert_served(hard)
