"""The tunnel's pieces without sockets: the upgrade heads and the reconnect backoff."""

from __future__ import annotations

import json

import pytest

from remocal.tunnel import Backoff, error_head, parse_head


def test_parse_head_joins_repeated_fields_and_lowers_names() -> None:
    line, fields = parse_head(b"POST /v1/tunnel HTTP/1.1\r\nUpgrade: turnout-tunnel\r\nX-A: 1\r\nx-a: 2\r\n")
    assert line == "POST /v1/tunnel HTTP/1.1"
    assert fields == {"upgrade": "turnout-tunnel", "x-a": "1, 2"}


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\r\nno colon here", b"GET / HTTP/1.1\r\n folded: x"])
def test_parse_head_refuses_malformed_lines(head: bytes) -> None:
    with pytest.raises(ValueError, match="malformed header line"):
        parse_head(head)


def test_error_head_is_a_whole_reply_with_a_json_body() -> None:
    reply = error_head(403, "Forbidden", "forbidden", "owned by 'alice'")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"content-length: %d" % len(body) in head
    assert json.loads(body) == {"error": "forbidden", "message": "owned by 'alice'"}


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    values = iter([0.0, 1.0] * 20)
    backoff = Backoff(0.2, 5.0, rng=lambda: next(values))
    delays = [backoff.next() for _ in range(10)]
    assert delays[:4] == [0.1, 0.4, 0.4, 1.6]  # half the cap at rng 0, the cap at rng 1
    assert max(delays) == 5.0 and min(delays) >= 0.1
    backoff.reset()
    assert backoff.next() == 0.1
