"""Memory benchmark: the whole proxy's RSS after load, one worker with a live control-plane
stream, beside nginx's in front of the same upstream.

Usage (from the repository root)::

    .venv/bin/python -m bench.memory.run                  # 3 rounds of 8 s per proxy, about 2 minutes
    .venv/bin/python -m bench.memory.run --seconds 8 --rounds 3 --json bench/memory/results.json

What it does, all on 127.0.0.1 ephemeral ports:

* starts bench/http1's C upstream (nginx, one worker, a fixed 100-byte body on a baseline
  and a sandbox port) and ``turnout control-plane`` (an admin token file, a temporary SQLite
  file), both pinned to cpu0, and creates one session through the control plane's API: key
  ``bench`` routes the service ``bench`` to the sandbox port;
* each round, starts ``turnout proxy --workers 1`` pinned to cpu1 with one inbound listener
  (baseline: the upstream), an admin listener and a ``control_plane`` section (the token
  file, a node id, a state file in the temporary directory); checks that ``/config_dump``
  reports the stream connected and that the session, which only the stream can have
  brought, routes (``baggage: turnout-session=bench`` -> sandbox, no key -> baseline); runs
  ``wrk -t1 -c64`` with that header for ``--seconds`` on cpu0, summing the proxy's RSS every
  0.2 s for the peak; then reads VmRSS of the ``turnout proxy`` process and every one of its
  descendants, each with its command line, checks the routing again and stops the proxy;
* the same round with nginx as the proxy (bench/http1's ``proxy.nginx.conf``, one worker,
  pinned to cpu1): master + worker, and the worker alone;
* records the control plane's RSS apart: it is not part of the proxy.

Both proxies keep up to 64 idle upstream connections (the wrk connection count), as in
bench/http1. MB are MiB (VmRSS kB / 1024). Prints markdown tables (each round, the median
and the max) and writes JSON. Exit status: 0 when the whole proxy stays within 50 MB after
the load in every round, 1 when not, 2 on a setup error, 130 when interrupted. Every
process it starts is stopped by PID (and its process group) on exit, Ctrl-C, SIGTERM or
failure, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.http1.run import (
    LOADGEN_CPU,
    PROXY_CPU,
    ROUTED_HEADER,
    START_TIMEOUT_S,
    WRK_CONNECTIONS,
    WRK_THREADS,
    Bench,
    BenchError,
    Processes,
    Target,
    _stat_fields,
    _tail,
    _which,
    bench_main,
    free_port,
    http_get,
    interleaved,
    machine_load,
    rss_kb,
    stopping,
    turnout_binary,
    wait_http,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

TARGET_MB = 50.0  # acceptance: the whole proxy, after the load
TOOLS = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"}  # binary -> Debian package
TOKEN = "bench-memory-admin-token-0123456789"
SERVICE = "bench"
SESSION_KEY = "bench"  # the key ROUTED_HEADER carries
PROXIES = ("turnout", "nginx")
_CONTROL_PLANE_READY = re.compile(r"api (http://\S+) grpc (\S+);")


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    sys.stderr.write("[bench/memory] " + msg + "\n")
    sys.stderr.flush()


def find_tools() -> dict[str, str]:
    """Paths of wrk, nginx and taskset; a missing one is a ``BenchError`` naming its package."""
    paths = {}
    for binary, package in TOOLS.items():
        path = _which(binary)
        if path is None:
            raise BenchError(f"{binary} not found: apt-get install {package}")
        paths[binary] = path
    return paths


# --------------------------------------------------------------------------- processes and their memory


def descendants(root: int, parent_of: Mapping[int, int]) -> list[int]:
    """``root`` and every process below it, ascending, given each live process's parent PID;
    a process missing from ``parent_of`` is gone and left out, with what was below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in parent_of:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return sorted(found)


def live_parents() -> dict[int, int]:
    """Every live process's parent PID, from /proc (zombies left out: they hold no memory)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z":
                out[int(entry)] = int(fields[1])
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the rounds' values, to one decimal."""
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


class ProxyTree(Target):
    """A proxy whose processes are its first process and all its descendants (not its
    process group: whatever it starts counts, in whichever group)."""

    def group(self) -> list[int]:
        """The first process and its live descendants."""
        return [] if self.process is None else descendants(self.process.pid, live_parents())


