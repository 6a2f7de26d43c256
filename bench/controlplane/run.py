"""Config-channel benchmark: how fast a session reaches every proxy, and what one push costs.

Usage (from the repository root)::

    .venv/bin/python -m bench.controlplane.run                  # 50 proxies, 100 sessions, 10,000 loaded
    .venv/bin/python -m bench.controlplane.run --proxies 10 --sessions 20 --loaded 2000   # quick

Three measurements, one run, all real processes on this machine, with authentication on as
in production: the control plane runs with ``--auth`` (an OIDC issuer whose JWKS file holds
an RSA key this script makes, and a tokens file with one token per proxy, bound to that
proxy's node id); every API call carries an RS256 JWT, so the control plane verifies a
signature per request.

1. **Propagation.** ``turnout control-plane`` and N ``turnout proxy`` processes (one worker
   each, on the default delta protocol). For each of S sessions the script
   POSTs ``/v1/sessions`` and takes the time the 201 arrived; the control plane records when
   each proxy ACKed the version holding it, and a proxy ACKs only after its worker swapped in
   the new snapshot, so ``acked_at - t(201)`` is an upper bound on "this proxy routes the
   key". Reported: p50 / p99 / max over sessions of the time until *every* proxy routes it,
   and over every (session, proxy) pair. Every tenth session is then checked with a real
   request through every proxy (it must reach the sandbox).
2. **The cost of authentication.** In this process: microseconds per ``Authenticator``
   verification of an RS256 and an ES256 JWT and of an opaque tokens-file token (SHA-256
   lookup). Against the running control plane (proxies stopped): latency of
   ``GET /v1/whoami`` over one keep-alive connection with a JWT and with an opaque token,
   the difference being what verifying a JWT adds to a request end to end.
3. **Cost of one change with L sessions loaded.** The proxies are stopped, L sessions are
   created, then one proxy per protocol is connected in turn and C single-session changes
   are made (create, then delete), each followed by a fixed pause and no other API call
   (ACK lags are measured in a separate run of 20 changes). The control plane's CPU
   (utime + stime of its process, from /proc) over the C changes, less what it spends idle
   over the same time (measured alone first), is its cost per change; minus the same
   sequence with no proxy connected, the push's share. Bytes per push come from the
   control plane's ``turnout_cp_push_bytes_total``.

Propagation runs unpinned: the control plane and the proxies are the system under test and
share both CPUs. For the cost run the control plane is pinned to cpu1 and everything else
(the proxy, upstreams, this script) to cpu0, so its CPU time is its own work. Targets:
p99 <= 100 ms to all proxies; <= 5 ms of control-plane CPU and O(1) bytes per delta push
with 10,000 sessions loaded. Results go to ``bench/controlplane/results.json`` and a
markdown table on stdout. Every process is stopped by PID on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import socketserver
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.http1.run import CLK_TCK, Processes, cpu_ticks, machine_load, turnout_binary
from controlplane.authconfig import load_auth_config
from controlplane.authn import Authenticator

HERE = Path(__file__).resolve().parent
CP_CPU = 1
REST_CPU = 0
ISSUER = "https://idp.bench.invalid"
# The API caller: an admin (it loads 10,000 sessions for "bench"), with the rate limit raised
# to match: the benchmark is a load the default limits exist to stop.
OPAQUE_TOKEN = "bench-opaque-token"
AUTH_SAMPLES = 2000
START_TIMEOUT_S = 120.0
SYNC_TIMEOUT_S = 30.0
# The ACK times come from the control plane's records, so polling only decides when to look;
# a slow poll keeps the measurement from stealing the CPU it measures.
POLL_S = 0.1
_READY = re.compile(r"api (http://\S+) grpc (\S+);")


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    sys.stderr.write("[bench/controlplane] " + msg + "\n")
    sys.stderr.flush()


class Upstream:
    """A labelled HTTP/1.1 upstream in a thread (only checking requests hit it)."""

    def __init__(self, label: str) -> None:
        body = label.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Credentials:
    """The bench's identities: an RSA-signed JWT for the API, an EC one, an opaque token, and one
    token per proxy; written as an --auth file, a tokens file and a JWKS file in ``tmp``."""

    def __init__(self, tmp: Path, proxies: int) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        keys = [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key())), "kid": "rsa-1",
                 "alg": "RS256", "use": "sig"},
                {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec-1",
                 "alg": "ES256", "use": "sig"}]
        (tmp / "jwks.json").write_text(json.dumps({"keys": keys}))
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": "bench", "aud": "turnout", "iat": now, "nbf": now, "exp": now + 86400,
                  "groups": ["admins"]}
        self.jwt = jwt.encode(claims, self.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
        self.jwt_ec = jwt.encode(claims, self.ec, algorithm="ES256", headers={"kid": "ec-1"})
        self.proxy_tokens = {f"proxy-{i:02d}": f"proxy-token-{i:02d}" for i in range(proxies)}
        self.proxy_tokens.update({f"cost-{p}": f"proxy-token-cost-{p}" for p in ("delta", "sotw")})
        entries = [{"identity": "bench-opaque", "groups": ["admins"], "sha256": _digest(OPAQUE_TOKEN)}]
        entries += [{"identity": name, "groups": ["proxies"], "node_ids": [name], "sha256": _digest(token)}
                    for name, token in self.proxy_tokens.items()]
        (tmp / "tokens.yaml").write_text(yaml.safe_dump({"tokens": entries}))
        for name, token in self.proxy_tokens.items():
            (tmp / f"{name}.token").write_text(token + "\n")
        self.auth_file = tmp / "auth.yaml"
        self.auth_file.write_text(yaml.safe_dump({
            "tokens_file": "tokens.yaml",
            "issuers": [{"issuer": ISSUER, "audiences": ["turnout"], "jwks_file": "jwks.json",
                         "groups_claim": "groups"}],
            "limits": {"changes_per_minute": 1_000_000, "change_burst": 100_000},
        }))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Api:
    """A keep-alive client for the control plane's HTTP API, sending ``token``."""

    def __init__(self, base: str, token: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"authorization": "Bearer " + self.token}
        if data is not None:
            headers["content-type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None

    def metrics(self) -> str:
        self.conn.request("GET", "/metrics")
        resp = self.conn.getresponse()
        return resp.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def start_control_plane(procs: Processes, tmp: Path, credentials: Credentials) -> tuple[Any, str, str]:
    log_path = tmp / "cp.log"
    process = procs.start("control plane", [
        turnout_binary(), "control-plane", "--api", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--db",
        str(tmp / "sessions.db"), "--auth", str(credentials.auth_file), "--id", "bench"], log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _READY.search(log_path.read_text(errors="replace"))
        if found:
            return process, found.group(1), found.group(2)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("control plane did not start:\n" + log_path.read_text(errors="replace"))


def start_proxy(procs: Processes, tmp: Path, name: str, grpc: str, baseline: str, protocol: str,
                cpu: int | None = None) -> tuple[Any, int]:
    """Start one proxy and wait until its admin says ready; returns (process, listener port)."""
    port, admin = free_port(), free_port()
    config = {
        "admin": {"address": f"127.0.0.1:{admin}"},
        "listeners": [{"name": "users-in", "address": f"127.0.0.1:{port}", "mode": "inbound", "service": "users",
                       "baseline": baseline}],
        "control_plane": {"address": grpc, "protocol": protocol, "node_id": name,
                          "token_file": str(tmp / f"{name}.token"), "state_path": str(tmp / f"{name}.state.json")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [turnout_binary(), "proxy", "--config", str(path)]
    process = procs.start(name, argv if cpu is None else pinned(cpu, argv), tmp / f"{name}.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5):
            return process, port
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready:\n" + (tmp / f"{name}.log").read_text(errors="replace"))


def wait_synced(api: Api, names: Sequence[str], revision: int, timeout_s: float = SYNC_TIMEOUT_S) -> dict[str, Any]:
    """Poll /v1/proxies until every named proxy ACKed ``revision`` or later; returns the records."""
    deadline = time.monotonic() + timeout_s
    wanted = set(names)
    while True:
        _, body = api.call("GET", "/v1/proxies")
        records = {p["id"]: p for p in body["proxies"] if p["id"] in wanted}
        if len(records) == len(wanted) and all(
                r["connected"] and r["acked_version"] and int(r["acked_version"]) >= revision
                for r in records.values()):
            return records
        if time.monotonic() > deadline:
            late = sorted(n for n in wanted if n not in records or not records[n]["acked_version"]
                          or int(records[n]["acked_version"]) < revision)
            raise RuntimeError(f"{len(late)} proxies not at revision {revision} after {timeout_s} s: {late[:5]}")
        time.sleep(POLL_S)


def served_by(port: int, key: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"baggage": "turnout-session=" + key})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def session_spec(sid: str, destination: str) -> dict[str, Any]:
    return {"id": sid, "key": "key-" + sid, "owner": "bench", "ttl_s": 3600,
            "routes": [{"service": "users", "destination": destination}]}


# --------------------------------------------------------------------------- phases


def propagation(args: argparse.Namespace, procs: Processes, tmp: Path, api: Api, grpc: str,
                baseline: Upstream, sandbox: Upstream) -> dict[str, Any]:
    log(f"starting {args.proxies} proxies (unpinned: the control plane and every proxy share both CPUs)")
    proxies: dict[str, tuple[Any, int]] = {}
    for i in range(args.proxies):
        name = f"proxy-{i:02d}"
        proxies[name] = start_proxy(procs, tmp, name, grpc, baseline.address, args.protocol)
    _, body = api.call("GET", "/v1/sessions")
    wait_synced(api, list(proxies), int(body["revision"]), START_TIMEOUT_S)
    log(f"{args.proxies} proxies connected and in sync; creating {args.sessions} sessions one at a time")
    all_proxies: list[float] = []
    pairs: list[float] = []
    checked = 0
    for i in range(args.sessions):
        sid = f"p{i:04d}"
        sent = time.time()
        status, body = api.call("POST", "/v1/sessions", session_spec(sid, sandbox.address))
        created = time.time()
        if status != 201:
            raise RuntimeError(f"create {sid}: {status} {body}")
        time.sleep(args.settle)
        records = wait_synced(api, list(proxies), int(body["revision"]))
        lags = [max(0.0, r["acked_at"] - created) for r in records.values()]
        all_proxies.append(max(lags))
        pairs.extend(lags)
        if i % 10 == 0 or i == args.sessions - 1:
            for name, (_, port) in proxies.items():
                answer = served_by(port, "key-" + sid)
                if answer != "sandbox":
                    raise RuntimeError(f"{name} answered {answer!r} for session {sid} after it ACKed")
                checked += 1
        if i == 0:
            log(f"first session: API round trip {1000 * (created - sent):.1f} ms, "
                f"all proxies {1000 * all_proxies[0]:.1f} ms after the 201")
    for process, _ in proxies.values():
        procs.stop(process)
    return {
        "proxies": args.proxies,
        "sessions": args.sessions,
        "protocol": args.protocol,
        "all_proxies_ms": {"p50": 1000 * statistics.median(all_proxies), "p99": 1000 * percentile(all_proxies, 99),
                           "max": 1000 * max(all_proxies)},
        "each_proxy_ms": {"p50": 1000 * statistics.median(pairs), "p99": 1000 * percentile(pairs, 99),
                          "max": 1000 * max(pairs)},
        "requests_checked": checked,
    }


def auth_cost(credentials: Credentials, api_url: str) -> dict[str, Any]:
    """Microseconds per verification in this process, and request latency with a JWT vs an opaque token."""
    authenticator = Authenticator(load_auth_config(credentials.auth_file))

    async def per_verify(token: str) -> float:
        header = "Bearer " + token
        await authenticator.authenticate(header)  # warm: keys parsed, caches filled
        started = time.perf_counter()
        for _ in range(AUTH_SAMPLES):
            await authenticator.authenticate(header)
        return (time.perf_counter() - started) / AUTH_SAMPLES * 1e6

    out: dict[str, Any] = {"samples": AUTH_SAMPLES, "verify_us": {
        "jwt_rs256": asyncio.run(per_verify(credentials.jwt)),
        "jwt_es256": asyncio.run(per_verify(credentials.jwt_ec)),
        "opaque_sha256": asyncio.run(per_verify(OPAQUE_TOKEN)),
    }}
    log("verify (us): " + ", ".join(f"{k} {v:.1f}" for k, v in out["verify_us"].items()))
    latency: dict[str, Any] = {}
    for name, token in (("jwt_rs256", credentials.jwt), ("opaque", OPAQUE_TOKEN)):
        api = Api(api_url, token)
        for _ in range(50):
            api.call("GET", "/v1/whoami")  # warm the connection and the server
        times = []
        for _ in range(AUTH_SAMPLES):
            started = time.perf_counter()
            status, _ = api.call("GET", "/v1/whoami")
            times.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"whoami with {name}: {status}")
        latency[name] = {"p50_us": 1e6 * statistics.median(times), "p99_us": 1e6 * percentile(times, 99),
                         "mean_us": 1e6 * statistics.fmean(times)}
    latency["jwt_adds_us"] = {k: latency["jwt_rs256"][k] - latency["opaque"][k] for k in ("p50_us", "mean_us")}
    out["request_latency"] = latency
    log(f"GET /v1/whoami p50: JWT {latency['jwt_rs256']['p50_us']:.0f} us, opaque {latency['opaque']['p50_us']:.0f} "
        f"us (JWT adds {latency['jwt_adds_us']['p50_us']:.0f} us)")
    return out


def cp_cpu_s(pid: int) -> float:
    user, system = cpu_ticks([pid])
    return (user + system) / CLK_TCK


def push_bytes(api: Api) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in api.metrics().splitlines():
        for name in ("turnout_cp_push_bytes_total", "turnout_cp_pushes_total"):
            if line.startswith(name + "{"):
                protocol = line.split('protocol="', 1)[1].split('"', 1)[0]
                out[f"{name}:{protocol}"] = float(line.rsplit(" ", 1)[1])
    return out


def changes(api: Api, count: int, destination: str, pause_s: float, names: Sequence[str],
            poll: bool, prefix: str = "c") -> list[float]:
    """``count`` changes (create then delete, alternating), each followed by ``pause_s``.

    With ``poll``, waits for the named proxies to ACK each one and returns the ACK lags (s);
    without, sends no other API request, so the control plane's CPU is the changes' alone.
    """
    lags: list[float] = []
    revision = int(api.call("GET", "/v1/sessions?owner=none")[1]["revision"])
    for i in range(count):
        sid = f"{prefix}{i // 2:04d}"
        if i % 2 == 0:
            status, _ = api.call("POST", "/v1/sessions", session_spec(sid, destination))
        else:
            status, _ = api.call("DELETE", "/v1/sessions/" + sid)
        revision += 1  # nothing else changes the store during the run (no session expires)
        done = time.time()
        if status not in (201, 204):
            raise RuntimeError(f"change {i}: {status}")
        time.sleep(pause_s)
        if poll:
            records = wait_synced(api, names, revision)
            lags.extend(max(0.0, r["acked_at"] - done) for r in records.values())
    wait_synced(api, names, revision)  # every push was answered before the CPU is read
    return lags


def push_cost(args: argparse.Namespace, procs: Processes, tmp: Path, api: Api, cp_pid: int, grpc: str,
              baseline: Upstream, sandbox: Upstream) -> dict[str, Any]:
    # From here the control plane has cpu1 to itself, so its CPU time is its own work.
    os.sched_setaffinity(cp_pid, {CP_CPU})
    os.sched_setaffinity(0, {REST_CPU})
    log(f"loading {args.loaded} sessions (control plane pinned to cpu{CP_CPU}, the rest to cpu{REST_CPU})")
    started = time.monotonic()
    for i in range(args.loaded):
        status, body = api.call("POST", "/v1/sessions", session_spec(f"l{i:06d}", f"10.{i // 65536 % 256}."
                                                                     f"{i // 256 % 256}.{i % 256}:8080"))
        if status != 201:
            raise RuntimeError(f"load {i}: {status} {body}")
    log(f"loaded in {time.monotonic() - started:.1f} s")
    out: dict[str, Any] = {"loaded": args.loaded, "changes": args.changes, "pause_s": args.pause}
    # The control plane spends some CPU while idle (gRPC's poller, timers). Measured alone and
    # subtracted, so the pause between changes does not count as the changes' cost.
    before, started = cp_cpu_s(cp_pid), time.monotonic()
    time.sleep(args.idle)
    idle_rate = (cp_cpu_s(cp_pid) - before) / (time.monotonic() - started)
    out["idle_cpu_share"] = idle_rate

    def work_ms(names: Sequence[str], prefix: str) -> float:
        before, started = cp_cpu_s(cp_pid), time.monotonic()
        changes(api, args.changes, sandbox.address, args.pause, names, poll=False, prefix=prefix)
        # The one /v1/proxies call at the end is in both runs, so the push's share is exact.
        spent = cp_cpu_s(cp_pid) - before - idle_rate * (time.monotonic() - started)
        return float(1000 * spent / args.changes)

    alone_ms = work_ms((), "n")
    out["no_proxy"] = {"cp_cpu_ms_per_change": alone_ms}
    log(f"idle {100 * idle_rate:.2f}% of a core; no proxy: {alone_ms:.2f} ms control-plane CPU per change "
        "(API + store)")
    for protocol in ("delta", "sotw"):
        process, _ = start_proxy(procs, tmp, f"cost-{protocol}", grpc, baseline.address, protocol, REST_CPU)
        wait_synced(api, [f"cost-{protocol}"], int(api.call("GET", "/v1/sessions?owner=none")[1]["revision"]),
                    START_TIMEOUT_S)
        bytes_before = push_bytes(api)
        total_ms = work_ms([f"cost-{protocol}"], protocol[0])
        lags = changes(api, 20, sandbox.address, args.pause, [f"cost-{protocol}"], poll=True, prefix=protocol[0] + "l")
        bytes_after = push_bytes(api)
        pushes = bytes_after.get(f"turnout_cp_pushes_total:{protocol}", 0) - \
            bytes_before.get(f"turnout_cp_pushes_total:{protocol}", 0)
        sent = bytes_after.get(f"turnout_cp_push_bytes_total:{protocol}", 0) - \
            bytes_before.get(f"turnout_cp_push_bytes_total:{protocol}", 0)
        out[protocol] = {
            "cp_cpu_ms_per_change": total_ms,
            "push_cpu_ms_per_change": total_ms - alone_ms,
            "bytes_per_push": sent / pushes if pushes else None,
            "pushes": pushes,
            "ack_ms": {"p50": 1000 * statistics.median(lags), "p99": 1000 * percentile(lags, 99)},
        }
        log(f"{protocol}: {total_ms:.2f} ms control-plane CPU per change ({total_ms - alone_ms:.2f} ms the push), "
            f"{out[protocol]['bytes_per_push']:.0f} bytes per push, ack p50 {out[protocol]['ack_ms']['p50']:.1f} ms")
        procs.stop(process)
    return out


# --------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    prop, cost, auth = results["propagation"], results["push_cost"], results["auth_cost"]
    verify, latency = auth["verify_us"], auth["request_latency"]
    lines = [
        f"### bench/controlplane — {results['meta']['date']}",
        "",
        f"Propagation, authentication on: {prop['proxies']} proxies ({prop['protocol']}, each with its own token "
        f"bound to its node id), {prop['sessions']} sessions created one at a time with an RS256 JWT; time from "
        "the API's 201 until the proxy ACKed (after its worker swapped the snapshot in).",
        "",
        "| measure | p50 ms | p99 ms | max ms | target |",
        "|---|---:|---:|---:|---|",
        f"| every proxy routes the new key | {prop['all_proxies_ms']['p50']:.1f} | {prop['all_proxies_ms']['p99']:.1f} "
        f"| {prop['all_proxies_ms']['max']:.1f} | p99 <= 100 ms: "
        f"{'PASS' if prop['all_proxies_ms']['p99'] <= 100 else 'FAIL'} |",
        f"| one proxy routes it (all pairs) | {prop['each_proxy_ms']['p50']:.1f} | {prop['each_proxy_ms']['p99']:.1f} "
        f"| {prop['each_proxy_ms']['max']:.1f} | |",
        "",
        f"Authentication ({auth['samples']} samples each): one verification in-process, RS256 JWT "
        f"{verify['jwt_rs256']:.1f} us, ES256 JWT {verify['jwt_es256']:.1f} us, opaque token (SHA-256 lookup) "
        f"{verify['opaque_sha256']:.1f} us.",
        "",
        "| GET /v1/whoami, one keep-alive connection | p50 us | p99 us | mean us |",
        "|---|---:|---:|---:|",
        f"| RS256 JWT | {latency['jwt_rs256']['p50_us']:.0f} | {latency['jwt_rs256']['p99_us']:.0f} "
        f"| {latency['jwt_rs256']['mean_us']:.0f} |",
        f"| opaque token | {latency['opaque']['p50_us']:.0f} | {latency['opaque']['p99_us']:.0f} "
        f"| {latency['opaque']['mean_us']:.0f} |",
        f"| what the JWT adds | {latency['jwt_adds_us']['p50_us']:.0f} | | {latency['jwt_adds_us']['mean_us']:.0f} |",
        "",
        f"One change with {cost['loaded']:,} sessions loaded ({cost['changes']} changes, create/delete alternating):",
        "",
        "| protocol | control-plane CPU per change | of which the push | bytes per push | proxy ACK p50 / p99 |"
        " target |",
        "|---|---:|---:|---:|---:|---|",
        f"| (no proxy: API + store) | {cost['no_proxy']['cp_cpu_ms_per_change']:.2f} ms | — | — | — | |",
        f"| (idle, subtracted above) | {100 * cost['idle_cpu_share']:.2f}% of a core | | | | |",
    ]
    for protocol in ("delta", "sotw"):
        row = cost[protocol]
        verdict = ""
        if protocol == "delta":
            ok = row["cp_cpu_ms_per_change"] <= 5.0
            verdict = f"<= 5 ms CPU: {'PASS' if ok else 'FAIL'}"
        lines.append(f"| {protocol} | {row['cp_cpu_ms_per_change']:.2f} ms | {row['push_cpu_ms_per_change']:.2f} ms "
                     f"| {row['bytes_per_push']:,.0f} | {row['ack_ms']['p50']:.1f} / {row['ack_ms']['p99']:.1f} ms "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.controlplane.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--proxies", type=int, default=50, help="proxy processes for the propagation run (default 50)")
    p.add_argument("--sessions", type=int, default=100, help="sessions created one at a time (default 100)")
    p.add_argument("--protocol", default="delta", choices=["delta", "sotw"], help="protocol of the N proxies")
    p.add_argument("--loaded", type=int, default=10_000, help="sessions loaded for the push-cost run (default 10000)")
    p.add_argument("--changes", type=int, default=100, help="changes measured per protocol (default 100)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds after each change in the cost run (default 0.2)")
    p.add_argument("--idle", type=float, default=10.0,
                   help="seconds of idle control plane measured and subtracted from the cost run (default 10)")
    p.add_argument("--settle", type=float, default=0.3,
                   help="seconds before looking at the ACKs of a propagation (default 0.3; they are timestamped "
                   "by the control plane, so this only spaces the sessions)")
    p.add_argument("--output", type=Path, default=HERE / "results.json", help="results JSON (default %(default)s)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    procs = Processes()
    upstreams: list[Upstream] = []
    tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-cp-"))
    try:
        baseline, sandbox = Upstream("baseline"), Upstream("sandbox")
        upstreams += [baseline, sandbox]
        credentials = Credentials(tmp, args.proxies)
        cp, api_url, grpc = start_control_plane(procs, tmp, credentials)
        api = Api(api_url, credentials.jwt)
        load_before = machine_load()
        results: dict[str, Any] = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
                                            "control_plane_cpu": CP_CPU, "other_cpu": REST_CPU,
                                            "load_before": load_before}}
        results["propagation"] = propagation(args, procs, tmp, api, grpc, baseline, sandbox)
        results["auth_cost"] = auth_cost(credentials, api_url)
        results["push_cost"] = push_cost(args, procs, tmp, api, cp.pid, grpc, baseline, sandbox)
        results["meta"]["load_after"] = machine_load()
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        sys.stdout.write(report(results))
        log(f"wrote {args.output}")
        prop_ok = results["propagation"]["all_proxies_ms"]["p99"] <= 100
        cost_ok = results["push_cost"]["delta"]["cp_cpu_ms_per_change"] <= 5.0
        return 0 if prop_ok and cost_ok else 1
    finally:
        procs.stop_all()
        for upstream in upstreams:
            upstream.stop()
        with contextlib.suppress(OSError):
            for path in sorted(tmp.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            tmp.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
