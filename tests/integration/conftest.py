"""Shared integration fixtures: a standard stack per HTTP/1.1 codec.

``stack`` runs one proxy per codec (module scope, to keep the suite fast) in front of a
recording baseline, a recording sandbox and a recording mirror target, with sessions for
every routing case. Tests that need other limits start their own proxy with
``running_proxy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.support import (
    ProxyProcess,
    RecordingUpstream,
    closed_port,
    free_port,
    inbound,
    running_proxy,
)

CODECS = ["httptools", "h11"]


@pytest.fixture(params=CODECS)
def codec(request: pytest.FixtureRequest) -> str:
    """Every HTTP/1.1 test runs against both codecs."""
    return str(request.param)


@dataclass
class Stack:
    """A proxy and its upstreams."""

    proxy: ProxyProcess
    baseline: RecordingUpstream
    sandbox: RecordingUpstream
    mirror: RecordingUpstream
    codec: str
    dead: int  # a port nothing listens on

    @property
    def port(self) -> int:
        """The 'users' inbound listener."""
        return self.proxy.port

    def reset(self) -> None:
        """Forget what the upstreams recorded."""
        for up in (self.baseline, self.sandbox, self.mirror):
            up.requests.clear()


def stack_config(baseline: str, sandbox: str, mirror: str, dead: int, port: int) -> dict[str, object]:
    """The standard stack's bootstrap config."""
    return {
        "routing": {
            "debug_headers": True,
            "key_sources": [
                {"from": "baggage", "names": ["turnout-session", "sd-routing-key"]},
                {"from": "query", "names": ["turnout-session"]},
                {"from": "cookie", "names": ["turnout-session"]},
            ],
        },
        "listeners": [inbound("users-in", port, "users", baseline)],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 5.0},
        "sessions": [
            {"id": "steal-1", "key": "steal", "routes": [{"service": "users", "destination": sandbox}]},
            {"id": "mirror-1", "key": "mirror", "routes": [
                {"service": "users", "destination": mirror, "mode": "mirror"}]},
            {"id": "dead-fallback", "key": "dead-fb", "routes": [
                {"service": "users", "destination": f"127.0.0.1:{dead}", "fallback": "baseline"}]},
            {"id": "dead-error", "key": "dead-err", "routes": [
                {"service": "users", "destination": f"127.0.0.1:{dead}", "fallback": "error"}]},
            {"id": "bob-filter", "routes": [{"service": "users", "destination": sandbox,
                                             "match": {"header": {"name": "x-user", "exact": "bob"}}}]},
        ],
    }


@pytest.fixture
def upstream_pair() -> Iterator[tuple[RecordingUpstream, RecordingUpstream]]:
    """A recording baseline and sandbox, stopped after the test."""
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    try:
        yield baseline, sandbox
    finally:
        baseline.stop()
        sandbox.stop()


@pytest.fixture(scope="module", params=CODECS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The standard stack, once per codec per test module."""
    baseline = RecordingUpstream("baseline")
    sandbox = RecordingUpstream("sandbox")
    mirror = RecordingUpstream("mirror")
    dead = closed_port()
    tmp: Path = tmp_path_factory.mktemp("stack")
    config = stack_config(baseline.address, sandbox.address, mirror.address, dead, free_port())
    try:
        with running_proxy(config, tmp, codec=str(request.param)) as proxy:
            yield Stack(proxy, baseline, sandbox, mirror, str(request.param), dead)
    finally:
        for up in (baseline, sandbox, mirror):
            up.stop()
