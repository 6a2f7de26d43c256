"""controlplane.http in-process on a loopback socket: timeouts, limits, keep-alive, shutdown, and the
pools that keep unauthenticated connections from holding what authenticated callers need."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from controlplane import http
from controlplane.http import Admit, HttpServer, Reply, Request, error_reply, json_reply
from controlplane.identity import Identity
from controlplane.limits import Limits

LIMITS = Limits()
CALLER = Identity("alice", frozenset(), "test")


def echo(request: Request) -> Reply:
    return json_reply(200, {"method": request.method, "path": request.path, "query": request.query,
                            "body": request.body.decode(),
                            "identity": None if request.identity is None else request.identity.name})


async def by_header(request: Request) -> Request | Reply:
    """Requests to /private need 'authorization: ok' (any other path is public)."""
    if not request.path.startswith("/private"):
        return request
    if request.header("authorization") != "ok":
        return error_reply(401, "unauthorized", "no")
    return Request(request.method, request.path, request.query, request.headers, request.body, request.peer, CALLER)


def run(scenario: Callable[[int, HttpServer], Awaitable[None]],
        handler: Callable[[Request], Reply] = echo, limits: Limits | None = None, admit: Admit = by_header) -> None:
    async def main() -> None:
        server = HttpServer(handler, admit, limits)
        _, port = await server.start("127.0.0.1", 0)
        try:
            await scenario(port, server)
        finally:
            await server.close(1.0)

    asyncio.run(main())


async def exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    finally:
        writer.close()


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_pipelined_keep_alive_requests_in_order() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        data = await exchange(port, b"GET /a?x=1&x=2 HTTP/1.1\r\nHost: t\r\n\r\n"
                                    b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
                                    b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        bodies = [json.loads(part[part.index(b"{"):]) for part in data.split(b"HTTP/1.1 ")[1:]]
        assert [(b["method"], b["path"]) for b in bodies] == [("GET", "/a"), ("POST", "/b"), ("GET", "/c")]
        assert bodies[0]["query"] == {"x": ["1", "2"]} and bodies[1]["body"] == "hi"

    run(scenario)


def test_oversized_body_is_413_before_it_is_read() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        head = f"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {LIMITS.max_body_bytes + 1}\r\n\r\n".encode()
        status, headers, body = split(await exchange(port, head))
        assert status == 413 and headers["connection"] == "close" and json.loads(body)["error"] == "too_large"

    run(scenario)


def test_oversized_chunked_body_is_413() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        data = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 17 + b"0\r\n\r\n"
        status, _, body = split(await exchange(port, data))
        assert status == 413 and json.loads(body)["error"] == "too_large"

    run(scenario)


@pytest.mark.parametrize("size", [64 * 1024 + 1, 70_000, 120_000, 3 * 64 * 1024])
def test_a_head_over_the_documented_64_kib_is_431(size: int) -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        start = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: "
        data = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
        assert len(data) == size
        status, _, body = split(await exchange(port, data))
        assert status == 431 and json.loads(body)["error"] == "too_large", size

    run(scenario)


def test_a_head_of_exactly_64_kib_passes() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        start = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: "
        data = start + b"a" * (64 * 1024 - len(start) - 4) + b"\r\n\r\n"
        status, _, _ = split(await exchange(port, data))
        assert status == 200

    run(scenario)


def test_a_trickled_request_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.3)

    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for byte in b"GET / HTTP/1.1\r\nHo":
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)
            async with asyncio.timeout(3):
                status, _, body = split(await reader.read())
            assert status == 408 and json.loads(body)["error"] == "timeout"
        finally:
            writer.close()

    run(scenario)


def test_an_idle_connection_is_closed_quietly() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(3):
                assert await reader.read() == b""
        finally:
            writer.close()

    run(scenario, limits=Limits(unauthenticated_timeout_s=0.2))


def test_a_handler_bug_is_a_json_500() -> None:
    def broken(request: Request) -> Reply:
        raise RuntimeError("bug")

    async def scenario(port: int, server: HttpServer) -> None:
        status, _, body = split(await exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        assert status == 500 and json.loads(body) == {"error": "internal", "message": "internal error: RuntimeError"}

    run(scenario, broken)


def test_expect_100_continue() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
                         b"Connection: close\r\n\r\n")
            async with asyncio.timeout(3):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
                writer.write(b"ok")
                status, _, body = split(await reader.read())
            assert status == 200 and json.loads(body)["body"] == "ok"
        finally:
            writer.close()

    run(scenario)


def test_close_ends_idle_connections_at_once_and_refuses_new_ones() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await reader.readuntil(b"}\n")
        started = asyncio.get_running_loop().time()
        await server.close(5.0)
        assert asyncio.get_running_loop().time() - started < 1, "an idle keep-alive connection is not waited for"
        async with asyncio.timeout(3):
            assert await reader.read() == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(scenario)


# ---------------------------------------------------------------------- who holds connections


async def idle_connections(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(2):
            return await reader.read() == b""
    except (TimeoutError, ConnectionError):
        return False


def test_idle_unauthenticated_connections_cannot_lock_anyone_out() -> None:
    limits = Limits(max_unauthenticated_connections=8, max_unauthenticated_per_source=8)

    async def scenario(port: int, server: HttpServer) -> None:
        idle = await idle_connections(port, 30)
        try:
            await asyncio.sleep(0.1)
            assert server.connections <= 8 + 1 and server.evicted >= 22
            assert all([await closed_by_server(r) for r, _ in idle[:20]]), "the oldest were closed"
            status, _, body = split(await exchange(port, b"GET /private HTTP/1.1\r\nHost: t\r\nauthorization: ok\r\n"
                                                         b"Connection: close\r\n\r\n"))
            assert status == 200 and json.loads(body)["identity"] == "alice"
            status, _, _ = split(await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
            assert status == 200
        finally:
            for _, writer in idle:
                writer.close()

    run(scenario, limits=limits)


def test_one_source_gets_its_share_of_the_unauthenticated_pool() -> None:
    limits = Limits(max_unauthenticated_connections=100, max_unauthenticated_per_source=3)

    async def scenario(port: int, server: HttpServer) -> None:
        idle = await idle_connections(port, 5)
        try:
            await asyncio.sleep(0.1)
            assert server.evicted == 2 and server.connections == 3
            assert [await closed_by_server(r) for r, _ in idle[:2]] == [True, True]
        finally:
            for _, writer in idle:
                writer.close()

    run(scenario, limits=limits)


def test_authentication_happens_before_the_body_is_read() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # A 1 MiB body is announced and never sent: the refusal must not wait for it.
            writer.write(b"POST /private HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n")
            async with asyncio.timeout(3):
                status, headers, body = split(await reader.read())
            assert status == 401 and headers["connection"] == "close" and json.loads(body)["error"] == "unauthorized"
        finally:
            writer.close()

    run(scenario)


def test_an_authenticated_connection_outlives_the_unauthenticated_deadline() -> None:
    limits = Limits(unauthenticated_timeout_s=0.3, idle_timeout_s=5)

    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /private HTTP/1.1\r\nHost: t\r\nauthorization: ok\r\n\r\n")
            await reader.readuntil(b"}\n")
            await asyncio.sleep(0.6)
            writer.write(b"GET /private HTTP/1.1\r\nHost: t\r\nauthorization: ok\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(3):
                assert split(await reader.read())[0] == 200
        finally:
            writer.close()
        # A connection that only ever used public paths is still held to the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            await reader.readuntil(b"}\n")
            assert await closed_by_server(reader)
        finally:
            writer.close()

    run(scenario, limits=limits)


def test_the_authenticated_pool_is_bounded() -> None:
    limits = Limits(max_connections=2)

    async def scenario(port: int, server: HttpServer) -> None:
        held = await idle_connections(port, 3)
        try:
            statuses = []
            for reader, writer in held:
                writer.write(b"GET /private HTTP/1.1\r\nHost: t\r\nauthorization: ok\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                statuses.append(int(head.split()[1]))
            assert statuses == [200, 200, 503]
        finally:
            for _, writer in held:
                writer.close()

    run(scenario, limits=limits)
