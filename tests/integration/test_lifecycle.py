"""The proxy as a process: drain on SIGTERM, reload on SIGHUP, worker crashes, slow and
idle peers, connection caps, config checking and the access log.

Every test starts its own ``turnout proxy`` subprocess (these tests change limits,
signal the supervisor or kill workers) and every wait is a poll with a deadline, because
other suites run on the same two cores at the same time.
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
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CODECS
from tests.integration.support import (
    ROOT,
    ProxyProcess,
    Received,
    RecordingUpstream,
    Reply,
    closed_port,
    free_port,
    inbound,
    parse_responses,
    running_proxy,
)

# ---------------------------------------------------------------------------- helpers


class ConnFailed(Exception):
    """A request that got no complete response; ``got`` counts the response bytes seen."""

    def __init__(self, kind: str, got: int) -> None:
        super().__init__(f"{kind} after {got} response byte(s)")
        self.kind = kind
        self.got = got


@dataclass
class Answer:
    """One complete response read by ``Conn``."""

    status: int
    headers: dict[str, str]
    body: bytes
    will_close: bool  # the response said connection: close (or HTTP/1.0 without keep-alive)


class Conn:
    """A keep-alive HTTP/1.1 client connection on a raw socket, parsed with h11.

    Unlike a pooling client it never retries or reconnects behind our back, so a test can
    tell a truncated response from a refused connection from a closed idle one.
    """

    def __init__(self, port: int, timeout_s: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.h11 = h11.Connection(h11.CLIENT)
        self.served = 0
        self.opened_at = time.monotonic()

    def request(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
                body: bytes = b"") -> Answer:
        pairs = [("host", "turnout.test"), *(headers or {}).items()]
        if body or method in ("POST", "PUT"):
            pairs.append(("content-length", str(len(body))))
        out = self.h11.send(h11.Request(method=method, target=path, headers=pairs)) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        try:
            self.sock.sendall(out)
        except OSError as exc:
            raise ConnFailed("send " + type(exc).__name__, 0) from None
        got = 0
        response: h11.Response | None = None
        data = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnFailed(f"protocol error ({exc})", got) from None
            if event is h11.NEED_DATA:
                try:
                    chunk = self.sock.recv(65536)
                except OSError as exc:
                    raise ConnFailed("recv " + type(exc).__name__, got) from None
                got += len(chunk)
                self.h11.receive_data(chunk)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnFailed("closed", got)
        assert response is not None
        will_close = h11.MUST_CLOSE in (self.h11.their_state, self.h11.our_state)
        if not will_close:
            self.h11.start_next_cycle()
        self.served += 1
        headers_out = {n.decode().lower(): v.decode("latin-1") for n, v in response.headers}
        return Answer(response.status_code, headers_out, bytes(data), will_close)

    def wait_eof(self, timeout_s: float) -> tuple[bool, bytes]:
        """Read until the peer closes: (closed in time, any bytes it sent meanwhile)."""
        return read_until_eof(self.sock, timeout_s)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def read_until_eof(sock: socket.socket, timeout_s: float) -> tuple[bool, bytes]:
    """Read until EOF or reset (True) or the deadline (False); returns what arrived too."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return True, data + b"<RST>"
        if not chunk:
            return True, data
        data += chunk
    return False, data


def slow_upstream(label: str, delay_s: float) -> RecordingUpstream:
    """A recording upstream that takes ``delay_s`` before every answer."""
    up = RecordingUpstream(label)

    def handler(received: Received) -> Reply:
        time.sleep(delay_s)
        return up.default_reply(received)

    up.handler = handler
    return up


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; returns it, or the last falsy value."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


def config_dump(proxy: ProxyProcess) -> dict[str, Any]:
    status, body = proxy.admin_get("/config_dump")
    assert status == 200, body
    return dict(json.loads(body))


