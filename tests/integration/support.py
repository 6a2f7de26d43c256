"""Real servers and clients for integration tests: a recording upstream, the proxy as a
subprocess, raw-socket helpers. Everything listens on 127.0.0.1 ephemeral ports and is
stopped by the fixture that started it, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """An ephemeral port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A port with nothing listening (connections are refused)."""
    return free_port()


@dataclass
class Received:
    """One request as the upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str

    def header(self, name: str) -> str | None:
        """The comma-joined value of a header, or None."""
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None

    def header_names(self) -> list[str]:
        """Every header name, in order."""
        return [n for n, _ in self.headers]


class RawUpstream:
    """A raw-socket HTTP/1.1 upstream on 127.0.0.1 that records every byte it reads, one entry
    per connection, and leaves what to do with each request head to ``answer`` (no parser in
    between: it sees exactly what the proxy sent, and may answer before reading a body)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []  # bytes received, one entry per connection
        self.heads: list[bytes] = []  # every request head, without its blank line
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def answer(self, conn: socket.socket, index: int, head: bytes, rest: bytes) -> bytes | None:
        """Answer one request (``rest``: the bytes after its head); return the bytes after
        what it consumed, or None to end the connection."""
        raise NotImplementedError

    def received(self) -> bytes:
        """Every byte received so far, on every connection."""
        with self._lock:
            return b"".join(self.raw)

    def clear(self) -> None:
        """Forget what was received (open connections keep recording)."""
        with self._lock:
            self.raw = [b"" for _ in self.raw]

    def recv(self, conn: socket.socket, index: int) -> bytes:
        """Read from connection ``index``, recording what came."""
        data = conn.recv(65536)
        with self._lock:
            self.raw[index] += data
        return data

    def read_to(self, conn: socket.socket, index: int, buf: bytes, length: int) -> bytes | None:
        """``buf`` with at least ``length`` bytes, or None when the connection ends first."""
        while len(buf) < length:
            data = self.recv(conn, index)
            if not data:
                return None
            buf += data
        return buf

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.raw.append(b"")
                index = len(self.raw) - 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        buf: bytes | None = b""
        with contextlib.suppress(OSError), conn:
            while buf is not None:
                while b"\r\n\r\n" not in buf:
                    data = self.recv(conn, index)
                    if not data:
                        return
                    buf += data
                head, rest = buf.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.heads.append(head)
                buf = self.answer(conn, index, head, rest)

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


Reply = tuple[int, list[tuple[str, str]], bytes]
Handler = Callable[[Received], "Reply | bytes | None"]


class RecordingUpstream:
    """An HTTP/1.1 server that records every request and every raw byte it receives.

    The default answer is 200 with ``x-upstream: <label>`` and a JSON body describing
    the request. A handler may return a (status, headers, body) reply, raw bytes to write
    as the whole response, or None to close without answering.
    """

    def __init__(self, label: str, handler: Handler | None = None) -> None:
        self.label = label
        self.handler = handler
        self.requests: list[Received] = []
        self.raw: list[bytes] = []  # bytes received, one entry per connection
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(512)
        self.port = int(self._sock.getsockname()[1])
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                index = len(self.raw)
                self.raw.append(b"")
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, index: int) -> None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = conn.recv(1 << 16)
                    with self._lock:
                        self.raw[index] += data
                    parser.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    received = Received(
                        request.method.decode(), request.target.decode(),
                        [(n.decode(), v.decode("latin-1")) for n, v in request.headers], bytes(body),
                        request.http_version.decode(),
                    )
                    with self._lock:
                        self.requests.append(received)
                    if not self._answer(conn, parser, received):
                        return
                    if parser.our_state is h11.MUST_CLOSE:
                        return
                    parser.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (OSError, h11.ProtocolError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _answer(self, conn: socket.socket, parser: h11.Connection, received: Received) -> bool:
        reply = self.handler(received) if self.handler else self.default_reply(received)
        if reply is None:
            return False
        if isinstance(reply, bytes):
            conn.sendall(reply)
            return False
        status, headers, body = reply
        all_headers = [("x-upstream", self.label), *headers]
        if not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
            all_headers.append(("content-length", str(len(body))))
        # One write: a head and a body written apart meet Nagle's algorithm and the proxy's
        # delayed ACK, which held every keep-alive answer 40 ms.
        out = parser.send(h11.Response(status_code=status, headers=all_headers)) or b""
        if body and received.method != "HEAD":
            out += parser.send(h11.Data(data=body)) or b""
        conn.sendall(out + (parser.send(h11.EndOfMessage()) or b""))
        return True

    def default_reply(self, received: Received) -> Reply:
        """200 with a JSON description of the request."""
        body = json.dumps({"upstream": self.label, "method": received.method, "target": received.target,
                           "headers": received.headers, "body_bytes": len(received.body)}).encode()
        return 200, [("content-type", "application/json")], body

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()

    def last(self) -> Received:
        """The most recent request."""
        assert self.requests, f"upstream {self.label} received no request"
        return self.requests[-1]


@dataclass
class ProxyProcess:
    """``turnout proxy`` running as a subprocess."""

    config_path: Path
    port: int
    admin_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL of the first listener."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        """Base URL of the admin listener."""
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET an admin path; returns (status, body)."""
        try:
            with urllib.request.urlopen(self.admin + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        """What the proxy printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the supervisor and wait; kills it if it does not exit in time."""
        return stop_process(self.process, sig, timeout_s)


def stop_process(process: subprocess.Popen[Any], sig: int, timeout_s: float) -> int:
    """Signal ``process`` (unless it has exited) and wait for its exit status; if it is still
    running after ``timeout_s``, kill it and raise ``subprocess.TimeoutExpired``."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise
    return process.returncode


def start_proxy(config: dict[str, Any], tmp: Path, codec: str = "auto", workers: int = 1,
                wait_ready: bool = True) -> ProxyProcess:
    """Write the config, start the proxy, wait for /ready. The caller must ``stop()`` it."""
    config = dict(config)
    admin_port = free_port()
    config.setdefault("admin", {"address": f"127.0.0.1:{admin_port}"})
    admin_port = int(config["admin"]["address"].rsplit(":", 1)[1])
    path = tmp / f"turnout-{admin_port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp / f"turnout-{admin_port}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dataplane.cli", "proxy", "--config", str(path), "--http", codec,
             "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    port = int(config["listeners"][0]["address"].rsplit(":", 1)[1])
    proxy = ProxyProcess(path, port, admin_port, process, log_path,
                         {lst["name"]: int(lst["address"].rsplit(":", 1)[1]) for lst in config["listeners"]})
    if wait_ready:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError("proxy exited during start:\n" + proxy.log())
            with contextlib.suppress(OSError):
                if proxy.admin_get("/ready")[0] == 200:
                    break
            if time.monotonic() > deadline:
                proxy.stop(signal.SIGKILL)
                raise RuntimeError("proxy not ready in 20 s:\n" + proxy.log())
            time.sleep(0.05)
    return proxy


@contextlib.contextmanager
def running_proxy(config: dict[str, Any], tmp: Path, codec: str = "auto", workers: int = 1) -> Iterator[ProxyProcess]:
    """A proxy for the duration of a ``with`` block, stopped even on failure."""
    proxy = start_proxy(config, tmp, codec, workers)
    try:
        yield proxy
    finally:
        with contextlib.suppress(Exception):
            proxy.stop()
        if proxy.process.poll() is None:
            proxy.process.kill()


def inbound(name: str, port: int, service: str, baseline: str) -> dict[str, Any]:
    """An inbound listener spec."""
    return {"name": name, "address": f"127.0.0.1:{port}", "mode": "inbound", "service": service,
            "baseline": baseline}


def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0, shutdown_write: bool = False) -> bytes:
    """Send raw bytes, read until the proxy closes (or the timeout), return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        if shutdown_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                chunks.append(b"<RST>")
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass
class Response:
    """One parsed HTTP/1.1 response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """Comma-joined header value, or None."""
        values = [v for n, v in self.headers if n == name.lower()]
        return ", ".join(values) if values else None


def parse_responses(data: bytes, head_request: bool = False) -> list[Response]:
    """Split a byte stream into responses (Content-Length, chunked or until close)."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end == -1:
            raise AssertionError(f"incomplete response head: {data[:200]!r}")
        head, data = data[:end], data[end + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            n, _, v = line.partition(b":")
            headers.append((n.strip().lower().decode(), v.strip().decode("latin-1")))
        hmap = {n: v for n, v in headers}
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif hmap.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                line_end = data.find(b"\r\n")
                size = int(data[:line_end].split(b";")[0], 16)
                data = data[line_end + 2 :]
                if size == 0:
                    trailer_end = data.find(b"\r\n")
                    while trailer_end != 0:
                        data = data[trailer_end + 2 :]
                        trailer_end = data.find(b"\r\n")
                    data = data[2:]
                    break
                body += data[:size]
                data = data[size + 2 :]
        elif "content-length" in hmap:
            length = int(hmap["content-length"])
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""
        out.append(Response(status, headers, body))
    return out
