"""``turnout demo``: the routing decision on embedded demo sessions, request by request."""

from __future__ import annotations

import time
from typing import TextIO

from dataplane.rules import parse_yaml, snapshot_from_config
from filters import RequestHead

DEMO_CONFIG = """
routing:
  key_sources:
    - {from: baggage, names: [turnout-session, sd-routing-key, mirrord-session]}
    - {from: tracestate, names: [turnout]}
    - {from: query, names: [turnout-session]}
    - {from: cookie, names: [turnout-session]}
sessions:
  - id: fix-123                       # a developer's sandbox of 'users', by key
    key: abc123
    owner: alice@example.com
    ttl_s: 7200
    routes:
      - {service: users, destination: 127.0.0.1:9090, mode: steal, fallback: baseline}
  - id: agent-7                       # a coding agent mirrors 'orders' traffic
    key: agent7
    owner: ci-agent
    routes:
      - {service: orders, destination: 127.0.0.1:9191, mode: mirror}
  - id: bob-writes                    # filter-only, mirrord-style: bob's POSTs only
    priority: 10
    routes:
      - service: users
        destination: 127.0.0.1:9292
        fallback: error
        match:
          all_of:
            - {header: {name: x-user, exact: bob}}
            - {method: [POST, PUT]}
  - id: carol-mirrord                 # a mirrord http_filter brought as it is
    routes:
      - service: users
        destination: 127.0.0.1:9393
        match: {http_filter: {header_filter: "^x-dev: carol"}}
"""

# (service, method, target, headers, what it shows)
DEMO_REQUESTS: list[tuple[str, str, str, list[tuple[str, str]], str]] = [
    ("users", "GET", "/api/users", [], "no routing key: baseline"),
    ("users", "GET", "/api/users", [("baggage", "userId=42,turnout-session=abc123")], "key in W3C baggage"),
    ("users", "GET", "/api/users", [("baggage", "sd-routing-key=abc123")], "Signadot-style member name"),
    ("users", "GET", "/api/users?turnout-session=abc123", [], "key from a shared preview link"),
    ("users", "GET", "/api/users", [("cookie", "theme=dark; turnout-session=abc123")], "key from a cookie"),
    ("orders", "GET", "/api/users", [("baggage", "turnout-session=abc123")],
     "fix-123 forks only 'users'"),
    ("orders", "POST", "/api/orders", [("baggage", "turnout-session=agent7")], "mirror: baseline answers"),
    ("users", "POST", "/api/users", [("x-user", "bob")], "filter-only session"),
    ("users", "GET", "/api/users", [("x-user", "bob")], "filter needs POST or PUT"),
    ("users", "GET", "/", [("X-Dev", "Carol")], "mirrord header_filter, case-insensitive"),
    ("users", "GET", "/", [("baggage", "turnout-session=nope")], "unknown key: baseline"),
]


def run_demo(out: TextIO) -> int:
    """Print the decision for each demo request; returns the process exit status."""
    now = time.time()
    snapshot = snapshot_from_config(parse_yaml(DEMO_CONFIG, "demo config"), "demo-1", now)
    out.write(f"turnout demo: snapshot {snapshot.version}, {len(snapshot.sessions)} sessions "
              f"for services {', '.join(snapshot.services)}\n\n")
    rows = [("SERVICE", "REQUEST", "ROUTE", "WHY")]
    for service, method, target, headers, why in DEMO_REQUESTS:
        head = RequestHead.from_pairs(method, target, headers)
        decision = snapshot.decide(service, head, now)
        shown = " ".join([method, target, *(f"[{k}: {v}]" for k, v in headers)])
        if decision.kind == "baseline":
            route = "baseline"
        else:
            route = f"{decision.kind} {decision.session_id} -> {decision.destination}"
        rows.append((service, shown, route, why))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3] + "\n")
    out.write(
        "\nAsk why a request routes where it does:\n"
        "  turnout explain --service users --header 'baggage: turnout-session=abc123' --demo\n"
        "  turnout explain --service users --method GET --header 'x-user: bob' --demo\n"
    )
    return 0