def metric_samples(proxy: ProxyProcess, sample_name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample with this exact name from the merged /metrics."""
    status, text = proxy.admin_get("/metrics")
    assert status == 200, text
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == sample_name]


def route_of(port: int, key: str | None = None) -> str:
    """Which upstream answered a request on a fresh connection (the x-upstream header)."""
    conn = Conn(port, timeout_s=10)
    try:
        answer = conn.request("/which", {"baggage": f"turnout-session={key}"} if key else {})
    finally:
        conn.close()
    assert answer.status == 200, answer
    return answer.headers["x-upstream"]


def refused(port: int) -> bool:
    """Whether a connection to the port is refused (nothing listens)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def run_cli(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataplane.cli", *args], capture_output=True, text=True,
                          check=False, timeout=timeout_s, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def pids_running_with(text: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``text`` (a unique file path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and ") Z" not in stat:  # zombies hold no sockets
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def upstreams() -> Iterator[list[RecordingUpstream]]:
    """Recording upstreams a test creates, stopped at the end."""
    made: list[RecordingUpstream] = []
    yield made
    for up in made:
        up.stop()


# ---------------------------------------------------------------------------- SIGTERM


@dataclass
class LoadLog:
    """What the load threads saw, in one list per outcome (appends are thread-safe)."""

    ok: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    connect_errors: list[str] = field(default_factory=list)


def _load_thread(index: int, port: int, log: LoadLog, stop: threading.Event, hard_deadline: float) -> None:
    conn: Conn | None = None
    for i in range(5000):
        if stop.is_set() or time.monotonic() > hard_deadline:
            break
        if conn is None:
            try:
                conn = Conn(port, timeout_s=15)
            except ConnectionRefusedError:
                log.refused.append(time.monotonic())
                time.sleep(0.05)
                continue
            except OSError as exc:
                log.connect_errors.append(type(exc).__name__)
                time.sleep(0.05)
                continue
        path = f"/load/{index}/{i}"
        reused = conn.served > 0
        sent_at = time.monotonic()
        try:
            answer = conn.request(path)
        except ConnFailed as exc:
            log.failed.append({"path": path, "reused": reused, "kind": exc.kind, "got": exc.got,
                               "sent_at": sent_at})
            conn.close()
            conn = None
            continue
        record = {"path": path, "status": answer.status, "close": answer.will_close, "reused": reused,
                  "sent_at": sent_at, "received_at": time.monotonic(), "eof_after_close": None,
                  "target": json.loads(answer.body).get("target") if answer.status == 200 else None}
        if answer.will_close:
            closed, extra = conn.wait_eof(5)
            record["eof_after_close"] = closed and not extra
            conn.close()
            conn = None
        log.ok.append(record)
    if conn is not None:
        conn.close()


def test_sigterm_under_load_finishes_every_in_flight_request(tmp_path: Path, upstreams: list[RecordingUpstream]
                                                             ) -> None:
    drain_timeout_s = 10.0
    up = slow_upstream("slow", 0.2)
    upstreams.append(up)
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", up.address)],
              "limits": {"drain_timeout_s": drain_timeout_s}}
    threads_n = 8
    log = LoadLog()
    stop = threading.Event()
    with running_proxy(config, tmp_path, workers=2) as proxy:
        # One idle keep-alive client: drain must close it at once, not wait for the deadline.
        idle = Conn(port)
        assert idle.request("/idle").status == 200
        hard_deadline = time.monotonic() + 60
        threads = [threading.Thread(target=_load_thread, args=(i, port, log, stop, hard_deadline), daemon=True)
                   for i in range(threads_n)]
        for t in threads:
            t.start()
        try:
            assert wait_until(lambda: len(log.ok) >= 6 * threads_n, 30), f"load never got going: {log}"
            assert not log.failed, f"requests failed before SIGTERM: {log.failed}"
            signalled_at = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            idle_closed, idle_extra = idle.wait_eof(5)
            try:
                code = proxy.process.wait(drain_timeout_s + 5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"supervisor still running {drain_timeout_s + 5} s after SIGTERM:\n{proxy.log()}")
            exited_after = time.monotonic() - signalled_at
        finally:
            stop.set()
            for t in threads:
                t.join(20)
            idle.close()
        assert not any(t.is_alive() for t in threads), "a load thread hung"
    assert code == 0, proxy.log()
    # In-flight requests take 0.2 s: the drain has nothing to wait for near its deadline.
    assert exited_after < drain_timeout_s, f"drain took {exited_after:.1f} s: an idle connection was held open?"
    assert idle_closed and not idle_extra, f"idle keep-alive connection not closed silently: {idle_extra!r}"
    assert refused(port), "listener still accepting after the proxy exited"

    seen_upstream = {r.target for r in up.requests}
    print(f"SIGTERM load: {len(log.ok)} ok, {sum(r['close'] for r in log.ok)} with connection: close, "
          f"{len(log.failed)} failed {log.failed}, {len(log.refused)} refused, connect errors {log.connect_errors}, "
          f"exit after {exited_after:.2f} s")
    # 1. No truncated response, no reset after the request reached the upstream.
    truncated = [f for f in log.failed if f["got"] > 0]
    assert not truncated, f"responses cut off: {truncated}"
    lost = [f for f in log.failed if f["path"] in seen_upstream]
    assert not lost, f"requests reached the upstream but the client got no response: {lost}"
    # 2. Every request the upstream saw was answered to its client with a complete 200.
    answered = {r["path"] for r in log.ok}
    assert {t for t in seen_upstream if t.startswith("/load/")} <= answered
    bad = [r for r in log.ok if r["status"] != 200 or r["target"] != r["path"]]
    assert not bad, f"wrong answers: {bad}"
    # 3. Responses written while draining say connection: close, and the proxy then closes.
    before = [r for r in log.ok if r["received_at"] < signalled_at]
    assert not any(r["close"] for r in before), "connection: close before any SIGTERM"
    in_flight_at_signal = [r for r in log.ok if r["sent_at"] < signalled_at < r["received_at"] and r["close"]]
    assert in_flight_at_signal, "no request was in flight at SIGTERM; the test exercised nothing"
    assert all(r["eof_after_close"] for r in log.ok if r["close"]), "connection: close but the socket stayed open"
    late = [r for r in log.ok if r["sent_at"] > signalled_at + 1.0 and not r["close"]]
    assert not late, f"keep-alive responses long after SIGTERM: {late}"
    # Clients reconnecting after their connection: close find the listeners closed.
    assert log.refused and min(log.refused) > signalled_at, "no reconnect was refused after SIGTERM"
    # 4. The only tolerated failure: a request written onto an idle keep-alive connection at
    # the instant drain closed it (it never reached the proxy's parser, so never the
    # upstream; RFC 9112 9.3.1 lets clients retry it). New connections may be refused or
    # reset once the listeners close; those are not failures either.
    races = [f for f in log.failed if f["reused"]]
    assert all(f["sent_at"] >= signalled_at for f in log.failed), f"failures before SIGTERM: {log.failed}"
    assert len(races) <= 1, f"more than one keep-alive request lost to the idle-close race: {races}"


# ---------------------------------------------------------------------------- SIGHUP


def _sessions(*pairs: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"id": sid, "key": key, "routes": [{"service": "users", "destination": dest}]}
            for sid, key, dest in pairs]


def _route_all(port: int, key: str | None, n: int = 12) -> set[str]:
    """Upstreams that answered n requests on fresh connections (spread over the workers)."""
    return {route_of(port, key) for _ in range(n)}


def test_sighup_reload_applies_a_valid_file_and_refuses_an_invalid_one(
        tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base, one, two = RecordingUpstream("baseline"), RecordingUpstream("one"), RecordingUpstream("two")
    upstreams.extend([base, one, two])
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)],
              "sessions": _sessions(("s1", "k1", one.address))}
    with running_proxy(config, tmp_path, workers=2) as proxy:
        assert _route_all(port, "k1", 4) == {"one"}
        assert route_of(port, "k2") == "baseline"
        on_disk = yaml.safe_load(proxy.config_path.read_text())

        # A valid change: s1 moves, s2 is added.
        on_disk["sessions"] = _sessions(("s1", "k1", two.address), ("s2", "k2", two.address))
        proxy.config_path.write_text(yaml.safe_dump(on_disk))
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _route_all(port, "k1") == {"two"} and _route_all(port, "k2") == {"two"}, 15), \
            f"routing did not change after SIGHUP:\n{proxy.log()}"
        dump = config_dump(proxy)
        assert dump["reloads"] == {"ok": 1, "invalid": 0}
        assert {s["id"]: s["routes"][0]["destination"] for s in dump["config"]["snapshot"]["sessions"]} == {
            "s1": two.address, "s2": two.address}
        ok_by_worker = {labels["worker"] for labels, value in metric_samples(proxy, "turnout_config_reloads_total")
                        if labels["result"] == "ok" and value >= 1}
        assert {"0", "1"} <= ok_by_worker, "every worker must have reloaded"

        # An invalid file: refused whole, nothing of it applied.
        broken = dict(on_disk, bogus_section=True)
        broken["sessions"] = _sessions(("s1", "k1", base.address), ("s3", "k3", "not-an-address"))
        proxy.config_path.write_text(yaml.safe_dump(broken))
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: config_dump(proxy)["reloads"]["invalid"] == 1, 10), proxy.log()
        assert config_dump(proxy)["reloads"] == {"ok": 1, "invalid": 1}
        assert _route_all(port, "k1") == {"two"}, "a refused reload changed routing"
        assert _route_all(port, "k2") == {"two"}
        assert _route_all(port, "k3", 4) == {"baseline"}
        assert route_of(port) == "baseline"
        assert proxy.admin_get("/ready")[0] == 200
        log = proxy.log()
        assert "reload refused" in log
        assert "bogus_section" in log and "sessions[1]" in log, f"refusal does not name the fields:\n{log}"
        assert proxy.process.poll() is None

        # The file fixed again: reloads resume.
        on_disk["sessions"] = _sessions(("s1", "k1", one.address))
        proxy.config_path.write_text(yaml.safe_dump(on_disk))
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _route_all(port, "k1") == {"one"}, 15), proxy.log()
        assert config_dump(proxy)["reloads"] == {"ok": 2, "invalid": 1}


