"""A small HTTP/1.1 server for admin endpoints, and a client for the workers' admin sockets.

Admin traffic is rare and small, so this uses asyncio streams and h11; the proxy's data
path never goes through here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

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