def command_line(pid: int, tmp: Path) -> str:
    """The process's arguments joined by spaces, the run's temporary directory shown as ``$TMP``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace").replace(str(tmp), "$TMP")


def memory_of(pid: int, tmp: Path) -> dict[str, Any]:
    """VmRSS of ``pid`` and each of its descendants, with their command lines, and the sum."""
    parents = live_parents()
    processes: list[dict[str, Any]] = [
        {"pid": p, "ppid": parents[p], "rss_kb": rss_kb(p), "cmdline": command_line(p, tmp)}
        for p in descendants(pid, parents)]
    return {"total_kb": sum(p["rss_kb"] for p in processes), "processes": processes}


# --------------------------------------------------------------------------- the run


class MemoryBench:
    """One run: the upstream and the control plane for its whole length, fresh proxies each round."""

    def __init__(self, bench: Bench, seconds: int) -> None:
        self.bench = bench
        self.seconds = seconds
        self.tmp = bench.tmp
        self.token_file = bench.tmp / "admin.token"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        XDG_STATE_HOME=str(bench.tmp / "state"))
        self.env.pop("TURNOUT_TOKEN", None)
        self.turnouts_started = 0
        self.control_plane, self.api, self.grpc = self.start_control_plane()
        self.create_session()

    def start_control_plane(self) -> tuple[subprocess.Popen[bytes], str, str]:
        """``turnout control-plane`` on cpu0 with an admin token file and a temporary database;
        returns the process, its API URL and its gRPC address."""
        self.token_file.write_text(TOKEN + "\n")
        log_path = self.tmp / "control-plane.log"
        process = self.bench.procs.start("control plane", self.bench.pinned(LOADGEN_CPU, [
            turnout_binary(), "control-plane", "--api", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
            "--db", str(self.tmp / "sessions.db"), "--token-file", str(self.token_file), "--id", "bench-memory"]),
            log_path, cwd=self.tmp, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (found := _CONTROL_PLANE_READY.search(_tail(log_path))) is None:
            if process.poll() is not None:
                raise BenchError(f"control plane exited with {process.returncode} during start:\n" + _tail(log_path))
            if time.monotonic() > deadline:
                raise BenchError(f"control plane not ready within {START_TIMEOUT_S:.0f} s:\n" + _tail(log_path))
            time.sleep(0.05)
        log(f"control plane pid {process.pid}: api {found.group(1)}, grpc {found.group(2)}")
        return process, found.group(1), found.group(2)

    def create_session(self) -> None:
        """Through the API: key ``bench`` routes the service to the upstream's sandbox port."""
        body = {"id": "bench", "key": SESSION_KEY,
                "routes": [{"service": SERVICE, "destination": f"127.0.0.1:{self.bench.sandbox_port}"}]}
        request = urllib.request.Request(self.api + "/v1/sessions", data=json.dumps(body).encode(), method="POST",
                                         headers={"authorization": "Bearer " + TOKEN,
                                                  "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise BenchError(f"the control plane refused the session: {exc.code} {exc.read()[:200]!r}") from None
        except OSError as exc:
            raise BenchError(f"the control plane's API at {self.api} did not answer: {exc}") from None

    def start_turnout(self) -> tuple[ProxyTree, dict[str, Any]]:
        """``turnout proxy --workers 1`` on cpu1 with a control-plane section; returns once the
        stream is connected and the session it pushed routes, with the stream's status."""
        self.turnouts_started += 1
        run_dir = Path(tempfile.mkdtemp(prefix="turnout-", dir=self.tmp))
        port, admin_port = free_port(), free_port()
        config = {
            "admin": {"address": f"127.0.0.1:{admin_port}"},
            "listeners": [{"name": "bench", "address": f"127.0.0.1:{port}", "mode": "inbound", "service": SERVICE,
                           "baseline": f"127.0.0.1:{self.bench.baseline_port}"}],
            "control_plane": {"address": self.grpc, "token_file": str(self.token_file),
                              "node_id": f"bench-memory-{self.turnouts_started}",
                              "state_path": str(run_dir / "state.json")},
            "limits": {"upstream_max_idle_per_destination": WRK_CONNECTIONS},
        }
        path = run_dir / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = run_dir / "proxy.log"
        process = self.bench.procs.start("turnout", self.bench.pinned(PROXY_CPU, [
            turnout_binary(), "proxy", "--config", str(path), "--workers", "1"]), log_path, cwd=run_dir, env=self.env)
        wait_http(f"http://127.0.0.1:{admin_port}/ready", process, "turnout", log_path)
        _status, raw = http_get(f"http://127.0.0.1:{admin_port}/config_dump")
        dump = json.loads(raw)
        stream = dump.get("control_plane") or {}
        if stream.get("state") != "connected" or not stream.get("sessions"):
            raise BenchError(f"turnout is ready but its control-plane stream is not up (state {stream.get('state')}, "
                             f"{stream.get('sessions')} pushed sessions, last error {stream.get('last_error')!r}); "
                             f"see {log_path}")
        target = ProxyTree("turnout", port, process, [int(w["pid"]) for w in dump.get("workers", []) if w.get("pid")])
        self.bench.check_routing(target)
        log(f"turnout pid {process.pid} on :{port}: stream to {stream['address']} connected, version "
            f"{stream['version']}, {stream['sessions']} pushed session(s); the pushed key routes")
        return target, stream

    def turnout_round(self) -> dict[str, Any]:
        """A fresh turnout: start, load, measure, stop; the control plane is measured too."""
        target, stream = self.start_turnout()
        result = self.measure(target)
        result["control_plane_stream"] = stream
        result["control_plane"] = memory_of(self.control_plane.pid, self.tmp)
        assert target.process is not None
        self.bench.procs.stop(target.process)
        return result

    def nginx_round(self) -> dict[str, Any]:
        """A fresh nginx proxy (master + one worker): start, load, measure, stop."""
        started = self.bench.start("nginx")
        target = ProxyTree(started.name, started.port, started.process, started.workers)
        result = self.measure(target)
        assert target.process is not None
        self.bench.procs.stop(target.process)
        return result

    def measure(self, target: ProxyTree) -> dict[str, Any]:
        """RSS before the load, its peak during ``wrk`` with the routed key, and after it (each process)."""
        assert target.process is not None
        pid = target.process.pid
        idle = memory_of(pid, self.tmp)
        log(f"{target.name}: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{self.seconds}s -H '{ROUTED_HEADER}'")
        load = self.bench.wrk(target, ROUTED_HEADER, self.seconds)
        after = memory_of(pid, self.tmp)
        self.bench.check_routing(target)  # still routing after the load
        worker_kb = sum(p["rss_kb"] for p in after["processes"] if p["pid"] in target.workers)
        log(f"{target.name}: {load['rps']:,.0f} req/s; after the load {after['total_kb'] / 1024:.1f} MB in "
            f"{len(after['processes'])} process(es), peak during it {load['group_rss_mb']:.1f} MB")
        return {
            "idle": idle, "after_load": after, "peak_during_load_mb": round(load["group_rss_mb"], 1),
            "worker_pids": target.workers, "worker_after_load_kb": worker_kb,
            "wrk": {key: load[key] for key in ("rps", "requests", "non_2xx", "socket_errors", "proxy_cores")},
        }


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Median, min and max over the rounds (MB), and the verdict against the target."""
    turnout, nginx = runs["turnout"], runs["nginx"]
    summary: dict[str, Any] = {
        "turnout_every_process_after_load_mb": spread([r["after_load"]["total_kb"] / 1024 for r in turnout]),
        "turnout_peak_during_load_mb": spread([r["peak_during_load_mb"] for r in turnout]),
        "turnout_before_load_mb": spread([r["idle"]["total_kb"] / 1024 for r in turnout]),
        "nginx_master_and_worker_after_load_mb": spread([r["after_load"]["total_kb"] / 1024 for r in nginx]),
        "nginx_worker_after_load_mb": spread([r["worker_after_load_kb"] / 1024 for r in nginx]),
        "nginx_peak_during_load_mb": spread([r["peak_during_load_mb"] for r in nginx]),
        "control_plane_mb": spread([r["control_plane"]["total_kb"] / 1024 for r in turnout]),
        "target_mb": TARGET_MB,
    }
    summary["pass"] = summary["turnout_every_process_after_load_mb"]["max"] <= TARGET_MB
    return summary


def report(result: Mapping[str, Any]) -> str:
    """The markdown report: each round, median and max, every process, the verdict."""
    meta, summary, runs = result["meta"], result["summary"], result["rounds"]
    lines = [
        f"### bench/memory — {meta['date']} — turnout {meta['build']} at {meta['commit'][:7]}",
        "",
        f"`wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{meta['seconds']}s -H '{ROUTED_HEADER}'` against each proxy "
        f"(one worker, pinned to cpu{PROXY_CPU}; wrk, the upstream and the control plane on cpu{LOADGEN_CPU}); "
        f"{meta['rounds']} round(s), fresh proxy processes each round. VmRSS in MB (MiB), read after the load; "
        "peak: the highest sum sampled every 0.2 s during it.",
        "",
        "| round | turnout: every process, after load | turnout peak | nginx: master + worker, after load "
        "| nginx worker | nginx peak | control plane (not part of the proxy) | req/s turnout / nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (t, n) in enumerate(zip(runs["turnout"], runs["nginx"], strict=True), 1):
        lines.append(f"| {i} | {t['after_load']['total_kb'] / 1024:.1f} | {t['peak_during_load_mb']:.1f} "
                     f"| {n['after_load']['total_kb'] / 1024:.1f} | {n['worker_after_load_kb'] / 1024:.1f} "
                     f"| {n['peak_during_load_mb']:.1f} | {t['control_plane']['total_kb'] / 1024:.1f} "
                     f"| {t['wrk']['rps']:,.0f} / {n['wrk']['rps']:,.0f} |")
    columns = ("turnout_every_process_after_load_mb", "turnout_peak_during_load_mb",
               "nginx_master_and_worker_after_load_mb", "nginx_worker_after_load_mb", "nginx_peak_during_load_mb",
               "control_plane_mb")
    for stat in ("median", "max"):
        lines.append(f"| **{stat}** | " + " | ".join(f"**{summary[c][stat]:.1f}**" for c in columns) + " | |")
    lines += ["", "| round | proxy | pid | ppid | RSS MB before load | RSS MB after load | command line |",
              "|---|---|---:|---:|---:|---:|---|"]
    for i, (t, n) in enumerate(zip(runs["turnout"], runs["nginx"], strict=True), 1):
        sides: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
            ("turnout", t["after_load"], t["idle"]["processes"]), ("nginx", n["after_load"], n["idle"]["processes"]),
            ("control plane", t["control_plane"], [])]
        for name, after, idle_processes in sides:
            before = {p["pid"]: p["rss_kb"] for p in idle_processes}
            for p in after["processes"]:
                idle = f"{before[p['pid']] / 1024:.1f}" if p["pid"] in before else "—"
                lines.append(f"| {i} | {name} | {p['pid']} | {p['ppid']} | {idle} | {p['rss_kb'] / 1024:.1f} "
                             f"| `{p['cmdline']}` |")
    worst = summary["turnout_every_process_after_load_mb"]["max"]
    errors = sum(r["wrk"]["non_2xx"] + r["wrk"]["socket_errors"] for rs in runs.values() for r in rs)
    lines += [
        "",
        f"Target: the whole proxy (every process) ≤ {TARGET_MB:g} MB after the load — "
        f"**{'PASS' if summary['pass'] else 'FAIL'}** ({worst:.1f} MB, the max of {meta['rounds']} round(s)).",
        "",
        f"Machine: {meta['load_before']['cpus']} CPUs, load average before {meta['load_before']['loadavg']}, after "
        f"{meta['load_after']['loadavg']}; Python {meta['python']}, {meta['nginx']}, {meta['wrk']}; "
        f"{errors} non-2xx responses or socket errors under load.",
    ]
    return "\n".join(lines)


def first_line(argv: list[str]) -> str:
    """The first line a command prints (on either stream), for tool versions; "?" when it cannot run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    if not {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0):
        raise BenchError(f"needs cpu{LOADGEN_CPU} and cpu{PROXY_CPU} to pin the load and the proxy apart")
    tools = find_tools()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "commit": first_line(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "build": "compiled (mypyc)" if any((ROOT / "dataplane").glob("router*.so")) else "pure Python",
        "python": platform.python_version(), "nginx": first_line([tools["nginx"], "-v"]).removeprefix(
            "nginx version: "), "wrk": " ".join(first_line([tools["wrk"], "-v"]).split()[:2]),
        "seconds": args.seconds, "rounds": args.rounds, "wrk_threads": WRK_THREADS,
        "wrk_connections": WRK_CONNECTIONS, "routed_header": ROUTED_HEADER, "upstream_idle": WRK_CONNECTIONS,
        "proxy_cpu": PROXY_CPU, "loadgen_cpu": LOADGEN_CPU, "target_mb": TARGET_MB,
        "load_before": machine_load(),
    }
    log(f"turnout {meta['build']} at {meta['commit'][:7]}; load average {meta['load_before']['loadavg']}")
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-memory-"))
    with stopping(procs, tmp, args.keep_tmp, log):
        bench = Bench(argparse.Namespace(upstream_idle=WRK_CONNECTIONS), tools, tmp, procs)
        bench.start_upstream()
        memory = MemoryBench(bench, args.seconds)
        rounds = (memory.turnout_round, memory.nginx_round)
        runs = interleaved(PROXIES, args.rounds, lambda i: rounds[i](), log)
    meta["load_after"] = machine_load()
    result = {"meta": meta, "summary": summarize(runs), "rounds": runs}
    print(report(result))
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0 if result["summary"]["pass"] else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.memory.run",
        description="The whole proxy's RSS (every process of `turnout proxy --workers 1` with a live control-plane "
                    f"stream) after wrk load, beside nginx's (master + worker); target <= {TARGET_MB:g} MB.")
    p.add_argument("--seconds", type=int, default=8, help="seconds of wrk load per proxy per round (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, fresh proxy processes each (default 3)")
    p.add_argument("--json", type=Path, default=HERE / "results.json", metavar="FILE",
                   help="results JSON (default %(default)s)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary config/log directory")
    args = p.parse_args(argv)
    for name in ("seconds", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when the target is met, 1 when not, 2 on a setup error, 130 when interrupted."""
    args = parse_args(argv)
    return bench_main(lambda: run(args), log)


if __name__ == "__main__":
    sys.exit(main())