def test_refused_reload_is_counted_in_metrics(tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    config = {"listeners": [inbound("users-in", free_port(), "users", base.address)]}
    with running_proxy(config, tmp_path) as proxy:
        proxy.config_path.write_text("listeners: [\n")  # not even YAML
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: config_dump(proxy)["reloads"]["invalid"] == 1, 10), proxy.log()
        invalid = [v for labels, v in metric_samples(proxy, "turnout_config_reloads_total")
                   if labels.get("result") == "invalid"]
        assert sum(invalid) >= 1, (
            "config_dump counts the refused SIGHUP reload but turnout_config_reloads_total{result=\"invalid\"} "
            "does not: the supervisor refuses the file before any worker sees it")


def test_sighup_reload_applies_changed_limits(tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)],
              "limits": {"header_read_timeout_s": 30.0}}
    with running_proxy(config, tmp_path) as proxy:
        on_disk = yaml.safe_load(proxy.config_path.read_text())
        on_disk["limits"] = {"header_read_timeout_s": 0.5}
        proxy.config_path.write_text(yaml.safe_dump(on_disk))
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: config_dump(proxy)["config"]["limits"]["header_read_timeout_s"] == 0.5, 10), proxy.log()
        # config_dump now says 0.5 s: a half-sent head must get its 408 on that schedule.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
            closed, data = read_until_eof(s, 6)
        assert data.startswith(b"HTTP/1.1 408"), (
            f"config_dump reports header_read_timeout_s=0.5 after the reload, but a slow head got {data!r} "
            "within 6 s: the worker kept enforcing the old limits")
        assert closed


