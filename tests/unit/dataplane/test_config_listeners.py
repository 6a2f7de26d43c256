"""Listener fields of the bootstrap file: ``upstream_protocol``."""

from __future__ import annotations

import pytest

from dataplane.config import parse_config_text
from dataplane.rules import ConfigError

LISTENER = "listeners: [{name: in, address: '127.0.0.1:15001', mode: inbound, service: users, " \
           "baseline: '127.0.0.1:8080'%s}]\n"


def test_upstream_protocol_defaults_to_http1() -> None:
    # What nginx and Envoy do: HTTP/1.1 towards upstreams unless configured (gRPC aside).
    assert parse_config_text(LISTENER % "").listeners[0].upstream_protocol == "http1"


@pytest.mark.parametrize("protocol", ["auto", "http1", "http2"])
def test_upstream_protocol_is_read(protocol: str) -> None:
    config = parse_config_text(LISTENER % f", upstream_protocol: {protocol}")
    assert config.listeners[0].upstream_protocol == protocol


@pytest.mark.parametrize("value", ["h2c", "HTTP1", "[http1]", "1"])
def test_a_bad_upstream_protocol_is_named(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(LISTENER % f", upstream_protocol: {value}")
    problems = {p.field: p.reason for p in info.value.problems}
    assert "auto, http1, http2" in problems["listeners[0].upstream_protocol"]


def test_a_session_route_with_a_bad_upstream_protocol_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(LISTENER % "" + "sessions: [{id: s, key: k, routes: [{service: users, "
                                          "destination: '10.0.0.1:80', upstream_protocol: spdy}]}]\n")
    assert any(p.field.endswith("routes[0].upstream_protocol") for p in info.value.problems)
