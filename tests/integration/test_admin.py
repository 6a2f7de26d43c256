"""The admin listener of a running proxy: /healthz, /ready, /metrics, /config_dump,
/explain, through the supervisor and its two workers."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.support import ProxyProcess, RecordingUpstream, closed_port, free_port, inbound, running_proxy
from tests.integration.test_lifecycle import (
    Conn,
    config_dump,
    metric_samples,
    read_until_eof,
    slow_upstream,
    wait_until,
)

FAMILIES = {
    "turnout_requests": "counter",
    "turnout_request_duration_seconds": "histogram",
    "turnout_upstream_errors": "counter",
    "turnout_downstream_errors": "counter",
    "turnout_local_replies": "counter",
    "turnout_fallbacks": "counter",
    "turnout_mirror_requests": "counter",
    "turnout_open_connections": "gauge",
    "turnout_connections_refused": "counter",
    "turnout_snapshot_info": "gauge",
    "turnout_sessions": "gauge",
    "turnout_config_reloads": "counter",
}


@dataclass
class AdminStack:
    proxy: ProxyProcess
    baseline: RecordingUpstream
    sandbox: RecordingUpstream
    dead: int

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminStack]:
    """Two workers; sessions: k1 -> sandbox, gone -> a dead port (fallback error), a filter-only one."""
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    dead = closed_port()
    config = {
        "listeners": [inbound("users-in", free_port(), "users", baseline.address)],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 5.0},
        "sessions": [
            {"id": "s1", "key": "k1", "routes": [{"service": "users", "destination": sandbox.address}]},
            {"id": "gone", "key": "gone", "routes": [
                {"service": "users", "destination": f"127.0.0.1:{dead}", "fallback": "error"}]},
            {"id": "writes", "routes": [{"service": "users", "destination": sandbox.address, "match": {
                "all_of": [{"method": "POST"}, {"path": {"prefix": "/api"}},
                           {"header": {"name": "x-user", "exact": "bob"}}]}}]},
        ],
    }
    try:
        with running_proxy(config, tmp_path_factory.mktemp("admin"), workers=2) as proxy:
            yield AdminStack(proxy, baseline, sandbox, dead)
    finally:
        baseline.stop()
        sandbox.stop()


def totals(stack: AdminStack, sample: str, **match: str) -> float:
    """Sum of a sample over every worker (and any label not given)."""
    return sum(v for labels, v in metric_samples(stack.proxy, sample)
               if all(labels.get(k) == want for k, want in match.items()))


# ---------------------------------------------------------------------------- health


def test_healthz_is_200(admin_stack: AdminStack) -> None:
    assert admin_stack.proxy.admin_get("/healthz") == (200, "ok\n")


def test_ready_is_200_and_lists_every_worker(admin_stack: AdminStack) -> None:
    status, body = admin_stack.proxy.admin_get("/ready")
    assert status == 200, body
    assert body.startswith("ready\n")
    assert "worker 0: ready" in body and "worker 1: ready" in body


def test_unknown_admin_path_is_404(admin_stack: AdminStack) -> None:
    status, body = admin_stack.proxy.admin_get("/nope")
    assert status == 404
    assert "/metrics" in body  # points at what exists
    assert admin_stack.proxy.admin_get("/healthz")[0] == 200


# ---------------------------------------------------------------------------- metrics


def test_metrics_is_valid_prometheus_text_with_each_family_once(admin_stack: AdminStack) -> None:
    with httpx.Client(base_url=admin_stack.proxy.url, timeout=10) as client:
        assert client.get("/warm").status_code == 200
    r = httpx.get(admin_stack.proxy.admin + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    families = list(text_string_to_metric_families(text))  # raises on malformed text
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"families repeated: {sorted(n for n in names if names.count(n) > 1)}"
    type_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)), "a # TYPE line repeated"
    help_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(help_lines) == len(set(help_lines)), "a # HELP line repeated"
    types = {f.name: f.type for f in families}
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    # Every sample of every turnout family says which worker it comes from.
    unlabelled = [s for f in families if f.name.startswith("turnout_") for s in f.samples if "worker" not in s.labels]
    assert not unlabelled, unlabelled[:5]


def test_metrics_count_requests_by_service_route_and_status_class(admin_stack: AdminStack) -> None:
    def counts() -> tuple[float, ...]:
        return (totals(admin_stack, "turnout_requests_total", service="users", route="baseline", status_class="2xx"),
                totals(admin_stack, "turnout_requests_total", service="users", route="sandbox", status_class="2xx"),
                totals(admin_stack, "turnout_requests_total", service="users", route="sandbox", status_class="5xx"),
                totals(admin_stack, "turnout_request_duration_seconds_count", service="users", route="baseline"),
                totals(admin_stack, "turnout_request_duration_seconds_count", service="users", route="sandbox"),
                totals(admin_stack, "turnout_upstream_errors_total", service="users", route="sandbox",
                       cause="connect_failed"))

    before = counts()
    conn = Conn(admin_stack.port)
    try:
        for i in range(3):
            assert conn.request(f"/m/base/{i}").status == 200
        for i in range(2):
            assert conn.request(f"/m/sb/{i}", {"baggage": "turnout-session=k1"}).status == 200
        dead = conn.request("/m/dead", {"baggage": "turnout-session=gone"})
        assert dead.status == 503 and dead.headers["x-turnout-error"] == "connect_failed; session=gone"
    finally:
        conn.close()
    want = (3, 2, 1, 3, 3, 1)

    def delta() -> tuple[float, ...]:
        return tuple(a - b for a, b in zip(counts(), before, strict=True))

    assert wait_until(lambda: delta() == want, 5), f"metric deltas {delta()} != {want}"

    # The histogram is well formed: cumulative buckets ending in +Inf == _count.
    _, text = admin_stack.proxy.admin_get("/metrics")
    (hist,) = [f for f in text_string_to_metric_families(text) if f.name == "turnout_request_duration_seconds"]
    series: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    counts_by: dict[tuple[str, ...], float] = {}
    for s in hist.samples:
        key = (s.labels["worker"], s.labels["service"], s.labels["route"])
        if s.name.endswith("_bucket"):
            series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            counts_by[key] = s.value
        elif s.name.endswith("_sum"):
            assert s.value >= 0
    assert series
    for series_key, buckets in series.items():
        buckets.sort()
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{series_key}: buckets not cumulative {buckets}"
        assert buckets[-1][0] == float("inf") and buckets[-1][1] == counts_by[series_key], series_key


def test_metrics_have_samples_from_both_workers(admin_stack: AdminStack) -> None:
    def workers_seen() -> set[str]:
        return {labels["worker"] for labels, v in metric_samples(admin_stack.proxy, "turnout_requests_total") if v}

    # Fresh connections spread over the workers (SO_REUSEPORT hashes each one).
    deadline = time.monotonic() + 30
    for i in range(300):
        if workers_seen() == {"0", "1"} or time.monotonic() > deadline:
            break
        for _ in range(5):
            httpx.get(f"{admin_stack.proxy.url}/spread/{i}", timeout=10)
    assert workers_seen() == {"0", "1"}
    for sample in ("turnout_open_connections", "turnout_sessions", "turnout_snapshot_info",
                   "turnout_connections_refused_total"):
        assert {labels["worker"] for labels, _ in metric_samples(admin_stack.proxy, sample)} == {"0", "1"}, sample
    sessions = metric_samples(admin_stack.proxy, "turnout_sessions")
    assert sorted(v for _, v in sessions) == [3.0, 3.0]
    info = metric_samples(admin_stack.proxy, "turnout_snapshot_info")
    assert sorted((labels["worker"], labels["version"], v) for labels, v in info) == [
        ("0", "bootstrap", 1.0), ("1", "bootstrap", 1.0)]


def test_open_connections_gauge_follows_client_connections(admin_stack: AdminStack) -> None:
    def open_now() -> float:
        return sum(v for _, v in metric_samples(admin_stack.proxy, "turnout_open_connections"))

    assert wait_until(lambda: open_now() == 0, 10), f"gauge at rest is {open_now()}"
    conns = [Conn(admin_stack.port) for _ in range(3)]
    try:
        for i, c in enumerate(conns):
            assert c.request(f"/open/{i}").status == 200
        assert wait_until(lambda: open_now() == 3, 5), open_now()
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: open_now() == 0, 5), open_now()


def test_refused_connections_leave_the_open_connections_gauge_right(tmp_path: Path) -> None:
    base = RecordingUpstream("baseline")
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)],
              "limits": {"max_connections_per_worker": 2}}
    try:
        with running_proxy(config, tmp_path) as proxy:
            conns = [Conn(port) for _ in range(2)]
            try:
                for c in conns:
                    assert c.request("/held").status == 200
                for _ in range(3):
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        closed, data = read_until_eof(s, 5)
                    assert closed and data.startswith(b"HTTP/1.1 503"), data
                refused = sum(v for _, v in metric_samples(proxy, "turnout_connections_refused_total"))
                assert refused == 3
                gauge = sum(v for _, v in metric_samples(proxy, "turnout_open_connections"))
                assert gauge == 2, (
                    f"2 client connections are open but turnout_open_connections says {gauge}: each refused "
                    "connection is subtracted without ever having been added")
            finally:
                for c in conns:
                    c.close()
    finally:
        base.stop()


# ---------------------------------------------------------------------------- config_dump


def test_config_dump_has_listeners_limits_sessions_and_workers(admin_stack: AdminStack) -> None:
    dump = config_dump(admin_stack.proxy)
    config = dump["config"]
    (listener,) = config["listeners"]
    assert listener == {"name": "users-in", "address": f"127.0.0.1:{admin_stack.port}", "mode": "inbound",
                        "service": "users", "baseline": admin_stack.baseline.address, "authorities": {},
                        "upstream_protocol": "http1", "tls": False}
    assert config["limits"]["upstream_connect_timeout_s"] == 2.0
    assert config["limits"]["upstream_response_timeout_s"] == 5.0
    assert config["limits"]["max_connections_per_worker"] == 4096  # defaults are shown too
    sessions = {s["id"]: s for s in config["snapshot"]["sessions"]}
    assert set(sessions) == {"s1", "gone", "writes"}
    assert sessions["s1"]["key"] == "k1"
    assert sessions["s1"]["routes"][0]["destination"] == admin_stack.sandbox.address
    assert sessions["gone"]["routes"][0]["fallback"] == "error"
    assert "match" in sessions["writes"]["routes"][0]
    assert config["snapshot"]["version"] == "bootstrap"
    workers = sorted(dump["workers"], key=lambda w: w["index"])
    assert [w["index"] for w in workers] == [0, 1]
    assert all(isinstance(w["pid"], int) and w["up"] and w["restarts"] == 0 for w in workers)
    assert workers[0]["pid"] != workers[1]["pid"]
    assert config["pid"] in {w["pid"] for w in workers}
    assert dump["reloads"] == {"ok": 0, "invalid": 0}
    assert config["draining"] is False


# ---------------------------------------------------------------------------- explain


def test_explain_by_query_shows_key_source_session_and_decision(admin_stack: AdminStack) -> None:
    status, body = admin_stack.proxy.admin_get("/explain?service=users&header=baggage:turnout-session%3Dk1")
    assert status == 200, body
    report = json.loads(body)
    assert report["service"] == "users"
    assert report["key"] == {"value": "k1", "where": "baggage member turnout-session"}
    baggage = next(s for s in report["key_sources"] if s["source"] == "baggage")
    assert baggage["found"]["value"] == "k1"
    assert report["keyed"] == "session s1 matched"
    assert report["decision"]["kind"] == "sandbox"
    assert report["decision"]["session"] == "s1"
    assert report["decision"]["destination"] == admin_stack.sandbox.address

    status, body = admin_stack.proxy.admin_get("/explain?service=users&header=baggage:turnout-session%3Dnobody")
    report = json.loads(body)
    assert "no session has key 'nobody'" in report["keyed"]
    assert report["decision"]["kind"] == "baseline"


def test_explain_by_json_body_uses_method_path_and_headers(admin_stack: AdminStack) -> None:
    url = admin_stack.proxy.admin + "/explain"
    spec = {"service": "users", "method": "POST", "path": "/api/orders", "headers": {"x-user": "bob"}}
    r = httpx.post(url, json=spec, timeout=10)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["key"] is None and report["keyed"] == "no routing key in the request"
    assert report["filters"] == [{"session": "writes", "priority": 0, "result": "matched"}]
    assert (report["decision"]["kind"], report["decision"]["session"]) == ("sandbox", "writes")
    # Same headers, another method: the filter says why it does not match.
    report = httpx.post(url, json=dict(spec, method="GET"), timeout=10).json()
    assert report["filters"][0]["result"].startswith("no match")
    assert report["decision"]["kind"] == "baseline"
    # A key in the body's headers takes the keyed path.
    report = httpx.post(url, json=dict(spec, headers={"baggage": "turnout-session=gone"}), timeout=10).json()
    assert report["decision"]["session"] == "gone" and report["decision"]["fallback"] == "error"


def test_explain_refuses_bad_requests(admin_stack: AdminStack) -> None:
    url = admin_stack.proxy.admin + "/explain"
    assert httpx.get(url, timeout=10).status_code == 400  # no service
    bad = httpx.post(url, content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "JSON" in bad.text
    assert httpx.post(url, content=b"[1, 2]", timeout=10).status_code == 400
    assert admin_stack.proxy.admin_get("/healthz")[0] == 200


# ---------------------------------------------------------------------------- drain


def test_ready_says_draining_during_a_sigterm_drain(tmp_path: Path) -> None:
    up = slow_upstream("slow", 3.0)
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", up.address)], "limits": {"drain_timeout_s": 15}}
    result: dict[str, Any] = {}
    try:
        with running_proxy(config, tmp_path) as proxy:
            def one() -> None:
                conn = Conn(port, timeout_s=20)
                try:
                    answer = conn.request("/slow")
                    result["answer"] = answer
                    result["eof"] = conn.wait_eof(5)
                finally:
                    conn.close()

            t = threading.Thread(target=one, daemon=True)
            t.start()
            assert wait_until(lambda: up.requests, 10), "request never reached the upstream"
            proxy.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2.5
            ready: tuple[int, str] | None = None
            while time.monotonic() < deadline and t.is_alive():
                try:
                    ready = proxy.admin_get("/ready")
                except OSError:
                    break
                if ready[0] == 503:
                    break
                time.sleep(0.05)
            t.join(20)
            code = proxy.process.wait(20)
    finally:
        up.stop()
    assert ready is not None and ready[0] == 503 and "draining" in ready[1], ready
    answer = result["answer"]
    assert answer.status == 200 and json.loads(answer.body)["target"] == "/slow"
    assert answer.will_close, "a response finished while draining must say connection: close"
    assert result["eof"] == (True, b"")
    assert code == 0
