"""controlplane.http in-process on a loopback socket: timeouts, limits, keep-alive and shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from controlplane import http
from controlplane.http import HttpServer, Reply, Request, json_reply


def echo(request: Request) -> Reply:
    return json_reply(200, {"method": request.method, "path": request.path, "query": request.query,
                            "body": request.body.decode()})


def run(scenario: Callable[[int, HttpServer], Awaitable[None]],
        handler: Callable[[Request], Reply] = echo) -> None:
    async def main() -> None:
        server = HttpServer(handler)
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
        head = f"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {http.MAX_BODY_BYTES + 1}\r\n\r\n".encode()
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


def test_oversized_head_is_431() -> None:
    async def scenario(port: int, server: HttpServer) -> None:
        # h11 measures what it holds unparsed, so a head passes up to one read (64 KiB) past the limit.
        data = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (3 * http.MAX_HEAD_BYTES) + b"\r\n\r\n"
        status, _, body = split(await exchange(port, data))
        assert status == 431 and json.loads(body)["error"] == "bad_request"

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


def test_an_idle_connection_is_closed_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "IDLE_TIMEOUT_S", 0.2)

    async def scenario(port: int, server: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(3):
                assert await reader.read() == b""
        finally:
            writer.close()

    run(scenario)


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
