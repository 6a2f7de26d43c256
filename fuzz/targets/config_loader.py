"""The proxy's bootstrap file loader (dataplane/config.py ``load_config``, with the routing
rules and sessions of dataplane/rules.py and filters/ under it) on arbitrary file bytes:
a ``ProxyConfig`` or ``ConfigError`` listing the problems, never another exception. What
it accepts holds up: every limit is a positive finite number, and the config's sessions
compile into its snapshot.

The bytes are written to a file, as an operator's file would be read (its encoding
included).
"""

from __future__ import annotations

import dataclasses
import math

from dataplane.config import ProxyConfig, load_config
from dataplane.rules import ConfigError
from fuzz.targets._files import as_file

NOW = 1_800_000_000.0


def _check(config: ProxyConfig) -> None:
    for limit in dataclasses.fields(config.limits):
        value = getattr(config.limits, limit.name)
        assert isinstance(value, (int, float)) and 0 < value < math.inf, f"limits.{limit.name} = {value!r}"
    assert config.listeners, "a config without listeners"


def fuzz_one(data: bytes) -> None:
    """Load ``data`` as a bootstrap file."""
    try:
        config = load_config(as_file(data), now=NOW)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError naming no problem"
        return
    _check(config)


def seeds() -> list[bytes]:
    """Bootstrap files of every section, valid and nearly so."""
    base = """listeners:
  - name: users
    address: 127.0.0.1:15001
    service: users
    baseline: 127.0.0.1:8080
    upstream_protocol: http2
"""
    texts = [
        base,
        base + """admin: {address: 127.0.0.1:15000}
limits:
  header_read_timeout_s: 10
  max_head_bytes: 65536
access_log: {path: "-"}
tracing: {exporter: console, sampling_ratio: 0.5}
routing:
  debug_headers: true
  key_sources:
    - {from: baggage, names: [turnout-session, sd-routing-key]}
    - {from: cookie, names: [turnout-session]}
  baggage_max_members: 32
sessions:
  - id: fix-1
    key: abc
    expires_at: 2030-01-01T00:00:00Z
    routes:
      - service: users
        destination: 10.0.0.5:8080
        mode: mirror
        match:
          all_of:
            - header: {name: x-user, exact: alice}
            - path: {regex: "^/api/(v1|v2)/"}
  - id: filter-only
    routes:
      - {service: users, destination: "[::1]:9000", priority: 5, match: {method: {exact: POST}}}
""",
        """listeners:
  - {address: 0.0.0.0:15002, mode: outbound, authorities: {"users.default": users}}
control_plane: {address: cp.turnout:18000, protocol: sotw, tls: {server_name: cp}, node_id: n1}
limits: {header_read_timeout_s: .inf, max_head_bytes: 1e3}
""",
        base + "limits: {header_read_timeout_s: .nan}\n",
        base + "sessions: [{id: a, key: k, routes: [{service: users, destination: 'h:1'}], ttl_s: 1e400}]\n",
        base + "sessions: [{id: a, key: k, routes: [{service: users, destination: 'h:1'}], expires_at: "
               "1" + "0" * 400 + "}]\n",
        base + "listeners: [*a]\n",
        "a: &a [*a]\n",
        "[" * 50 + "]" * 50,
        base + "sessions: &s\n  - id: x\n    routes: *s\n",
    ]
    return [text.encode() for text in texts] + [b"\xff\xfe" + base.encode("utf-16-le")]
