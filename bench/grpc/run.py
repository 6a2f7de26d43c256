"""gRPC unary benchmark: the latency turnout adds to a call, and its max call rate, vs direct.

Usage (from the repository root)::

    .venv/bin/python -m bench.grpc.run                  # 20 s at 500 calls/s, 10 s max rate
    .venv/bin/python -m bench.grpc.run --quick          # 8 s at the rate, 5 s max rate
    .venv/bin/python -m bench.grpc.run --rate 1000 --duration 30
    .venv/bin/python -m bench.grpc.run --rounds 3       # median of 3 interleaved fixed-rate runs

What it does, in one run:

* finds h2load (bench/http1's ``ensure_tools``, which apt-get installs what is missing);
* starts the upstream (``bench/grpc/server.py``, pinned to cpu0): one grpcio asyncio
  process serving the unary method ``/bench.Bench/Echo`` on two ports through a generic
  handler with identity (de)serializers (raw bytes, no .proto), a baseline port and a
  sandbox port, each answering fixed bytes that name it (100 and 104 bytes: the length
  tells them apart for h2load too);
* starts turnout (``bench/grpc/turnout.yaml``; ``turnout proxy --workers 1``, pinned alone
  to cpu1): service ``bench``, baseline = the baseline port, session ``bench`` (metadata
  ``baggage: turnout-session=bench``) -> the sandbox port; checks the routing (no key,
  the key, the key among other members, another key) with grpcio calls before and after
  the load;
* latency at a fixed rate (``--rate``, default 500 calls/s, open loop: ``client.py open``,
  a grpcio client on cpu0 that starts calls on a fixed timetable and measures from the
  *scheduled* start, so stalls are not hidden — coordinated omission), direct to the
  sandbox port and through turnout with the routed key, every reply checked to come from
  the sandbox: p50/p90/p99/max, achieved rate, late starts, client CPU; turnout's CPU
  per 1,000 calls/s and worker RSS;
* max rate, closed loop with ``--concurrency`` (default 32) calls in flight on one HTTP/2
  connection, direct and through turnout: first with h2load (a C client: ``-c1 -m32``,
  POST with ``content-type: application/grpc``, ``te: trailers`` and a length-prefixed
  100-byte message; its per-request log gives p50/p99, and its DATA byte count proves
  every reply was the sandbox's message — h2load does not read grpc-status), then with
  the Python grpc.aio client (``client.py closed``) for comparison;
* prints markdown tables and writes ``bench/grpc/results.json``.

Target (from the lead's brief): **added p50 = turnout p50 - direct p50 <= 1 ms** at the
fixed rate. Validity notes printed with the results: the share of cpu1 used by other work
than turnout (other jobs disturb turnout's numbers), how busy cpu0 was (client plus
upstream: when it is full, the max rate measures them, not turnout — see the upstream's
own CPU), the client's achieved rate and late starts. Exit status: 0 when the target
passes, 1 when it is missed, 2 on a setup error, 130 when interrupted. Everything started
runs in its own process group and is stopped by PID (bench/http1's ``Processes``) on exit,
Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.grpc.client import REQUEST, ROUTED_METADATA
from bench.grpc.server import PATH, REPLY_BYTES, reply_for
from bench.http1.run import (
    LOADGEN_CPU,
    PROXY_CPU,
    START_TIMEOUT_S,
    BenchError,
    Processes,
    Target,
    _fmt,
    _percentile,
    _tail,
    add_output_options,
    bench_main,
    ensure_tools,
    free_port,
    http_get,
    interleaved,
    machine_load,
    render,
    stopping,
    tool_versions,
    turnout_binary,
    wait_http,
)
from bench.http2.run import sampled_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

TARGET_ADDED_P50_MS = 1.0
CHECK_TIMEOUT_S = 3.0
GRPC_PREFIX_BYTES = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    sys.stderr.write("[bench/grpc] " + msg + "\n")
    sys.stderr.flush()


def call_once(port: int, metadata: Sequence[tuple[str, str]]) -> bytes:
    """One unary call to 127.0.0.1:``port``; the reply (raises grpc.RpcError on failure)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: bytes = channel.unary_unary(PATH)(REQUEST, metadata=metadata, timeout=CHECK_TIMEOUT_S)
        return reply


