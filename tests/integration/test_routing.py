"""Routing through the real proxy: baseline, sandbox, mirror, fallback, key propagation."""

from __future__ import annotations

import json
import subprocess
import time

import httpx

from tests.integration.conftest import Stack
from tests.integration.support import parse_responses, raw_exchange


def get(stack: Stack, path: str = "/", **headers: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{stack.port}{path}", headers=headers, timeout=10)


def test_no_key_goes_to_baseline_untouched(stack: Stack) -> None:
    stack.reset()
    r = get(stack, "/api/users?id=7", accept="application/json")
    assert r.status_code == 200
    assert r.headers["x-upstream"] == "baseline"
    assert r.headers["x-turnout-route"] == "baseline"
    got = stack.baseline.last()
    assert (got.method, got.target) == ("GET", "/api/users?id=7")
    assert got.header("accept") == "application/json"
    assert got.header("x-forwarded-for") == "127.0.0.1"
    assert got.header("x-forwarded-proto") == "http"
    assert not stack.sandbox.requests


def test_baggage_key_steals_to_the_sandbox(stack: Stack) -> None:
    stack.reset()
    r = get(stack, "/x", baggage="userId=alice,turnout-session=steal")
    assert r.headers["x-upstream"] == "sandbox"
    assert r.headers["x-turnout-route"] == "steal-1"
    assert stack.sandbox.last().header("baggage") == "userId=alice,turnout-session=steal"
    assert not stack.baseline.requests


def test_alias_member_and_curl(stack: Stack) -> None:
    out = subprocess.run(
        ["curl", "-s", "-D", "-", "-H", "baggage: sd-routing-key=steal", f"http://127.0.0.1:{stack.port}/c"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    assert "x-upstream: sandbox" in out


def test_unknown_key_goes_to_baseline(stack: Stack) -> None:
    assert get(stack, baggage="turnout-session=nobody").headers["x-upstream"] == "baseline"


def test_filter_only_session(stack: Stack) -> None:
    assert get(stack, **{"x-user": "bob"}).headers["x-upstream"] == "sandbox"
    assert get(stack, **{"x-user": "alice"}).headers["x-upstream"] == "baseline"


def test_query_key_is_added_to_forwarded_baggage(stack: Stack) -> None:
    stack.reset()
    r = get(stack, "/preview?turnout-session=steal", baggage="tenant=acme")
    assert r.headers["x-upstream"] == "sandbox"
    assert stack.sandbox.last().header("baggage") == "tenant=acme,turnout-session=steal"


def test_cookie_key_is_added_as_baggage_when_none_was_sent(stack: Stack) -> None:
    stack.reset()
    r = get(stack, "/", cookie="theme=dark; turnout-session=steal")
    assert r.headers["x-upstream"] == "sandbox"
    assert stack.sandbox.last().header("baggage") == "turnout-session=steal"


def test_mirror_answers_from_baseline_and_copies_to_the_sandbox(stack: Stack) -> None:
    stack.reset()
    r = httpx.post(f"http://127.0.0.1:{stack.port}/orders", content=b'{"n": 1}',
                   headers={"baggage": "turnout-session=mirror"}, timeout=10)
    assert r.headers["x-upstream"] == "baseline"
    assert r.headers["x-turnout-route"] == "mirror-1"
    deadline = time.monotonic() + 5
    while not stack.mirror.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    copy = stack.mirror.last()
    assert (copy.method, copy.target, copy.body) == ("POST", "/orders", b'{"n": 1}')
    assert copy.header("x-turnout-mirror") == "mirror-1"
    assert stack.baseline.last().body == b'{"n": 1}'


def test_dead_sandbox_with_baseline_fallback(stack: Stack) -> None:
    stack.reset()
    r = get(stack, "/fb", baggage="turnout-session=dead-fb")
    assert r.status_code == 200
    assert r.headers["x-upstream"] == "baseline"
    assert stack.baseline.last().target == "/fb"


def test_dead_sandbox_with_error_fallback_names_session_and_cause(stack: Stack) -> None:
    r = get(stack, "/err", baggage="turnout-session=dead-err")
    assert r.status_code == 503
    assert r.headers["x-turnout-error"] == "connect_failed; session=dead-error"
    assert "connect to 127.0.0.1:" in r.text


def test_pipelined_requests_are_routed_each_on_its_own_headers(stack: Stack) -> None:
    stack.reset()
    data = (b"GET /1 HTTP/1.1\r\nHost: a\r\nbaggage: turnout-session=steal\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: a\r\nbaggage: turnout-session=steal\r\nConnection: close\r\n\r\n")
    responses = parse_responses(raw_exchange(stack.port, data))
    assert [r.header("x-upstream") for r in responses] == ["sandbox", "baseline", "sandbox"]
    assert [json.loads(r.body)["target"] for r in responses] == ["/1", "/2", "/3"]


def test_keep_alive_reuses_the_client_connection(stack: Stack) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}", timeout=10) as client:
        seen = [client.get("/k", headers={"baggage": f"turnout-session={k}"}).headers["x-upstream"]
                for k in ("steal", "none", "steal", "none")]
    assert seen == ["sandbox", "baseline", "sandbox", "baseline"]