# ---------------------------------------------------------------------------- worker crash


def test_killed_worker_is_restarted_and_traffic_continues(tmp_path: Path, upstreams: list[RecordingUpstream]
                                                          ) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)]}
    with running_proxy(config, tmp_path, workers=2) as proxy:
        before = {w["index"]: w for w in config_dump(proxy)["workers"]}
        assert sorted(before) == [0, 1] and all(w["up"] and w["restarts"] == 0 for w in before.values())
        victim = before[1]["pid"]
        results: list[str] = []
        problems: list[str] = []
        stop = threading.Event()
        killed_at = [float("inf")]

        def client(index: int) -> None:
            conn: Conn | None = None
            deadline = time.monotonic() + 40
            for i in range(3000):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                path = f"/crash/{index}/{i}"
                for attempt in range(3):
                    try:
                        if conn is None:
                            conn = Conn(port, timeout_s=10)
                        answer = conn.request(path)
                    except (ConnFailed, OSError) as exc:
                        # Retried on a new connection: a failure on a connection that may have
                        # belonged to the killed worker (opened before the kill, or queued on its
                        # SO_REUSEPORT listener while it died, which resets it).
                        opened_at = conn.opened_at if conn is not None else time.monotonic()
                        if conn is not None:
                            conn.close()
                            conn = None
                        if attempt == 2 or opened_at > killed_at[0] + 1.0:
                            problems.append(f"{path}: {exc} (attempt {attempt + 1})")
                            break
                        results.append("retried")
                        continue
                    if answer.status != 200 or json.loads(answer.body)["target"] != path:
                        problems.append(f"{path}: {answer}")
                    results.append("ok")
                    if answer.will_close:
                        conn.close()
                        conn = None
                    break
                # every fifth request on a fresh connection, so both workers keep getting new ones
                if conn is not None and i % 5 == 4:
                    conn.close()
                    conn = None
            if conn is not None:
                conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            assert wait_until(lambda: results.count("ok") >= 40, 20)
            killed_at[0] = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            results_at_kill = len(results)

            def restarted() -> bool:
                workers = {w["index"]: w for w in config_dump(proxy)["workers"]}
                w1 = workers[1]
                return bool(w1["pid"] != victim and w1["restarts"] == 1 and w1["up"])

            assert wait_until(restarted, 15), f"worker 1 not restarted:\n{config_dump(proxy)}\n{proxy.log()}"
            assert wait_until(lambda: proxy.admin_get("/ready")[0] == 200, 10)
            # Keep the load running a while on the restarted pair.
            mark = results.count("ok")
            assert wait_until(lambda: results.count("ok") >= mark + 40, 20)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert not problems, f"requests failed around the worker crash: {problems[:10]}"
        assert results[results_at_kill:].count("ok") >= 40
        assert results.count("retried") <= 4 * 3, "more retries than connections the dead worker could hold"
        after = {w["index"]: w for w in config_dump(proxy)["workers"]}
        assert after[0]["pid"] == before[0]["pid"] and after[0]["restarts"] == 0, "the other worker was disturbed"
        assert after[1]["pid"] != victim and after[1]["restarts"] == 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, 0)
            pytest.fail("the killed worker is still alive")
        assert f"worker 1 (pid {victim}) exited with -9" in proxy.log()
        # The restarted worker serves: its request counter appears once it takes connections.
        assert wait_until(lambda: route_of(port) == "baseline" and any(
            labels["worker"] == "1" for labels, _ in metric_samples(proxy, "turnout_requests_total")), 15)