class GrpcBench:
    """One run: the grpcio upstream, turnout in front of it, and the loads against both."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.procs = procs
        self.baseline_port = free_port()
        self.sandbox_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.payload = tmp / "request.grpc"
        self.payload.write_bytes(b"\x00" + struct.pack(">I", len(REQUEST)) + REQUEST)

    def pinned(self, cpu: int, argv: list[str]) -> list[str]:
        """``argv`` under ``taskset -c cpu``."""
        return [self.tools["taskset"], "-c", str(cpu), *argv]

    def server_pids(self) -> list[int]:
        """The upstream server process (its CPU is reported beside the client's)."""
        return [] if self.server is None else [self.server.pid]

    # ---- setup and routing checks

    def start_server(self) -> None:
        """The grpcio upstream on cpu0, serving the baseline and sandbox ports."""
        log_path = self.tmp / "server.log"
        self.server = self.procs.start("grpc upstream", self.pinned(LOADGEN_CPU, [
            sys.executable, "-m", "bench.grpc.server", "--baseline-port", str(self.baseline_port),
            "--sandbox-port", str(self.sandbox_port)]), log_path, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready" not in _tail(log_path):
            if self.server.poll() is not None:
                raise BenchError(f"grpc upstream exited with {self.server.returncode}:\n" + _tail(log_path))
            if time.monotonic() > deadline:
                raise BenchError(f"grpc upstream not ready within {START_TIMEOUT_S:.0f} s:\n" + _tail(log_path))
            time.sleep(0.05)
        self.check_call(self.baseline_port, (), "baseline", "upstream")
        self.check_call(self.sandbox_port, (), "sandbox", "upstream")
        log(f"grpc upstream pid {self.server.pid}: baseline :{self.baseline_port}, sandbox :{self.sandbox_port}")

    def check_call(self, port: int, metadata: Sequence[tuple[str, str]], expect: str, what: str) -> None:
        """One call must succeed with the reply of the expected upstream."""
        try:
            reply = call_once(port, metadata)
        except grpc.RpcError as exc:
            raise BenchError(f"{what}: call with {list(metadata) or 'no baggage'} failed: {exc}") from exc
        if reply != reply_for(expect):
            raise BenchError(f"{what}: call with {list(metadata) or 'no baggage'} answered {reply[:40]!r}, "
                             f"expected the {expect} reply")

    def check_routing(self, target: Target) -> None:
        """No key -> baseline; the key, alone or among members -> sandbox; another key -> baseline."""
        self.check_call(target.port, (), "baseline", target.name)
        self.check_call(target.port, ROUTED_METADATA, "sandbox", target.name)
        self.check_call(target.port, (("baggage", "userId=alice,turnout-session=bench;p=1"),), "sandbox", target.name)
        self.check_call(target.port, (("baggage", "turnout-session=other"),), "baseline", target.name)

    def start_turnout(self) -> Target:
        """turnout pinned alone to cpu1, one worker; returns once it routes."""
        port, admin_port = free_port(), free_port()
        conf = render(str(HERE / "turnout.yaml"), self.tmp / "turnout.yaml", {
            "ADMIN_PORT": admin_port, "PROXY_PORT": port, "BASELINE_PORT": self.baseline_port,
            "SANDBOX_PORT": self.sandbox_port})
        log_path = self.tmp / "turnout.log"
        process = self.procs.start("turnout", self.pinned(PROXY_CPU, [
            turnout_binary(), "proxy", "--config", str(conf), "--workers", "1"]), log_path, cwd=self.tmp, env=self.env)
        wait_http(f"http://127.0.0.1:{admin_port}/ready", process, "turnout", log_path)
        _status, raw = http_get(f"http://127.0.0.1:{admin_port}/config_dump")
        target = Target("turnout", port, process,
                        [int(w["pid"]) for w in json.loads(raw).get("workers", []) if w.get("pid")])
        self.check_routing(target)
        log(f"turnout pid {process.pid} on :{port}, workers {target.workers}, routing checked")
        return target

    # ---- measurements

    def open_loop(self, target: Target, port: int) -> dict[str, Any]:
        """``client.py open`` at the fixed rate with the routed key; replies must be the sandbox's."""
        argv = [sys.executable, "-m", "bench.grpc.client", "open", "--target", f"127.0.0.1:{port}",
                "--rate", f"{self.args.rate:g}", "--duration", f"{self.args.duration:g}", "--warmup",
                f"{self.args.warmup:g}", "--routed", "--expect", "sandbox"]
        log(f"{target.name}: open loop at {self.args.rate:g} calls/s for {self.args.duration:g} s (grpcio client)")
        run = self.client(target, argv, self.args.duration + self.args.warmup, "open loop")
        lat = run["latency"]
        log(f"{target.name}:   p50 {_fmt(lat['p50_ms'], '.3f')} ms, p99 {_fmt(lat['p99_ms'], '.3f')} ms, "
            f"{_fmt(run['achieved_rps'], '.1f')} calls/s, {run['late_sends']} late starts")
        calls = run["warmup_calls"] + run["calls"]  # turnout's CPU was sampled over the warm-up too
        run["cores_per_1k_rps"] = run["proxy_cpu_s"] / calls * 1000 if run["proxy_cpu_s"] is not None else None
        return run

    def closed_loop_python(self, target: Target, port: int) -> dict[str, Any]:
        """``client.py closed``: ``--concurrency`` calls in flight with grpc.aio, routed key."""
        argv = [sys.executable, "-m", "bench.grpc.client", "closed", "--target", f"127.0.0.1:{port}",
                "--concurrency", str(self.args.concurrency), "--duration", f"{self.args.max_duration:g}",
                "--routed", "--expect", "sandbox"]
        log(f"{target.name}: closed loop, {self.args.concurrency} in flight, {self.args.max_duration:g} s "
            "(grpc.aio client)")
        run = self.client(target, argv, self.args.max_duration + 1.0, "closed loop (grpc.aio)")
        log(f"{target.name}:   {run['rps']:,.0f} calls/s, p50 {_fmt(run['latency']['p50_ms'], '.3f')} ms")
        return run

    def client(self, target: Target, argv: list[str], duration_s: float, what: str) -> dict[str, Any]:
        """Run a client.py load pinned to cpu0 and merge its JSON with the sampled CPU numbers."""
        out_path = self.tmp / "client.out"
        run = sampled_run(self.procs, self.pinned(LOADGEN_CPU, argv), out_path, target, duration_s,
                          f"{what} against {target.name}", also=self.server_pids())
        text = run.pop("text")
        try:
            result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise BenchError(f"{what} against {target.name}: no result\n{text[-2000:]}") from exc
        if result["wrong_upstream"] or result["errors"]:
            raise BenchError(f"{what} against {target.name}: {result['wrong_upstream']} replies from the wrong "
                             f"upstream, errors {result['errors']}")
        return {**result, **run, "server_cores": run.pop("also_cores")}

    def closed_loop_h2load(self, target: Target, port: int) -> dict[str, Any]:
        """h2load -c1 -m<concurrency>: gRPC unary POSTs on one connection, routed key, per-request log."""
        log_file = self.tmp / f"h2load-{target.name}.tsv"
        log_file.unlink(missing_ok=True)  # h2load appends to an existing log file
        argv = [self.tools["h2load"], "-t1", "-c1", f"-m{self.args.concurrency}",
                f"-D{max(1, round(self.args.max_duration))}", "-H", "content-type: application/grpc",
                "-H", "te: trailers", "-H", "baggage: turnout-session=bench", "-d", str(self.payload),
                f"--log-file={log_file}", f"http://127.0.0.1:{port}{PATH}"]
        log(f"{target.name}: h2load -c1 -m{self.args.concurrency} gRPC for {self.args.max_duration:g} s")
        run = sampled_run(self.procs, self.pinned(LOADGEN_CPU, argv), self.tmp / "h2load.out", target,
                          self.args.max_duration, f"h2load against {target.name}", also=self.server_pids())
        text = run.pop("text")
        rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
        counts = re.search(r"requests: \d+ total, (\d+) started, (\d+) done, \d+ succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", text)
        data = re.search(r"traffic: .*?\((\d+)\) data", text)
        if rps is None or counts is None or data is None:
            raise BenchError(f"could not read h2load output against {target.name}:\n{text[-2000:]}")
        started, done = int(counts.group(1)), int(counts.group(2))
        failed = sum(int(counts.group(i)) for i in (3, 4, 5))
        # Every reply is the sandbox's message: DATA bytes = prefix + its 104 bytes per call (the
        # baseline's is 100, a gRPC error carries none), for every call done and at most every
        # call started (those in flight when the time ran out). h2load does not read grpc-status.
        data_bytes = int(data.group(1))
        expected = GRPC_PREFIX_BYTES + REPLY_BYTES["sandbox"]
        if failed or not done * expected <= data_bytes <= started * expected:
            raise BenchError(f"h2load against {target.name}: {failed} failed; {data_bytes} DATA bytes for {done} calls "
                             f"done, {started} started: expected {expected} per call (the sandbox reply)")
        data_per_call = data_bytes / done
        latencies = sorted(int(line.split("\t")[2]) for line in log_file.read_text().splitlines()
                           if line.count("\t") >= 2)
        statuses = {line.split("\t")[1] for line in log_file.read_text().splitlines() if line.count("\t") >= 2}
        if not latencies or statuses != {"200"}:
            raise BenchError(f"h2load against {target.name}: statuses {sorted(statuses)} in its log")
        result = {
            "client": "h2load (C, nghttp2)", "mode": "closed loop", "concurrency": self.args.concurrency,
            "calls": done, "rps": float(rps.group(1)), "data_bytes_per_call": data_per_call,
            "latency": {"p50_ms": _percentile(latencies, 50) / 1000, "p90_ms": _percentile(latencies, 90) / 1000,
                        "p99_ms": _percentile(latencies, 99) / 1000, "max_ms": latencies[-1] / 1000},
            "argv": " ".join(argv), **run, "server_cores": run.pop("also_cores"),
        }
        log(f"{target.name}:   {result['rps']:,.0f} calls/s, p50 {result['latency']['p50_ms']:.3f} ms")
        return result


# --------------------------------------------------------------------------- report


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Added latency, turnout/direct max-rate ratios, and the verdict."""
    # Each percentile's median over the rounds on its own: the run with the median p50 may
    # hold a disturbed p99, and differences of those would mix a quiet and a busy moment.
    direct, turnout = (
        {k: statistics.median(run["latency"][k] for run in results[name]["open_loop_rounds"])
         for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")} for name in ("direct", "turnout"))
    added = {k: turnout[k] - direct[k] for k in direct}
    ratios = {client: results["turnout"][key]["rps"] / results["direct"][key]["rps"]
              for client, key in (("h2load", "max_h2load"), ("grpc.aio", "max_python"))
              if key in results["turnout"] and key in results["direct"]}
    verdicts = [{"target": f"added p50 at the fixed rate <= {TARGET_ADDED_P50_MS:g} ms",
                 "value": f"{added['p50_ms']:.3f} ms (turnout {turnout['p50_ms']:.3f} - direct {direct['p50_ms']:.3f})",
                 "pass": added["p50_ms"] <= TARGET_ADDED_P50_MS}]
    return {"added_ms": added, "max_rate_ratio": ratios, "verdicts": verdicts}


def report(results: dict[str, dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown report: fixed-rate latency, max rate, the verdict, validity notes."""
    lines = [
        f"### bench/grpc — {meta['date']} — turnout {meta['versions'].get('turnout_build', '?')} "
        f"at {meta['versions'].get('turnout_commit', '?')}"
        + (" (uncommitted changes in dataplane/ or filters/)"
           if meta["versions"].get("turnout_uncommitted_changes") == "True" else ""),
        "",
        f"Unary `{PATH}`, {len(REQUEST)}-byte request, {REPLY_BYTES['sandbox']}-byte reply (sandbox), "
        "grpcio asyncio upstream and the clients on cpu0, turnout (one worker) alone on cpu1; every call carries "
        "`baggage: turnout-session=bench` and must be answered by the sandbox (direct = the sandbox port).",
        "",
        f"Fixed rate, open loop ({meta['rate']:g} calls/s for {meta['duration_s']:g} s after "
        f"{meta['warmup_s']:g} s warm-up; grpcio client, latency from the scheduled start"
        + (f"; per path the run with the median p50 of {meta['rounds']} interleaved rounds):" if meta["rounds"] > 1
           else "):"),
        "",
        "| path | achieved calls/s | late starts (>1 ms) | p50 ms | p90 ms | p99 ms | max ms "
        "| p50 / p99 from actual start ms | client cores | turnout cores / 1k calls/s | turnout worker RSS MB "
        "| other load on cpu1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        o = r["open_loop"]
        lat, act = o["latency"], o["latency_from_actual_start"]
        lines.append(
            f"| {name} | {_fmt(o['achieved_rps'], ',.1f')} | {o['late_sends']} | {lat['p50_ms']:.3f} "
            f"| {lat['p90_ms']:.3f} | {lat['p99_ms']:.3f} | {lat['max_ms']:.3f} "
            f"| {act['p50_ms']:.3f} / {act['p99_ms']:.3f} | {o['client_cores']:.2f} "
            f"| {_fmt(o['cores_per_1k_rps'], '.3f')} | {_fmt(o['worker_rss_mb'], '.1f')} "
            f"| {_fmt(o['cpu1_other'], '.2f')} |")
    added = summary["added_ms"]
    lines += ["", "| added by turnout" + (" (each the median over the rounds)" if meta["rounds"] > 1 else "")
              + " | p50 ms | p90 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|",
              f"| turnout − direct | {added['p50_ms']:.3f} | {added['p90_ms']:.3f} | {added['p99_ms']:.3f} "
              f"| {added['max_ms']:.3f} |"]
    if meta["rounds"] > 1:
        lines += ["", "p50 / p99 ms per round: " + "; ".join(
            name + " " + ", ".join(f"{run['latency']['p50_ms']:.3f} / {run['latency']['p99_ms']:.3f}"
                                   for run in r["open_loop_rounds"]) for name, r in results.items())]
    lines += ["", f"Max rate, closed loop ({meta['concurrency']} calls in flight on one HTTP/2 connection, "
              f"{meta['max_duration_s']:g} s):", "",
              "| path | client | calls/s | p50 ms | p99 ms | turnout cores | cpu0 busy | upstream server cores "
              "| other load on cpu1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("max_h2load", "max_python"):
        for name, r in results.items():
            if key not in r:
                continue
            m = r[key]
            lines.append(f"| {name} | {m['client']} | {m['rps']:,.0f} | {m['latency']['p50_ms']:.3f} "
                         f"| {m['latency']['p99_ms']:.3f} | {_fmt(m['proxy_cores'], '.2f')} "
                         f"| {m['cpu_busy'].get(str(LOADGEN_CPU), 0.0):.2f} | {_fmt(m['server_cores'], '.2f')} "
                         f"| {_fmt(m['cpu1_other'], '.2f')} |")
    if summary["max_rate_ratio"]:
        lines += ["", "turnout / direct max rate: " + ", ".join(
            f"{v:.3f} ({client})" for client, v in summary["max_rate_ratio"].items())]
    lines += ["", "| target | turnout | verdict |", "|---|---|---|"]
    lines += [f"| {v['target']} | {v['value']} | {'PASS' if v['pass'] else 'FAIL'} |" for v in summary["verdicts"]]
    notes = []
    for name, r in results.items():
        o = r["open_loop"]
        if o["achieved_rps"] is not None and o["achieved_rps"] < 0.98 * meta["rate"]:
            notes.append(f"{name}: the client reached only {o['achieved_rps']:.1f} of {meta['rate']:g} calls/s.")
        if o["late_sends"] > 0.01 * o["calls"]:
            notes.append(f"{name}: {o['late_sends']} of {o['calls']} calls started over 1 ms late (client stalls; "
                         "their lateness is in the latency, as it should be).")
        for key in ("open_loop", "max_h2load", "max_python"):
            other = r.get(key, {}).get("cpu1_other")
            if other is not None and other > 0.1:
                notes.append(f"{name} ({key}): {other:.0%} of cpu{PROXY_CPU} went to other work than turnout "
                             "(other jobs, IRQs, softirq) — numbers disturbed.")
    h2 = results["turnout"].get("max_h2load")
    if h2 and h2["proxy_cores"] is not None and h2["proxy_cores"] < 0.85:
        notes.append(f"turnout used only {h2['proxy_cores']:.2f} of cpu{PROXY_CPU} at max rate (h2load): the limit "
                     f"was elsewhere (cpu{LOADGEN_CPU}: the upstream server and the client), so it is a floor.")
    py = results["direct"].get("max_python")
    if py and py["cpu_busy"].get(str(LOADGEN_CPU), 0.0) > 0.9:
        notes.append(f"the grpc.aio closed loop is bound by cpu{LOADGEN_CPU} (Python client and upstream share it): "
                     "its rates measure the client, not turnout; h2load's are the max-rate numbers.")
    d = results["direct"].get("max_h2load")
    if d and d["cpu_busy"].get(str(LOADGEN_CPU), 0.0) > 0.9:
        notes.append(f"direct max rate is the grpcio upstream's ceiling on cpu{LOADGEN_CPU} (shared with the client; "
                     f"server {_fmt(d['server_cores'], '.2f')} cores), not a property of the network path.")
    load = meta["load_before"]
    lines += ["", f"Machine: {load['cpus']} CPUs; load average before {load['loadavg']}, "
              f"after {meta['load_after']['loadavg']}; busiest processes before (pid %cpu elapsed name): "
              f"{'; '.join(load['top_processes'][:3])}."]
    lines += ["", *("* " + n for n in notes)] if notes else []
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.grpc.run",
                                description="gRPC unary benchmark: turnout's added latency and max rate vs direct.")
    p.add_argument("--rate", type=float, default=500.0, help="fixed call rate, open loop (default 500)")
    p.add_argument("--duration", type=float, default=None, help="seconds at the fixed rate (default 20; quick 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds at the rate before measuring (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fixed-rate runs per path, interleaved; the run with the median p50 is reported (default 1)")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight for the max rate (default 32)")
    p.add_argument("--max-duration", type=float, default=None,
                   help="seconds of each max-rate run (default 10; quick 5)")
    p.add_argument("--quick", action="store_true", help="8 s at the fixed rate, 5 s per max-rate run")
    add_output_options(p, HERE / "results.json")
    args = p.parse_args(argv)
    args.duration = args.duration or (8.0 if args.quick else 20.0)
    args.max_duration = args.max_duration or (5.0 if args.quick else 10.0)
    for name in ("rate", "duration", "warmup", "concurrency", "max_duration", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    if (os.cpu_count() or 1) < 2 or not {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"needs cpu{LOADGEN_CPU} and cpu{PROXY_CPU} available to pin load and proxy apart")
    tools = ensure_tools(install=not args.no_install)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "rate": args.rate, "duration_s": args.duration,
        "warmup_s": args.warmup, "rounds": args.rounds, "concurrency": args.concurrency,
        "max_duration_s": args.max_duration,
        "method": PATH, "request_bytes": len(REQUEST), "reply_bytes": REPLY_BYTES,
        "upstream": "grpcio " + grpc.__version__ + " asyncio server (Python), generic handler",
        "loadgen_cpu": LOADGEN_CPU, "proxy_cpu": PROXY_CPU,
        "versions": tool_versions(tools), "load_before": machine_load(),
    }
    log(f"machine load before: {meta['load_before']['loadavg']}; busiest: {meta['load_before']['top_processes'][:3]}")
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-grpc-"))
    results: dict[str, dict[str, Any]] = {}
    with stopping(procs, tmp, args.keep_tmp, log):
        bench = GrpcBench(args, tools, tmp, procs)
        bench.start_server()
        turnout = bench.start_turnout()
        direct = Target("direct", bench.sandbox_port)
        paths = ((direct, bench.sandbox_port), (turnout, turnout.port))
        open_rounds = interleaved([target.name for target, _ in paths], args.rounds,
                                  lambda i: bench.open_loop(*paths[i]), log)
        for name, runs in open_rounds.items():
            median = sorted(runs, key=lambda run: float(run["latency"]["p50_ms"]))[len(runs) // 2]
            results[name] = {"open_loop": median, "open_loop_rounds": runs}
        bench.check_routing(turnout)
        for target, port in paths:
            results[target.name]["max_h2load"] = bench.closed_loop_h2load(target, port)
        for target, port in paths:
            results[target.name]["max_python"] = bench.closed_loop_python(target, port)
        bench.check_routing(turnout)  # still routing correctly after the load
        results["turnout"]["worker_pids"] = turnout.workers
    meta["load_after"] = machine_load()
    summary = summarize(results)
    print(report(results, summary, meta))
    args.output.write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2,
                                      default=str) + "\n")
    log("wrote " + str(args.output))
    return 0 if all(v["pass"] for v in summary["verdicts"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the target passes, 1 when it is missed, 2 on a setup error."""
    args = parse_args(argv)
    return bench_main(lambda: run(args), log)


if __name__ == "__main__":
    sys.exit(main())
