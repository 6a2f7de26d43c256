"""Run the micro-benchmarks and print one table: benchmark, median, min, target, verdict.

Usage (from the repository root)::

    .venv/bin/python -m bench.micro.report              # run pinned to the last CPU, then report
    .venv/bin/python -m bench.micro.report --cpu 1      # pin to CPU 1
    .venv/bin/python -m bench.micro.report --no-pin     # let the scheduler place it
    .venv/bin/python -m bench.micro.report --repeat 3   # shared machine: best median of 3 runs
    .venv/bin/python -m bench.micro.report --json out.json            # keep the raw results
    .venv/bin/python -m bench.micro.report --from-json a.json b.json  # report on past run(s)
    .venv/bin/python -m bench.micro.report -- -k decide               # extra pytest arguments

Pinning matters: on a 2-core machine an unpinned run migrates between cores and its
medians swing by tens of percent. Targets come from each benchmark's ``extra_info``
(set in ``test_filters_bench.py`` from ``workloads.py``); benchmarks without one are
reported as references. ``--strict`` exits 1 when a target is missed.

The flatness rows compare the largest snapshot with the smallest: growth of the median
(judged) and of the min (less sensitive to other processes sharing the caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.micro.workloads import FLAT_TOLERANCE

ROOT = Path(__file__).resolve().parents[2]


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.2f} µs"


def _run(json_path: Path, cpu: int | None, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "bench/micro", "-q", "--benchmark-only",
           "--benchmark-sort=name", "--benchmark-columns=min,median,mean,ops,rounds",
           f"--benchmark-json={json_path}", *extra]
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # inherited by the pytest child
        print(f"pinned to CPU {cpu}: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result set from several runs: each benchmark's run with the lowest median.

    Other processes disturb a run in bursts; the least disturbed of several runs is the
    closest to the code's own cost. ``min`` is the lowest over all runs.
    """
    best: dict[str, dict[str, Any]] = {}
    lowest: dict[str, float] = {}
    for data in runs:
        for bench in data["benchmarks"]:
            name = bench["name"]
            if name not in best or bench["stats"]["median"] < best[name]["stats"]["median"]:
                best[name] = bench
            lowest[name] = min(lowest.get(name, bench["stats"]["min"]), bench["stats"]["min"])
    merged = []
    for name, bench in best.items():
        merged.append({**bench, "stats": {**bench["stats"], "min": lowest[name]}})
    return {"machine_info": runs[0].get("machine_info", {}), "benchmarks": merged, "runs": len(runs)}


def rows(data: dict[str, Any]) -> tuple[list[list[str]], bool]:
    """Table rows (benchmark, median, min, target, verdict) and whether every target held."""
    out: list[list[str]] = []
    ok = True
    flat: dict[str, dict[int, tuple[float, float]]] = {}
    for bench in data["benchmarks"]:
        stats, info = bench["stats"], bench.get("extra_info", {})
        median, target = stats["median"], info.get("target_s")
        if target is None:
            verdict = "reference"
        elif median <= target:
            verdict = "pass"
        else:
            verdict, ok = "FAIL", False
        out.append([bench["name"], _fmt(median), _fmt(stats["min"]),
                    "—" if target is None else "≤ " + _fmt(target), verdict])
        if "flat_group" in info:
            flat.setdefault(info["flat_group"], {})[int(info["flat_n"])] = (median, stats["min"])
    for group, medians in sorted(flat.items()):
        if len(medians) < 2:
            continue
        low, high = min(medians), max(medians)
        growth = medians[high][0] / medians[low][0] - 1
        min_growth = medians[high][1] / medians[low][1] - 1
        held = abs(growth) <= FLAT_TOLERANCE
        ok = ok and held
        out.append([f"{group}: {low:,} → {high:,} sessions (growth)", f"{growth:+.1%}", f"{min_growth:+.1%}",
                    f"within ±{FLAT_TOLERANCE:.0%}", "pass" if held else "FAIL"])
    return out, ok


def render(table: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    head = ["benchmark", "median", "min", "target", "result"]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in table)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro.report", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", type=int, help="CPU to pin to (default: the last one available)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin")
    parser.add_argument("--json", type=Path, help="also keep pytest-benchmark's JSON here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run N times; report each benchmark's least disturbed run (default 1)")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="report on existing JSON file(s), merged like --repeat; run nothing")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    runs: list[dict[str, Any]] = []
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
    else:
        cpu = None if args.no_pin else (args.cpu if args.cpu is not None else max(os.sched_getaffinity(0)))
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(max(1, args.repeat)):
                path = Path(tmp) / f"bench-{i}.json"
                if args.json is not None:
                    path = args.json.resolve() if args.repeat <= 1 else args.json.resolve().with_suffix(f".{i}.json")
                code = _run(path, cpu, args.pytest_args)
                if code != 0 or not path.exists():
                    print(f"pytest failed (exit {code}); no report", file=sys.stderr)
                    return code or 1
                runs.append(json.loads(path.read_text()))
        load_after = os.getloadavg()[0]
        # The run itself keeps one CPU busy (load ~1); more means something else ran too.
        if max(load_before, load_after) > 1.5:
            print(f"\nwarning: 1-minute load average {load_before:.2f} before, {load_after:.2f} after: other "
                  "processes competed for the CPUs; medians may be inflated (compare min, or use --repeat).")
    data = merge(runs)
    table, ok = rows(data)
    machine = data.get("machine_info", {})
    print()
    print(f"turnout filters micro-benchmarks — {machine.get('python_implementation', '')} "
          f"{machine.get('python_version', '')}, {machine.get('cpu', {}).get('brand_raw', '')}, "
          f"best median of {data['runs']} run(s)")
    print(render(table))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
