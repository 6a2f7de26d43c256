"""Error replies reach clients that are still sending, and http.client sees clean errors."""

from __future__ import annotations

import http.client

from tests.integration.conftest import Stack


def test_error_reply_reaches_a_client_still_sending_its_body(stack: Stack) -> None:
    # turnout refuses the head at once (417), while the client goes on writing a 4 MiB body
    # before it reads anything, as http.client does. Closing right after the reply would
    # make the client's writes fail (EPIPE / reset) and it would never see the 417;
    # turnout sends FIN and reads and discards the rest for lingering_timeout_s instead.
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        conn.putrequest("POST", "/upload")
        conn.putheader("Content-Length", str(4 << 20))
        conn.putheader("Expect", "something-else")
        conn.endheaders()
        conn.send(b"x" * (4 << 20))
        resp = conn.getresponse()
        assert resp.status == 417
        assert resp.getheader("x-turnout-error") == "expectation_failed"
        assert b"100-continue" in resp.read()
    finally:
        conn.close()


def test_http_client_gets_status_and_cause(stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        conn.request("GET", "/e", headers={"baggage": "turnout-session=dead-err"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 503
        assert resp.getheader("x-turnout-error") == "connect_failed; session=dead-error"
        assert b"connect to 127.0.0.1:" in body
        conn.request("GET", "/ok")  # an upstream error keeps the client connection usable
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("x-upstream") == "baseline"
        resp.read()
    finally:
        conn.close()
