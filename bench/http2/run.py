"""HTTP/2 load benchmark: turnout next to nginx and HAProxy, same machine, same run.

Usage (from the repository root, as root so missing tools can be installed with apt)::

    .venv/bin/python -m bench.http2.run                    # full run, ~5 minutes
    .venv/bin/python -m bench.http2.run --quick            # short cases, ~2 minutes
    .venv/bin/python -m bench.http2.run --duration 20      # 20 s per measured case
    .venv/bin/python -m bench.http2.run --rounds 3         # median of 3 interleaved rounds
    .venv/bin/python -m bench.http2.run --proxies turnout --profile   # + py-spy profile

What it does, in one run:

* installs ``h2load`` (nghttp2-client), ``nginx``, ``haproxy`` (and ``wrk``, through
  bench/http1's ``ensure_tools``) and ``curl`` with apt when missing, and says so;
* starts a C upstream (nginx, one worker) with two server blocks, ``baseline`` and
  ``sandbox``, each answering a fixed 100-byte body that names it, each on an HTTP/1.1
  port and an h2c port (HTTP/2 with prior knowledge);
* runs each proxy under test with one worker, accepting h2c with prior knowledge from the
  client, and the same rule (baggage member ``turnout-session=bench`` -> sandbox,
  everything else -> baseline):

  - ``turnout``: HTTP/2 to the upstream's h2c ports (``turnout.yaml``; the listener sniffs
    the HTTP/2 preface, no extra config);
  - ``turnout-h1up``: HTTP/1.1 to the upstream's HTTP/1.1 ports (``turnout-h1up.yaml``,
    ``upstream_protocol: http1`` on the listener and the route) — the shape nginx has;
    skipped with a printed note when turnout refuses the config or does not route with it
    (the HTTP/1.1 ports answer nothing to an HTTP/2 preface, so a passing routing check
    proves HTTP/1.1 was spoken upstream);
  - ``nginx``: ``listen ... http2``, ``map $http_baggage``, ``proxy_pass`` to pooled
    HTTP/1.1 keep-alive upstreams (nginx's only way to proxy plain HTTP);
  - ``haproxy``: ``bind ... proto h2``, ``req.hdr(baggage)``, ``server ... proto h2`` to
    the h2c ports (HTTP/2 end to end, like turnout), ``nbthread 1``;

  plus the upstream's h2c ports directly, as the floor; routing (no key, the routed key,
  the key among other members, another key) is checked with ``curl
  --http2-prior-knowledge`` through every proxy before and after the load;
* pins the load generator and the upstream to cpu0 and the proxy alone to cpu1;
* measures max throughput with ``h2load -t1 -c64 -m10`` (64 connections, 10 concurrent
  streams each) without and with the routed header; latency at a fixed rate (default
  1,000 req/s) with ``h2load -m1`` twice: ``-c16 --rps`` (h2load starts its clients' rate
  timers together, so this is bursts of 16 requests — mostly per-request service time)
  and ``-c1 --rps`` (one request at a time, evenly spaced — the proxy's added latency
  alone); the proxy's CPU (utime+stime of its whole process group during the -c16 run, as
  cores per 1,000 req/s) and the worker's peak RSS under load;
* prints markdown tables (results, diagnostics, turnout ratios, the target) and writes
  ``bench/http2/results.json``; ``--profile`` adds a py-spy flame graph and own-time table
  of the turnout worker under h2load load (``bench/http2/profile/``), native frames
  included (``--native``) so the compiled build's C functions show.

Everything it starts runs in its own process group under a temporary directory, and is
stopped by PID (and that group) on exit, Ctrl-C, SIGTERM or failure (bench/http1's
``Processes``).

Validity notes printed with the results: the share of cpu1 used by something other than
the proxy (other jobs on the machine disturb the numbers), whether each proxy was actually
saturated during the throughput run (if nginx or HAProxy was not, cpu0 — load generator
plus upstream — was the limit and turnout's ratio to it is flattering), and req/s per core
the proxy actually used, which stays comparable when either happens. Exit status: 0 when
the target passes (turnout's HTTP/2 throughput with one worker >= 0.25 x nginx's with one
worker), 1 when it is missed, 2 on a setup error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.http1.run import (
    BODY_BYTES,
    CLK_TCK,
    LOADGEN_CPU,
    LOADGEN_SLACK_S,
    PROXY_CPU,
    ROUTED_HEADER,
    START_TIMEOUT_S,
    BenchError,
    Processes,
    Target,
    _fmt,
    _ratio,
    _search_float,
    _tail,
    add_output_options,
    bench_main,
    body_for,
    cpu_busy,
    cpu_ticks,
    cpu_times,
    ensure_py_spy,
    ensure_tools,
    free_port,
    h2load_log_summary,
    http_get,
    interleaved,
    machine_load,
    median_round,
    own_time_table,
    render,
    rss_kb,
    stopping,
    tool_versions,
    turnout_binary,
    wait_http,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

PROXIES = ("turnout", "turnout-h1up", "nginx", "haproxy")
# h2load's shape for max throughput: 64 connections x 10 concurrent streams on one thread
# saturates every proxy here while h2load + the upstream stay under one core (cpu0).
H2LOAD_CLIENTS = 64
H2LOAD_STREAMS = 10
H2LOAD_THREADS = 1
LATENCY_CLIENTS = 16

# Target (from the lead's brief): turnout's HTTP/2 throughput with one worker >= this x nginx's.
TARGET_THROUGHPUT_RATIO = 0.25

CURL_TIMEOUT_S = 3.0
OTHER_KEY_HEADER = "baggage: turnout-session=other"
MEMBERS_HEADER = "baggage: userId=alice,turnout-session=bench;p=1"


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    sys.stderr.write("[bench/http2] " + msg + "\n")
    sys.stderr.flush()


def ensure_curl(install: bool) -> str:
    """curl (the HTTP/2 client for routing checks); apt-get installed when missing."""
    found = shutil.which("curl")
    if found is None and install and os.geteuid() == 0:
        log("curl missing: apt-get install -y curl")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "curl"], env=env,
                       capture_output=True, timeout=600, check=False)
        found = shutil.which("curl")
    if found is None:
        raise BenchError("curl is required for the HTTP/2 routing checks: apt-get install curl")
    return found


def h2c_get(curl: str, port: int, header: str | None) -> tuple[int, bytes, str]:
    """One GET over HTTP/2 with prior knowledge; returns (status, body, HTTP version)."""
    argv = [curl, "-s", "--http2-prior-knowledge", "--max-time", str(CURL_TIMEOUT_S), "-o", "-",
            "-w", "\n%{http_code} %{http_version}"]
    if header:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}/bench")
    result = subprocess.run(argv, capture_output=True, timeout=CURL_TIMEOUT_S + 5, check=False)
    body, _, trailer = result.stdout.rpartition(b"\n")
    status, _, version = trailer.decode(errors="replace").partition(" ")
    return (int(status) if status.isdigit() else 0), body, version


# --------------------------------------------------------------------------- the run


class H2Bench:
    """One benchmark run: the upstream, the proxies, and h2load against each in turn."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.procs = procs
        self.baseline_port = free_port()  # HTTP/1.1
        self.sandbox_port = free_port()
        self.baseline_h2_port = free_port()  # h2c, prior knowledge
        self.sandbox_h2_port = free_port()
        self.skipped: dict[str, str] = {}  # proxy -> why it was not measured

    def pinned(self, cpu: int, argv: list[str]) -> list[str]:
        """``argv`` under ``taskset -c cpu``."""
        return [self.tools["taskset"], "-c", str(cpu), *argv]

    def values(self) -> dict[str, Any]:
        """Placeholders shared by every config template."""
        return {"PREFIX": self.tmp, "BASELINE_PORT": self.baseline_port, "SANDBOX_PORT": self.sandbox_port,
                "BASELINE_H2_PORT": self.baseline_h2_port, "SANDBOX_H2_PORT": self.sandbox_h2_port,
                "UPSTREAM_IDLE": self.args.upstream_idle}

    def template(self, name: str, **extra: Any) -> Path:
        """Render ``bench/http2/<name>`` into the temporary directory."""
        # render() resolves a template against bench/http1/; an absolute path overrides that.
        return render(str(HERE / name), self.tmp / name, {**self.values(), **extra})

    # ---- upstream and routing checks

    def start_upstream(self) -> None:
        """nginx on cpu0 serving the baseline and sandbox bodies, over HTTP/1.1 and h2c."""
        conf = self.template("upstream.nginx.conf", BASELINE_BODY=body_for("baseline"),
                             SANDBOX_BODY=body_for("sandbox"))
        log_path = self.tmp / "upstream.log"
        process = self.procs.start("upstream nginx", self.pinned(LOADGEN_CPU, [
            self.tools["nginx"], "-p", str(self.tmp), "-e", str(self.tmp / "upstream.error.log"), "-c", str(conf)]),
            log_path)
        for port in (self.baseline_port, self.sandbox_port):
            wait_http(f"http://127.0.0.1:{port}/", process, "upstream nginx", log_path)
        for port, label in ((self.baseline_port, "baseline"), (self.sandbox_port, "sandbox")):
            status, body = http_get(f"http://127.0.0.1:{port}/bench")
            if status != 200 or not body.startswith(b"ok from " + label.encode()):
                raise BenchError(f"upstream HTTP/1.1 {label} port answered {status} {body[:60]!r}")
        self.check_body(self.baseline_h2_port, None, "baseline", "upstream h2c")
        self.check_body(self.sandbox_h2_port, None, "sandbox", "upstream h2c")
        log(f"upstream nginx pid {process.pid}: baseline :{self.baseline_port} (h2c :{self.baseline_h2_port}), "
            f"sandbox :{self.sandbox_port} (h2c :{self.sandbox_h2_port})")

    def check_body(self, port: int, header: str | None, expect: str, what: str) -> None:
        """One HTTP/2 request must come back 200 from the expected upstream."""
        status, body, version = h2c_get(self.tools["curl"], port, header)
        if status != 200 or version != "2" or not body.startswith(b"ok from " + expect.encode()) \
                or len(body) != BODY_BYTES:
            raise BenchError(f"{what}: HTTP/2 GET with {header or 'no baggage'} answered {status} (HTTP/{version}) "
                             f"{body[:60]!r}, expected 200 over HTTP/2 from {expect} ({BODY_BYTES} bytes)")

    def check_routing(self, target: Target) -> None:
        """No key -> baseline, routed key (alone or among members) -> sandbox, another key -> baseline."""
        if target.name == "direct":
            return
        self.check_body(target.port, None, "baseline", target.name)
        self.check_body(target.port, ROUTED_HEADER, "sandbox", target.name)
        self.check_body(target.port, MEMBERS_HEADER, "sandbox", target.name)
        self.check_body(target.port, OTHER_KEY_HEADER, "baseline", target.name)

    # ---- proxies

    def start(self, name: str) -> Target | None:
        """Start one proxy pinned to cpu1 and wait until it routes; None when turnout-h1up is skipped."""
        port = free_port()
        log_path = self.tmp / f"{name}.log"
        admin_port = free_port()
        env = dict(os.environ)
        if name == "nginx":
            conf = self.template("proxy.nginx.conf", PROXY_PORT=port)
            argv = [self.tools["nginx"], "-p", str(self.tmp), "-e", str(self.tmp / "proxy.error.log"), "-c", str(conf)]
        elif name == "haproxy":
            conf = self.template("haproxy.cfg", PROXY_PORT=port)
            argv = [self.tools["haproxy"], "-db", "-f", str(conf)]
        elif name in ("turnout", "turnout-h1up"):
            conf = self.template(name + ".yaml", PROXY_PORT=port, ADMIN_PORT=admin_port)
            argv = [turnout_binary(), "proxy", "--config", str(conf), "--workers", "1"]
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            if name == "turnout-h1up":
                refused = subprocess.run([turnout_binary(), "check-config", str(conf)], capture_output=True,
                                         text=True, timeout=60, check=False, env=env)
                if refused.returncode != 0:
                    self.skip(name, "turnout refuses `upstream_protocol: http1`: "
                              + (refused.stdout + refused.stderr).strip()[-400:])
                    return None
        else:
            raise BenchError("unknown proxy " + name)
        process = self.procs.start(name, self.pinned(PROXY_CPU, argv), log_path, cwd=self.tmp, env=env)
        target = Target(name, port, process)
        try:
            if name.startswith("turnout"):
                wait_http(f"http://127.0.0.1:{admin_port}/ready", process, name, log_path)
                _status, raw = http_get(f"http://127.0.0.1:{admin_port}/config_dump")
                dump = json.loads(raw)
                target.workers = [int(w["pid"]) for w in dump.get("workers", []) if w.get("pid")]
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:  # wait until the proxy answers and routes
                if process.poll() is not None:
                    raise BenchError(f"{name} exited with {process.returncode} during start:\n" + _tail(log_path))
                try:
                    self.check_routing(target)
                    break
                except (OSError, subprocess.SubprocessError, BenchError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except (OSError, subprocess.SubprocessError, BenchError) as exc:
            if name != "turnout-h1up":
                raise
            self.procs.stop(process)
            self.skip(name, "turnout does not route HTTP/2 to HTTP/1.1 upstreams yet: " + str(exc)[-400:])
            return None
        if not name.startswith("turnout"):
            workers = [p for p in target.group() if p != process.pid]
            target.workers = workers or [process.pid]  # nginx: the worker; haproxy: the process itself
        log(f"{name} pid {process.pid} on :{port}, workers {target.workers}, routing checked")
        return target

    def skip(self, name: str, why: str) -> None:
        """Record (and say) why a proxy is not measured."""
        self.skipped[name] = why
        log(f"SKIPPING {name}: {why}")

    # ---- measurements

    def h2load(self, target: Target, argv: list[str], duration_s: float, what: str) -> dict[str, Any]:
        """Run h2load (``argv``) pinned to cpu0, sampling the proxy's CPU and peak worker RSS meanwhile."""
        run = sampled_run(self.procs, self.pinned(LOADGEN_CPU, argv), self.tmp / "h2load.out", target, duration_s,
                          f"h2load ({what}) against {target.name}")
        return {"argv": " ".join(argv), **run}

    def throughput(self, target: Target, header: str | None, duration_s: float, port: int | None = None
                   ) -> dict[str, Any]:
        """Max throughput: h2load -c64 -m10 for ``duration_s``; req/s, errors, proxy cores."""
        argv = [self.tools["h2load"], f"-t{H2LOAD_THREADS}", f"-c{self.args.clients}", f"-m{self.args.streams}",
                f"-D{max(1, round(duration_s))}"]
        if header:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{port or target.port}/bench")
        run = self.h2load(target, argv, duration_s, "throughput")
        text = run.pop("text")
        rps = _search_float(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
        counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", text)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        if rps is None or counts is None or codes is None:
            raise BenchError(f"could not read h2load output against {target.name}:\n{text}")
        done, failed, errored, timeout = (int(counts.group(i)) for i in (3, 5, 6, 7))
        non_2xx = sum(int(codes.group(i)) for i in (2, 3, 4))
        return {"rps": rps, "requests": done, "failed": failed + errored + timeout, "non_2xx": non_2xx,
                "mean_ms": _h2load_mean_ms(text), **run}

    def fixed_rate(self, target: Target, header: str | None, duration_s: float, clients: int,
                   port: int | None = None) -> dict[str, Any]:
        """Latency at a fixed request rate (h2load -m1 --rps, per-request log), and proxy CPU per request."""
        per_client = self.args.rate / clients
        log_file = self.tmp / f"h2load-{target.name}-c{clients}.tsv"
        log_file.unlink(missing_ok=True)  # h2load appends to an existing log file
        argv = [self.tools["h2load"], "-t1", f"-c{clients}", "-m1", f"--rps={per_client:g}",
                f"-D{max(1, round(duration_s))}", f"--log-file={log_file}"]
        if header:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{port or target.port}/bench")
        run = self.h2load(target, argv, duration_s, f"fixed rate -c{clients}")
        text = run.pop("text")
        summary = h2load_log_summary(log_file, f"h2load against {target.name}", text)
        cpu_s = run["proxy_cpu_s"]
        return {
            "rate_target": self.args.rate, "clients": clients, **summary,
            "cores_per_1k_rps": cpu_s / summary["requests"] * 1000 if cpu_s is not None else None, **run,
        }

    def measure(self, target: Target) -> dict[str, Any]:
        """Warm up, then throughput without and with the key, then latency at the fixed rate."""
        routed_port = self.sandbox_h2_port if target.name == "direct" else None  # direct "routed" = sandbox
        shape = f"h2load -t{H2LOAD_THREADS} -c{self.args.clients} -m{self.args.streams}"
        log(f"{target.name}: warm-up {self.args.warmup:g} s")
        self.throughput(target, ROUTED_HEADER, self.args.warmup, routed_port)
        log(f"{target.name}: {shape} {self.args.duration:g} s, no key")
        plain = self.throughput(target, None, self.args.duration)
        log(f"{target.name}:   {plain['rps']:,.0f} req/s, proxy {_fmt(plain['proxy_cores'], '.2f')} cores")
        log(f"{target.name}: {shape} {self.args.duration:g} s, routed key")
        routed = self.throughput(target, ROUTED_HEADER, self.args.duration, routed_port)
        log(f"{target.name}:   {routed['rps']:,.0f} req/s, proxy {_fmt(routed['proxy_cores'], '.2f')} cores")
        self.check_routing(target)  # still routing correctly after the load
        runs = {}
        for key, clients in (("latency", LATENCY_CLIENTS), ("latency_uniform", 1)):
            log(f"{target.name}: h2load -c{clients} -m1 at {self.args.rate:g} req/s for "
                f"{self.args.latency_duration:g} s, routed key")
            run = runs[key] = self.fixed_rate(target, ROUTED_HEADER, self.args.latency_duration, clients, routed_port)
            log(f"{target.name}:   p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms, "
                f"{_fmt(run['achieved_rps'], '.0f')} req/s, cores/1k {_fmt(run['cores_per_1k_rps'], '.4f')}")
        self.check_routing(target)
        rss_values = [v for v in (plain["worker_rss_mb"], routed["worker_rss_mb"],
                                  *(run["worker_rss_mb"] for run in runs.values())) if v]
        return {"throughput_no_key": plain, "throughput_routed": routed, **runs,
                "worker_rss_mb": max(rss_values) if rss_values else None, "worker_pids": target.workers}

    def profile(self, target: Target, out_dir: Path, duration_s: float) -> dict[str, Any]:
        """py-spy the turnout worker under h2load load (routed key); flame graph + own-time table."""
        py_spy = ensure_py_spy()
        if not target.workers:
            raise BenchError("no turnout worker pid to profile")
        pid = target.workers[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        raw, svg = out_dir / "profile.txt", out_dir / "profile.svg"
        seconds = max(1, round(duration_s))
        load = self.procs.start("h2load (profile)", self.pinned(LOADGEN_CPU, [
            self.tools["h2load"], f"-t{H2LOAD_THREADS}", f"-c{self.args.clients}", f"-m{self.args.streams}",
            f"-D{2 * seconds + 30}", "-H", ROUTED_HEADER, f"http://127.0.0.1:{target.port}/bench"]),
            self.tmp / "h2load-profile.out")
        # Blocking mode with native frames first (the compiled build's per-request code is C:
        # without --native py-spy sees only the interpreted rest), then plain blocking mode
        # (py-spy pauses the worker per sample, so time lands on the right frame), --nonblocking
        # as the last fallback; the profiled run's throughput is not reported.
        try:
            time.sleep(1.0)
            errors = []
            for mode in (["--native"], [], ["--nonblocking"]):
                log(f"py-spy record --pid {pid} --duration {seconds} {' '.join(mode)} (raw + flame graph)")
                failed = None
                for fmt, path in (("raw", raw), ("flamegraph", svg)):
                    result = subprocess.run(
                        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
                         "--format", fmt, "--output", str(path), *mode],
                        capture_output=True, text=True, timeout=seconds + 60, check=False)
                    if result.returncode != 0:
                        failed = (result.stdout[-800:] + result.stderr[-800:]).strip()
                        break
                if failed is None:
                    break
                errors.append(" ".join(mode or ["(default)"]) + ": " + failed)
            else:
                raise BenchError("py-spy failed:\n" + "\n".join(errors))
        finally:
            self.procs.stop(load, signal.SIGKILL)
        table = own_time_table(raw)
        summary = out_dir / "summary.md"
        out = {"pid": pid, "mode": " ".join(mode) or "blocking", "raw": str(raw), "flamegraph": str(svg),
               "summary": str(summary), "load": f"h2load -c{self.args.clients} -m{self.args.streams}", **table}
        summary.write_text(profile_markdown(out) + "\n")
        return out


def sampled_run(procs: Processes, argv: list[str], out_path: Path, target: Target, duration_s: float, what: str,
                also: Sequence[int] = ()) -> dict[str, Any]:
    """Run a load generator (``argv``, already pinned) to completion, bounded by ``duration_s`` plus
    slack, sampling meanwhile the CPU of ``target``'s process group (and of ``also``), the
    per-CPU busy time, and the peak RSS of ``target``'s workers. Its output is in ``text``."""
    group = target.group()
    ticks0, also0, stat0, t0 = cpu_ticks(group), cpu_ticks(also), cpu_times(), time.monotonic()
    process = procs.start(what, argv, out_path)
    peak_rss = 0
    deadline = t0 + duration_s + LOADGEN_SLACK_S
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(what + " did not finish in time")
            peak_rss = max(peak_rss, sum(rss_kb(p) for p in target.workers))
            time.sleep(0.2)
    finally:
        procs.stop(process, signal.SIGKILL)
    elapsed = time.monotonic() - t0
    ticks1, also1, stat1 = cpu_ticks(group), cpu_ticks(also), cpu_times()
    text = _tail(out_path, 100000)
    if process.returncode != 0:
        raise BenchError(f"{what} failed ({process.returncode}):\n{text[-3000:]}")
    busy = cpu_busy(stat0, stat1)
    user, system = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
    proxy_cores = (user + system) / CLK_TCK / elapsed if group else None
    return {
        "text": text, "elapsed_s": elapsed,
        "proxy_cpu_s": (user + system) / CLK_TCK if group else None, "proxy_cores": proxy_cores,
        "proxy_sys_share": system / (user + system) if group and user + system else None,
        "cpu_busy": {str(k): round(v, 3) for k, v in busy.items()},
        "cpu1_other": max(0.0, busy.get(PROXY_CPU, 0.0) - (proxy_cores or 0.0)) if group else None,
        "worker_rss_mb": peak_rss / 1024 if target.workers else None,
        "also_cores": (sum(also1) - sum(also0)) / CLK_TCK / elapsed if also else None,
    }


def _h2load_mean_ms(text: str) -> float | None:
    """The mean of h2load's "time for request" line (min, max, mean, ...), in ms."""
    match = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", text)
    if match is None:
        return None
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


# --------------------------------------------------------------------------- report


LATENCY_RUNS = (("latency", ""), ("latency_uniform", "_uniform"))


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Derived numbers per proxy (added latency over direct, req/s per core, ratios) and the verdict."""
    direct = results.get("direct")
    rows: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        plain, routed = r["throughput_no_key"], r["throughput_routed"]
        row: dict[str, Any] = {
            "rps_no_key": plain["rps"], "rps_routed": routed["rps"],
            "cores_per_1k_rps": r["latency"]["cores_per_1k_rps"], "worker_rss_mb": r["worker_rss_mb"],
            "proxy_cores_at_max": plain["proxy_cores"], "proxy_cores_at_max_routed": routed["proxy_cores"],
            "sys_share_at_max": plain["proxy_sys_share"],
            "cpu1_busy_at_max": plain["cpu_busy"].get(str(PROXY_CPU)),
            "cpu1_other_at_max": plain["cpu1_other"], "cpu1_other_at_max_routed": routed["cpu1_other"],
            "cpu1_other_latency": r["latency"]["cpu1_other"],
            # req/s per core the proxy actually got: comparable even when other jobs took part of cpu1
            "rps_per_core_no_key": _ratio(plain["rps"], plain["proxy_cores"]),
            "rps_per_core_routed": _ratio(routed["rps"], routed["proxy_cores"]),
            "achieved_rps": r["latency"]["achieved_rps"], "achieved_rps_uniform": r["latency_uniform"]["achieved_rps"],
            "errors": sum(r[k]["failed"] + r[k]["non_2xx"] for k in ("throughput_no_key", "throughput_routed"))
            + sum(v for key, _ in LATENCY_RUNS for s, v in r[key]["statuses"].items() if not s.startswith("2")),
        }
        for key, suffix in LATENCY_RUNS:
            p50, p99 = r[key]["p50_ms"], r[key]["p99_ms"]
            row["p50_ms" + suffix], row["p99_ms" + suffix] = p50, p99
            if name == "direct" or direct is None:
                row["added_p50_ms" + suffix] = row["added_p99_ms" + suffix] = None
            else:
                row["added_p50_ms" + suffix] = p50 - direct[key]["p50_ms"]
                row["added_p99_ms" + suffix] = p99 - direct[key]["p99_ms"]
        rows[name] = row
    ratios: dict[str, dict[str, Any]] = {}
    for mine in ("turnout", "turnout-h1up"):
        for other in ("nginx", "haproxy"):
            if mine in rows and other in rows:
                ratios[f"{mine} / {other}"] = {
                    key: _ratio(rows[mine][key], rows[other][key])
                    for key in ("rps_no_key", "rps_routed", "rps_per_core_no_key", "rps_per_core_routed",
                                "added_p50_ms", "added_p50_ms_uniform", "cores_per_1k_rps")}
    verdicts: list[dict[str, Any]] = []
    vs_nginx = ratios.get("turnout / nginx")
    if vs_nginx:
        worst = min(v for v in (vs_nginx["rps_no_key"], vs_nginx["rps_routed"]) if v is not None)
        verdicts.append({"target": f"turnout HTTP/2 throughput (1 worker) >= {TARGET_THROUGHPUT_RATIO} x nginx's "
                                   "(1 worker)",
                         "value": f"{worst:.3f} x (worse of no key / routed)",
                         "pass": worst >= TARGET_THROUGHPUT_RATIO})
        per_core = [v for v in (vs_nginx["rps_per_core_no_key"], vs_nginx["rps_per_core_routed"]) if v is not None]
        if per_core:
            # The same target on req/s per core each proxy actually used: it holds when nginx is
            # held back by cpu0 or shares cpu1 with other jobs and raw req/s does not.
            verdicts.append({"target": f"(diagnostic) req/s per proxy core >= {TARGET_THROUGHPUT_RATIO} x nginx's",
                             "value": f"{min(per_core):.3f} x (worse of no key / routed)",
                             "pass": min(per_core) >= TARGET_THROUGHPUT_RATIO, "diagnostic": True})
    return {"rows": rows, "ratios": ratios, "verdicts": verdicts}


def report(summary: dict[str, Any], meta: dict[str, Any], skipped: dict[str, str]) -> str:
    """The markdown report: results, diagnostics, ratios, the verdict, validity notes."""
    rows = summary["rows"]
    lines = [
        f"### bench/http2 — {meta['date']} — turnout {meta['versions'].get('turnout_build', '?')} "
        f"at {meta['versions'].get('turnout_commit', '?')}"
        + (" (uncommitted changes in dataplane/ or filters/)"
           if meta["versions"].get("turnout_uncommitted_changes") == "True" else ""),
        "",
        f"Throughput: `{meta['throughput_argv']}` (h2c, prior knowledge), {meta['duration_s']:g} s per case. "
        f"Latency and CPU: `h2load -m1 --rps` at {meta['rate']:g} req/s total for {meta['latency_duration_s']:g} s, "
        f"routed key: *bursty* = -c{LATENCY_CLIENTS} (bursts of {LATENCY_CLIENTS} every "
        f"{1000 * LATENCY_CLIENTS / meta['rate']:g} ms), *uniform* = -c1 (one request every "
        f"{1000 / meta['rate']:g} ms). Load generator + upstream on cpu{LOADGEN_CPU}, proxy alone on cpu{PROXY_CPU}, "
        "one worker each. Upstream: nginx; turnout and HAProxy speak h2c to it, nginx and turnout-h1up "
        f"HTTP/1.1 ({meta['upstream_idle']} idle keep-alive connections per destination)"
        + (f"; median of {meta['rounds']} interleaved rounds." if meta["rounds"] > 1 else "."),
        "",
        "| proxy | req/s (no key) | req/s (routed key) | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| uniform p50 ms | uniform p99 ms | uniform added p50 ms | CPU cores / 1k req/s | worker RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['rps_no_key']:,.0f} | {r['rps_routed']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {_fmt(r['added_p50_ms'], '.3f')} | {_fmt(r['added_p99_ms'], '.3f')} "
            f"| {r['p50_ms_uniform']:.3f} | {r['p99_ms_uniform']:.3f} | {_fmt(r['added_p50_ms_uniform'], '.3f')} "
            f"| {_fmt(r['cores_per_1k_rps'], '.4f')} | {_fmt(r['worker_rss_mb'], '.1f')} |")
    lines += [
        "",
        "| proxy (diagnostics) | proxy cores used (no key / routed) | kernel share of proxy CPU | cpu1 busy "
        "| other load on cpu1 (no key / routed / latency run) | req/s per proxy core (no key / routed) "
        "| achieved req/s at fixed rate (bursty / uniform) | errors (all runs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_fmt(r['proxy_cores_at_max'], '.2f')} / {_fmt(r['proxy_cores_at_max_routed'], '.2f')} "
            f"| {_fmt(r['sys_share_at_max'], '.0%')} | {_fmt(r['cpu1_busy_at_max'], '.2f')} "
            f"| {_fmt(r['cpu1_other_at_max'], '.2f')} / {_fmt(r['cpu1_other_at_max_routed'], '.2f')} "
            f"/ {_fmt(r['cpu1_other_latency'], '.2f')} "
            f"| {_fmt(r['rps_per_core_no_key'], ',.0f')} / {_fmt(r['rps_per_core_routed'], ',.0f')} "
            f"| {_fmt(r['achieved_rps'], ',.0f')} / {_fmt(r['achieved_rps_uniform'], ',.0f')} | {r['errors']} |")
    if summary["ratios"]:
        lines += ["", "| ratio | req/s (no key) | req/s (routed key) | req/s per proxy core (no key / routed) "
                  "| added p50 (bursty) | added p50 (uniform) | CPU per request |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for pair, r in summary["ratios"].items():
            lines.append(f"| {pair} | {_fmt(r['rps_no_key'], '.3f')} | {_fmt(r['rps_routed'], '.3f')} "
                         f"| {_fmt(r['rps_per_core_no_key'], '.3f')} / {_fmt(r['rps_per_core_routed'], '.3f')} "
                         f"| {_fmt(r['added_p50_ms'], '.2f')} | {_fmt(r['added_p50_ms_uniform'], '.2f')} "
                         f"| {_fmt(r['cores_per_1k_rps'], '.2f')} |")
    if summary["verdicts"]:
        lines += ["", "| target | turnout | verdict |", "|---|---|---|"]
        for v in summary["verdicts"]:
            lines.append(f"| {v['target']} | {v['value']} | {'PASS' if v['pass'] else 'FAIL'} |")
    notes = [f"{name} not measured: {why}" for name, why in skipped.items()]
    for name, r in rows.items():
        cores, busy, other = r["proxy_cores_at_max"], r["cpu1_busy_at_max"], r["cpu1_other_at_max"]
        if name == "direct" or cores is None or cores >= 0.85:
            continue
        if other is not None and other > 0.1:
            notes.append(f"{name} got only {cores:.2f} of cpu{PROXY_CPU} at max throughput: other work took "
                         f"{other:.2f}, so its req/s is low; compare req/s per proxy core instead.")
        elif busy is None or busy < 0.9:
            notes.append(f"{name} used only {cores:.2f} of its core at max throughput while cpu{PROXY_CPU} had idle "
                         f"time: cpu{LOADGEN_CPU} (h2load + upstream) was the limit, so its req/s is a floor"
                         + ("." if name.startswith("turnout") else " and turnout's ratio to it is flattering; "
                            "compare req/s per proxy core too."))
    for name, r in rows.items():
        worst = max((v for v in (r["cpu1_other_at_max"], r["cpu1_other_at_max_routed"], r["cpu1_other_latency"])
                     if v is not None), default=None)
        if worst is not None and worst > 0.1:
            notes.append(f"{name}: up to {worst:.0%} of cpu{PROXY_CPU} went to other work during its runs "
                         "(other jobs, IRQs, softirq) — numbers disturbed.")
        if r["errors"]:
            notes.append(f"{name}: {r['errors']} failed or non-2xx requests.")
    load = meta["load_before"]
    lines += ["", f"Machine: {load['cpus']} CPUs; load average before {load['loadavg']}, "
              f"after {meta['load_after']['loadavg']}; busiest processes before (pid %cpu elapsed name): "
              f"{'; '.join(load['top_processes'][:3])}."]
    lines += ["", *("* " + n for n in notes)] if notes else []
    return "\n".join(lines)


def profile_markdown(profile: dict[str, Any]) -> str:
    """The py-spy tables (own time, libc by caller, own time by line, inclusive time) as markdown."""
    lines = [f"### py-spy ({profile['mode']}), turnout worker pid {profile['pid']} under "
             f"{profile['load']} (routed key), {profile['samples']} samples"]
    for key, title in (("own", "own time by function"), ("libc", "libc calls (syscalls) by Python caller"),
                       ("own_by_line", "own time by line"), ("total", "total (inclusive) time by function")):
        if not profile[key]:
            continue
        lines += ["", f"| {title} | samples | % |", "|---|---:|---:|"]
        lines += [f"| `{row['frame']}` | {row['samples']} | {row['pct']} |" for row in profile[key][:20]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.http2.run",
        description="HTTP/2 (h2c) benchmark: turnout vs nginx vs HAProxy (and the upstream directly), one run, "
                    f"load generator + upstream pinned to cpu{LOADGEN_CPU}, proxy pinned to cpu{PROXY_CPU}.")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per h2load throughput case (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per target (default 2; 1 quick)")
    p.add_argument("--latency-duration", type=float, default=None,
                   help="seconds of each fixed-rate h2load run (default: --duration)")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed request rate for latency and CPU (default 1000)")
    p.add_argument("--clients", type=int, default=H2LOAD_CLIENTS, help="h2load connections for max throughput")
    p.add_argument("--streams", type=int, default=H2LOAD_STREAMS,
                   help="h2load concurrent streams per connection for max throughput (-m)")
    p.add_argument("--upstream-idle", type=int, default=H2LOAD_CLIENTS * H2LOAD_STREAMS,
                   help="idle pooled HTTP/1.1 upstream connections per destination for nginx (keepalive) and "
                        "turnout-h1up (upstream_max_idle_per_destination), and HAProxy's pool-max-conn; default "
                        "%(default)s = the requests h2load keeps in flight, so no proxy churns connections")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every target this many times, interleaved, and report the median run "
                        "(default 1; 3 steadies a shared machine)")
    p.add_argument("--quick", action="store_true", help="short cases (3 s throughput, 5 s latency, 1 s warm-up)")
    p.add_argument("--proxies", default=",".join(PROXIES),
                   help="comma-separated subset of " + ",".join(PROXIES) + " (default all); 'direct' is always run")
    p.add_argument("--profile", action="store_true",
                   help="after measuring turnout, py-spy its worker under h2load load into bench/http2/profile/")
    p.add_argument("--profile-duration", type=float, default=10.0, help="seconds of py-spy sampling (default 10)")
    add_output_options(p, HERE / "results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 3.0 if args.duration == 10.0 else args.duration
        args.warmup = 1.0 if args.warmup is None else args.warmup
        args.latency_duration = 5.0 if args.latency_duration is None else args.latency_duration
    args.warmup = 2.0 if args.warmup is None else args.warmup
    args.latency_duration = args.duration if args.latency_duration is None else args.latency_duration
    args.proxy_list = [x.strip() for x in args.proxies.split(",") if x.strip()]
    unknown = set(args.proxy_list) - set(PROXIES)
    if unknown:
        p.error("unknown proxies: " + ", ".join(sorted(unknown)))
    for name in ("duration", "warmup", "latency_duration", "rate", "profile_duration", "upstream_idle", "clients",
                 "streams", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    if (os.cpu_count() or 1) < 2 or not {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"needs cpu{LOADGEN_CPU} and cpu{PROXY_CPU} available to pin load and proxy apart")
    tools = ensure_tools(install=not args.no_install)
    tools["curl"] = ensure_curl(install=not args.no_install)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "duration_s": args.duration, "warmup_s": args.warmup,
        "latency_duration_s": args.latency_duration, "rate": args.rate,
        "throughput_argv": f"h2load -t{H2LOAD_THREADS} -c{args.clients} -m{args.streams} -D{round(args.duration)} "
                           "[-H 'baggage: turnout-session=bench'] http://127.0.0.1:PORT/bench",
        "latency_clients": [LATENCY_CLIENTS, 1], "routed_header": ROUTED_HEADER, "body_bytes": BODY_BYTES,
        "upstream_idle": args.upstream_idle, "rounds": args.rounds, "loadgen_cpu": LOADGEN_CPU, "proxy_cpu": PROXY_CPU,
        "versions": tool_versions(tools), "load_before": machine_load(),
    }
    log(f"machine load before: {meta['load_before']['loadavg']}; busiest: {meta['load_before']['top_processes'][:3]}")
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-http2-"))
    results: dict[str, dict[str, Any]] = {}
    profile: dict[str, Any] | None = None
    bench = H2Bench(args, tools, tmp, procs)
    with stopping(procs, tmp, args.keep_tmp, log):
        bench.start_upstream()
        targets = [Target("direct", bench.baseline_h2_port)]
        # Every proxy is started before any is measured (an idle one costs nothing), so a
        # proxy that cannot start fails the run before minutes of measuring.
        for name in args.proxy_list:
            target = bench.start(name)
            if target is not None:
                targets.append(target)
        rounds = interleaved([t.name for t in targets], args.rounds, lambda i: bench.measure(targets[i]), log)
        results = {name: median_round(runs) for name, runs in rounds.items()}
        turnout = next((t for t in targets if t.name == "turnout"), None)
        if args.profile and turnout is not None:
            profile = bench.profile(turnout, HERE / "profile", args.profile_duration)
    meta["load_after"] = machine_load()
    summary = summarize(results)
    print(report(summary, meta, bench.skipped))
    if profile:
        print("\n" + profile_markdown(profile) + f"\n\nflame graph: {profile['flamegraph']}")
    args.output.write_text(json.dumps({"meta": meta, "results": results, "summary": summary,
                                       "skipped": bench.skipped, "profile": profile}, indent=2, default=str) + "\n")
    log("wrote " + str(args.output))
    return 0 if all(v["pass"] for v in summary["verdicts"] if not v.get("diagnostic")) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the target passes, 1 when it is missed, 2 on a setup error."""
    args = parse_args(argv)
    return bench_main(lambda: run(args), log)


if __name__ == "__main__":
    sys.exit(main())