# ---------------------------------------------------------------------------- slow and idle peers


class SinkUpstream:
    """An upstream that never answers: records each connection's bytes and whether it was closed."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.conns: list[dict[str, Any]] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            record: dict[str, Any] = {"data": b"", "closed": False}
            self.conns.append(record)
            threading.Thread(target=self._read, args=(conn, record), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, record: dict[str, Any]) -> None:
        conn.settimeout(60)
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                record["data"] += chunk
        record["closed"] = True

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()


@dataclass
class ShortStack:
    proxy: ProxyProcess
    baseline: RecordingUpstream
    sink: SinkUpstream

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module", params=CODECS)
def short(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortStack]:
    """A proxy with half-second timeouts, per codec; key ``sink`` routes to an upstream that never answers."""
    baseline = RecordingUpstream("baseline")
    sink = SinkUpstream()
    config = {
        "listeners": [inbound("users-in", free_port(), "users", baseline.address)],
        "limits": {"header_read_timeout_s": 0.5, "body_idle_timeout_s": 0.5, "keepalive_idle_timeout_s": 0.5},
        "sessions": _sessions(("sink", "sink", sink.address)),
    }
    try:
        with running_proxy(config, tmp_path_factory.mktemp("short"), codec=str(request.param)) as proxy:
            yield ShortStack(proxy, baseline, sink)
    finally:
        baseline.stop()
        sink.stop()


def test_slowloris_head_gets_408_and_close(short: ShortStack) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", short.port), timeout=5) as s:
        s.sendall(b"GET /slow-head HTTP/1.1\r\nHost: a\r\n")
        data = b""
        closed = False
        # Trickle a header line every 0.2 s: bytes arriving must not push the deadline back.
        for i in range(20):
            s.settimeout(0.2)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    s.sendall(b"x-drip-%d: 1\r\n" % i)
                continue
            except ConnectionResetError:
                data += b"<RST>"
                closed = True
                break
            data += chunk
            if not chunk:
                closed = True
                break
            rest_closed, rest = read_until_eof(s, 5)
            data += rest
            closed = rest_closed
            break
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data
    assert closed, "connection left open after the 408"
    (response,) = parse_responses(data)
    assert response.header("x-turnout-error") == "header_timeout"
    assert response.header("connection") == "close"
    assert b"timed out" in response.body
    assert elapsed < 3.5, f"408 only after {elapsed:.1f} s with a 0.5 s header timeout: trickling extended it"
    assert not any(r.target == "/slow-head" for r in short.baseline.requests)
    assert wait_until(lambda: any(labels.get("cause") == "header_timeout" and v >= 1 for labels, v in
                                  metric_samples(short.proxy, "turnout_downstream_errors_total")), 5)


def test_slow_post_body_gets_408_and_the_upstream_request_is_aborted(short: ShortStack) -> None:
    before = len(short.sink.conns)
    with socket.create_connection(("127.0.0.1", short.port), timeout=5) as s:
        s.sendall(b"POST /slow-body HTTP/1.1\r\nHost: a\r\nbaggage: turnout-session=sink\r\n"
                  b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        closed, data = read_until_eof(s, 6)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert closed
    (response,) = parse_responses(data)
    assert response.header("x-turnout-error") == "body_timeout"
    assert response.header("connection") == "close"
    assert response.body

    def aborted() -> dict[str, Any] | None:
        for conn in short.sink.conns[before:]:
            if b"POST /slow-body" in conn["data"] and conn["closed"]:
                return conn
        return None

    conn = wait_until(aborted, 5)
    assert conn, f"upstream connection for the stalled POST was not closed: {short.sink.conns[before:]}"
    head, _, body = conn["data"].partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower()
    assert body == b"x" * 10, "the upstream must never see a complete request"


def test_idle_keep_alive_connection_is_closed_silently(short: ShortStack) -> None:
    conn = Conn(short.port, timeout_s=5)
    try:
        assert conn.request("/ka/1").status == 200
        time.sleep(0.1)
        first = conn.request("/ka/2")  # still open well within the idle timeout
        assert first.status == 200 and not first.will_close
        idle_from = time.monotonic()
        closed, extra = conn.wait_eof(5)
        idle_for = time.monotonic() - idle_from
    finally:
        conn.close()
    assert closed, "idle keep-alive connection never closed"
    assert extra == b"", f"an idle close must be silent, got {extra!r}"
    assert 0.3 < idle_for < 4, idle_for


def test_connection_that_sends_nothing_is_closed(short: ShortStack) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", short.port), timeout=5) as s:
        closed, data = read_until_eof(s, 5)
    assert closed, "a silent client is never disconnected"
    assert data in (b"", b"<RST>") or data.startswith(b"HTTP/1.1 408"), data
    assert time.monotonic() - started < 4


def test_connection_cap_answers_503_and_keeps_existing_connections(
        tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)],
              "limits": {"max_connections_per_worker": 5}}
    with running_proxy(config, tmp_path) as proxy:
        conns = [Conn(port, timeout_s=10) for _ in range(5)]
        try:
            for i, c in enumerate(conns):
                assert c.request(f"/cap/{i}").status == 200
            # The sixth: the proxy answers without waiting for a request.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                closed, data = read_until_eof(s, 5)
            assert data.startswith(b"HTTP/1.1 503"), data
            assert closed
            (response,) = parse_responses(data)
            assert response.header("x-turnout-error") == "overloaded"
            assert response.header("connection") == "close"
            assert b"too many connections" in response.body
            for i, c in enumerate(conns):
                again = c.request(f"/cap/again/{i}")
                assert again.status == 200 and not again.will_close
            refusals = sum(v for _, v in metric_samples(proxy, "turnout_connections_refused_total"))
            assert refusals >= 1
            # A slot frees up when a connection closes.
            conns.pop().close()

            def sixth_served() -> bool:
                try:
                    c = Conn(port, timeout_s=5)
                    try:
                        return c.request("/cap/freed").status == 200
                    finally:
                        c.close()
                except (ConnFailed, OSError):
                    return False

            assert wait_until(sixth_served, 5, interval_s=0.1)
        finally:
            for c in conns:
                c.close()


# ---------------------------------------------------------------------------- check-config


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    port = free_port()
    path = _write(tmp_path, "ok.yaml", {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "listeners": [inbound("users-in", port, "users", "127.0.0.1:9000"),
                      {"name": "out", "address": f"127.0.0.1:{free_port()}", "mode": "outbound"}],
        "limits": {"drain_timeout_s": 5, "max_connections_per_worker": 100},
        "sessions": _sessions(("s1", "k1", "127.0.0.1:9001"), ("s2", "k2", "127.0.0.1:9002")),
    })
    out = run_cli("check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout and "2 listener(s)" in out.stdout and "2 session(s)" in out.stdout, out.stdout
    assert refused(port), "check-config must not bind"


def _bad_config() -> tuple[dict[str, Any], list[str]]:
    """A file with one of every listed mistake, and what each message must name."""
    dup = free_port()
    config = {
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "extra_stuff": {"x": 1},
        "listeners": [
            inbound("ok", dup, "users", "127.0.0.1:9000"),
            inbound("dup", dup, "orders", "127.0.0.1:9001"),
            {"name": "badaddr", "address": "localhost:notaport", "mode": "inbound", "service": "a",
             "baseline": "127.0.0.1:9002"},
            {"name": "noservice", "address": f"127.0.0.1:{free_port()}", "mode": "inbound"},
            {"name": "outsvc", "address": f"127.0.0.1:{free_port()}", "mode": "outbound", "service": "users"},
        ],
        "limits": {"no_such_limit": 3, "header_read_timeout_s": -1},
    }
    expected = [
        "extra_stuff",
        "listeners[1].address",  # duplicate address
        "already used",
        "listeners[2].address",  # not an address
        "listeners[3].service",  # inbound without service
        "listeners[3].baseline",  # ... and without baseline
        "listeners[4]",  # outbound with service
        "limits.no_such_limit",
        "limits.header_read_timeout_s",
    ]
    return config, expected


def test_check_config_names_every_problem_by_field(tmp_path: Path) -> None:
    config, expected = _bad_config()
    path = _write(tmp_path, "bad.yaml", config)
    out = run_cli("check-config", str(path))
    assert out.returncode == 2, (out.stdout, out.stderr)
    missing = [e for e in expected if e not in out.stderr]
    assert not missing, f"not named: {missing}\n{out.stderr}"
    assert "Traceback" not in out.stderr


def test_check_config_reports_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    missing = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr, missing.stderr
    garbage = run_cli("check-config", str(_write(tmp_path, "g.yaml", "listeners: [\n")))
    assert garbage.returncode == 2 and "invalid YAML" in garbage.stderr, garbage.stderr
    assert "Traceback" not in missing.stderr + garbage.stderr


def test_check_config_names_a_number_too_long_to_convert(tmp_path: Path) -> None:
    # 5,000 digits: YAML's loader hands them to int(), which refuses more than 4,300 with a
    # ValueError that once ended check-config (and the proxy's start) in a traceback.
    path = _write(tmp_path, "long.yaml", "limits:\n  max_head_bytes: " + "9" * 5000 + "\nlisteners: []\n")
    out = run_cli("check-config", str(path))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "limits.max_head_bytes" in out.stderr and "5000 characters" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_check_config_refuses_an_admin_address_shared_with_a_listener(tmp_path: Path) -> None:
    port = free_port()
    path = _write(tmp_path, "clash.yaml", {"admin": {"address": f"127.0.0.1:{port}"},
                                           "listeners": [inbound("users-in", port, "users", "127.0.0.1:9000")]})
    out = run_cli("check-config", str(path))
    assert out.returncode == 2, f"admin and listener on one port accepted as valid:\n{out.stdout}{out.stderr}"
    assert "admin.address" in out.stderr


def test_proxy_with_an_invalid_file_exits_without_binding(tmp_path: Path) -> None:
    config, expected = _bad_config()
    path = _write(tmp_path, "bad.yaml", config)
    admin_port = int(config["admin"]["address"].rsplit(":", 1)[1])
    listener_port = int(config["listeners"][0]["address"].rsplit(":", 1)[1])
    out = run_cli("proxy", "--config", str(path), "--workers", "2")
    assert out.returncode != 0
    missing = [e for e in expected if e not in out.stderr]
    assert not missing, f"not named: {missing}\n{out.stderr}"
    assert "worker(s) ready" not in out.stderr
    assert refused(admin_port) and refused(listener_port)
    assert not pids_running_with(str(path)), "a worker outlived the refused start"


def _start_raw(config_path: Path, log_path: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dataplane.cli", "proxy", "--config", str(config_path), "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_admin_port_in_use_fails_the_start_without_leaving_workers(
        tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        admin_port = busy.getsockname()[1]
        path = _write(tmp_path, "busy.yaml", {"admin": {"address": f"127.0.0.1:{admin_port}"},
                                              "listeners": [inbound("users-in", port, "users", base.address)]})
        process = _start_raw(path, tmp_path / "busy.log", workers=2)
        try:
            try:
                code = process.wait(20)
            except subprocess.TimeoutExpired:
                pytest.fail("supervisor kept running without its admin listener")
            assert code != 0
            log = (tmp_path / "busy.log").read_text(errors="replace")
            assert "address already in use" in log.lower() or "errno 98" in log.lower(), log
            stray = wait_until(lambda: not pids_running_with(str(path)), 5) or pids_running_with(str(path))
            assert stray is True, f"workers {stray} still running after the supervisor failed to start"
            assert refused(port), "the data port is still served with no supervisor"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            kill_pids(pids_running_with(str(path)))


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    port = free_port()
    admin_port = free_port()
    path = _write(tmp_path, "orphan.yaml", {"admin": {"address": f"127.0.0.1:{admin_port}"},
                                            "listeners": [inbound("users-in", port, "users", base.address)]})
    process = _start_raw(path, tmp_path / "orphan.log", workers=2)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    # Workers are found by their parent: they never read the config file, so its path is not
    # on their command line.
    workers_of = f"--parent-pid {process.pid} "
    try:
        assert wait_until(ready, 20), (tmp_path / "orphan.log").read_text()
        assert len(pids_running_with(str(path))) == 1 and len(pids_running_with(workers_of)) == 2
        assert not refused(port)
        process.kill()
        process.wait(5)
        stray = wait_until(lambda: not pids_running_with(workers_of), 8) or pids_running_with(workers_of)
        assert stray is True, f"workers {stray} kept serving after the supervisor was SIGKILLed (orphans)"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        kill_pids(pids_running_with(workers_of))


# ---------------------------------------------------------------------------- access log


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_access_log_has_one_json_object_per_request(tmp_path: Path, upstreams: list[RecordingUpstream]) -> None:
    base, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    upstreams.extend([base, sandbox])
    dead = closed_port()
    log_path = tmp_path / "access.log"
    port = free_port()
    config = {
        "listeners": [inbound("users-in", port, "users", base.address)],
        "sessions": [*_sessions(("s1", "k1", sandbox.address)),
                     {"id": "gone", "key": "gone", "routes": [
                         {"service": "users", "destination": f"127.0.0.1:{dead}", "fallback": "error"}]}],
        "access_log": {"path": str(log_path)},
    }
    with running_proxy(config, tmp_path, workers=2) as proxy:
        conn = Conn(port)
        try:
            assert conn.request("/a?x=1").status == 200
            assert conn.request("/b", {"baggage": "turnout-session=k1"}).status == 200
            assert conn.request("/c", {"baggage": "turnout-session=k1"}, method="POST", body=b"hello").status == 200
            assert conn.request("/d", {"baggage": "turnout-session=gone"}).status == 503
        finally:
            conn.close()
        assert wait_until(lambda: len(_read_log(log_path)) >= 4, 10), log_path.read_text()
        assert proxy.process.poll() is None
    raw_lines = log_path.read_text().splitlines()
    assert len(raw_lines) == 4, raw_lines
    entries = {e["target"]: e for e in _read_log(log_path)}
    required = {"method", "target", "status", "route", "session", "service", "destination", "duration_ms"}
    for entry in entries.values():
        assert required <= set(entry), entry
        assert entry["service"] == "users"
        assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0
    a, b, c, d = entries["/a?x=1"], entries["/b"], entries["/c"], entries["/d"]
    assert (a["method"], a["status"], a["route"], a["session"], a["destination"]) == (
        "GET", 200, "baseline", None, base.address)
    assert (b["method"], b["status"], b["route"], b["session"], b["destination"]) == (
        "GET", 200, "sandbox", "s1", sandbox.address)
    assert (c["method"], c["status"], c["route"], c["session"]) == ("POST", 200, "sandbox", "s1")
    assert (d["status"], d["route"], d["session"], d["destination"]) == (503, "sandbox", "gone", f"127.0.0.1:{dead}")


def test_access_log_durations_are_finer_than_a_millisecond(tmp_path: Path, upstreams: list[RecordingUpstream]
                                                           ) -> None:
    base = RecordingUpstream("baseline")
    upstreams.append(base)
    log_path = tmp_path / "access.log"
    port = free_port()
    config = {"listeners": [inbound("users-in", port, "users", base.address)],
              "access_log": {"path": str(log_path)}}
    with running_proxy(config, tmp_path) as proxy:
        conn = Conn(port)
        try:
            for i in range(20):
                assert conn.request(f"/t/{i}").status == 200
        finally:
            conn.close()
        assert wait_until(lambda: len(_read_log(log_path)) >= 20, 10)
        assert proxy.process.poll() is None
    durations = [e["duration_ms"] for e in _read_log(log_path)]
    # duration_ms is rounded to microseconds and the latency histogram starts at 0.5 ms, so
    # the clock must be finer than 1 ms: twenty whole-millisecond values mean it is not.
    assert any(d != int(d) for d in durations), (
        f"every duration is a whole number of milliseconds: {durations} (uvloop's loop.time() ticks in ms)")
