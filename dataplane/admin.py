"""Admin endpoints: a small HTTP/1.1 server, a client for the workers' admin sockets, and
``WorkerAdmin``, the endpoints one proxy answers (``/ready``, ``/metrics``,
``/config_dump``, ``/explain``).

Admin traffic is rare and small, so this uses asyncio streams and h11; the proxy's data
path never goes through here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import h11

from filters import RequestHead

if TYPE_CHECKING:
    from dataplane.proxy import Proxy

Response = tuple[int, str, bytes]
Handler = Callable[[str, str, dict[str, list[str]], bytes], Awaitable[Response]]

_MAX_ADMIN_BODY_BYTES = 1 << 20  # /explain bodies are a few headers


def json_response(status: int, data: Any) -> Response:
    """A JSON reply."""
    return status, "application/json", (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def text_response(status: int, text: str) -> Response:
    """A plain-text reply."""
    return status, "text/plain; charset=utf-8", text.encode()


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler,
                           max_body_bytes: int = _MAX_ADMIN_BODY_BYTES) -> None:
    """Serve admin requests on one connection until it closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), timeout=30)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > max_body_bytes:
                        raise h11.RemoteProtocolError("body too large", 413)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if request is None:
                return
            url = urlsplit(request.target.decode("latin-1"))
            query: dict[str, list[str]] = {}
            for k, v in parse_qsl(url.query, keep_blank_values=True):
                query.setdefault(k, []).append(v)
            try:
                status, ctype, payload = await handler(request.method.decode(), url.path, query, bytes(body))
            except Exception as exc:  # an admin bug must not kill the admin listener
                status, ctype, payload = text_response(500, f"admin error: {exc}\n")
            headers = [("content-type", ctype), ("content-length", str(len(payload)))]
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=payload)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, TimeoutError, ConnectionError, h11.LocalProtocolError):
        return
    finally:
        writer.close()


async def fetch_unix(path: str, method: str, target: str, body: bytes = b"", timeout_s: float = 5.0) -> Response:
    """One request to a worker's admin socket; returns (status, content type, body)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            head = (f"{method} {target} HTTP/1.1\r\nhost: worker\r\nconnection: close\r\n"
                    f"content-length: {len(body)}\r\n\r\n").encode("latin-1")
            writer.write(head + body)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
    # The worker's own admin server answered with Content-Length and closed: the head is
    # plain enough to read without a parser (h11 here cost a third of a push's CPU).
    head, sep, payload = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        return 502, "text/plain", b"malformed answer from the worker\n"
    ctype = "text/plain"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            ctype = value.strip().decode("latin-1")
    return int(parts[1]), ctype, payload


class WorkerAdmin:
    """The admin endpoints of one proxy (a worker's, or the one-process proxy's)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """Answer one admin request."""
        proxy = self.proxy
        if path == "/ready":
            ready = proxy.ready and not proxy.draining
            return text_response(200 if ready else 503, "ready\n" if ready else "not ready\n")
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", proxy.metrics.exposition()
        if path == "/config_dump":
            return json_response(200, proxy.config_dump())
        if path == "/explain":
            return self.explain(query, body)
        return text_response(404, "unknown admin path; try /ready /healthz /metrics /config_dump /explain\n")

    def explain(self, query: dict[str, list[str]], body: bytes) -> Response:
        """``/explain``: the routing decision for a described request, step by step, on the
        sessions this proxy serves now (pushed ones included), and the state of the
        destination it picks (ejected or not, the protocol it is spoken to in)."""
        spec: Any = {}
        if body:
            try:
                spec = json.loads(body)
            except ValueError:
                return text_response(400, "body must be JSON: {service, method, path, headers}\n")
            if not isinstance(spec, dict):
                return text_response(400, "body must be a JSON object\n")
        service = spec.get("service") or (query.get("service") or [""])[0]
        if not service:
            return text_response(400, "give service=NAME (query) or {\"service\": ...} (JSON body)\n")
        method = spec.get("method") or (query.get("method") or ["GET"])[0]
        target = spec.get("path") or (query.get("path") or ["/"])[0]
        pairs: list[tuple[str, str]] = []
        headers = spec.get("headers") or {}
        if isinstance(headers, dict):
            pairs.extend((str(k), str(v)) for k, v in headers.items())
        for item in query.get("header", []):
            name, _, value = item.partition(":")
            pairs.append((name.strip(), value.strip()))
        proxy = self.proxy
        runtime = proxy.runtime
        head = RequestHead.from_pairs(str(method), str(target), pairs)
        report = runtime.snapshot.explain(str(service), head, time.time())
        decision = report["decision"]
        if decision.get("kind") == "sandbox":
            key = decision["destination"]
            ejected = [o for o in proxy.upstreams.outliers.report(proxy.loop.time())
                       if o["destination"] == key and o["ejected_for_s"] > 0]
            if ejected:
                fallback = decision.get("fallback")
                decision["ejected"] = ejected[0]
                report["outlier"] = (f"{key} is ejected for another {ejected[0]['ejected_for_s']:g} s after repeated "
                                     f"failures ({ejected[0]['last_cause']}): "
                                     + ("baseline answers" if fallback == "baseline" else "503 at once"))
        listeners = [lst for lst in runtime.config.listeners if lst.mode == "outbound" or lst.service == service]
        if listeners:
            route_protocol = decision.get("upstream_protocol") if decision.get("kind") != "baseline" else None
            report["upstream_protocol"] = route_protocol or listeners[0].upstream_protocol
        return json_response(200, report)
