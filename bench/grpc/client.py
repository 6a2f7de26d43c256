"""gRPC load clients for bench/grpc (grpcio, Python), printing one JSON result on stdout.

``python -m bench.grpc.client open --target HOST:PORT --rate 500 --duration 20 --expect sandbox``
    Open loop: calls are started on a fixed timetable (call i at t0 + i/rate) by a thread
    that sleeps with ``time.sleep`` (nanosleep: tens of µs late, where an asyncio timer
    rounds its epoll timeout up to the next millisecond), using the synchronous API's
    non-blocking ``future()``; the completion callback takes the end time. Latency is
    measured from the *scheduled* start, so a stall of the client or the server delays
    every call behind it in the numbers too (coordinated omission not hidden); the time
    from the actual start and how late each start was are reported beside it.

``python -m bench.grpc.client closed --target HOST:PORT --concurrency 32 --duration 10 ...``
    Closed loop: ``--concurrency`` coroutines on one grpc.aio channel, each starting its
    next call when the previous one returned, for a bounded time and call count.

Every reply must begin with ``ok from <expect>`` (which upstream answered); calls with
another reply or a non-OK status are counted, not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from bench.grpc.server import MESSAGE_BYTES, PATH

REQUEST = b"q" * MESSAGE_BYTES
CALL_TIMEOUT_S = 5.0
LATE_SEND_S = 0.001  # a start more than this after its scheduled time counts as late
MAX_CLOSED_LOOP_CALLS = 5_000_000  # bound on the closed loop besides its duration
ROUTED_METADATA = (("baggage", "turnout-session=bench"),)


@dataclass
class Tally:
    """Outcomes of a run: latencies of good calls, counts of the others."""

    expect: bytes
    latencies_s: list[float] = field(default_factory=list)
    service_s: list[float] = field(default_factory=list)  # from the actual start (open loop)
    lateness_s: list[float] = field(default_factory=list)  # actual start - scheduled start
    wrong_upstream: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def good(self, reply: bytes) -> bool:
        """Whether ``reply`` came from the expected upstream (counted when not)."""
        if reply.startswith(self.expect):
            return True
        self.wrong_upstream += 1
        return False

    def error(self, code: str) -> None:
        """Count one failed call by its status code."""
        self.errors[code] = self.errors.get(code, 0) + 1


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean in ms (nearest rank) of values in seconds."""
    if not values:
        return {k: None for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")}
    ordered = sorted(values)

    def rank(pct: float) -> float:
        index = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
        return ordered[index] * 1000

    return {"p50_ms": rank(50), "p90_ms": rank(90), "p99_ms": rank(99), "p999_ms": rank(99.9),
            "max_ms": ordered[-1] * 1000, "mean_ms": sum(ordered) / len(ordered) * 1000}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- open loop


def timetable(call: Any, rate: float, count: int, metadata: Sequence[tuple[str, str]], tally: Tally) -> float:
    """Start ``count`` calls at ``rate`` per second on a fixed timetable; returns the span of actual starts."""
    finished = threading.Event()
    remaining = [count]

    def on_done(scheduled: float, started: float, future: Any) -> None:
        end = time.perf_counter()
        with tally.lock:
            code = future.code()
            if code == grpc.StatusCode.OK:
                if tally.good(future.result()):
                    tally.latencies_s.append(end - scheduled)
                    tally.service_s.append(end - started)
                    tally.lateness_s.append(started - scheduled)
            else:
                tally.error(code.name)
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()

    t0 = time.perf_counter() + 0.01
    first = last = t0
    for i in range(count):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        started = time.perf_counter()
        if i == 0:
            first = started
        last = started
        future = call.future(REQUEST, metadata=metadata, timeout=CALL_TIMEOUT_S)
        future.add_done_callback(functools.partial(on_done, scheduled, started))
    if not finished.wait(CALL_TIMEOUT_S + 5):
        raise SystemExit(f"{remaining[0]} calls neither completed nor failed within their deadline")
    return last - first


def open_loop(target: str, rate: float, duration_s: float, warmup_s: float, metadata: Sequence[tuple[str, str]],
              expect: str) -> dict[str, Any]:
    """Warm up, then ``rate`` calls per second for ``duration_s`` on one channel; latency summary."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        call = channel.unary_unary(PATH)
        expect_bytes = ("ok from " + expect).encode()
        warmup_calls = max(1, round(rate * warmup_s))
        timetable(call, rate, warmup_calls, metadata, Tally(expect_bytes))
        tally = Tally(expect_bytes)
        count = max(2, round(rate * duration_s))
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        span_s = timetable(call, rate, count, metadata, tally)
        cpu1, wall1 = _cpu_s(), time.perf_counter()
    late = sum(1 for x in tally.lateness_s if x > LATE_SEND_S)
    return {
        "client": "grpcio (Python, sync API futures, timetable thread)", "mode": "open loop",
        "rate_target": rate, "warmup_calls": warmup_calls, "calls": count, "ok": len(tally.latencies_s),
        "achieved_rps": (count - 1) / span_s if span_s > 0 else None,
        "late_sends": late, "late_send_threshold_ms": LATE_SEND_S * 1000,
        "lateness": percentiles(tally.lateness_s), "latency": percentiles(tally.latencies_s),
        "latency_from_actual_start": percentiles(tally.service_s),
        "wrong_upstream": tally.wrong_upstream, "errors": tally.errors,
        "client_cores": (cpu1 - cpu0) / (wall1 - wall0),
    }


# --------------------------------------------------------------------------- closed loop


async def closed_loop(target: str, concurrency: int, duration_s: float, metadata: Sequence[tuple[str, str]],
                      expect: str) -> dict[str, Any]:
    """``concurrency`` calls in flight on one grpc.aio channel for ``duration_s``; rate and latency."""
    tally = Tally(("ok from " + expect).encode())
    calls = [0]
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
        call = channel.unary_unary(PATH)

        async def one_in_flight(end: float) -> None:
            while time.perf_counter() < end and calls[0] < MAX_CLOSED_LOOP_CALLS:
                calls[0] += 1
                start = time.perf_counter()
                try:
                    reply = await call(REQUEST, metadata=metadata, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    tally.error(exc.code().name)
                    continue
                if tally.good(reply):
                    tally.latencies_s.append(time.perf_counter() - start)

        await asyncio.gather(*(one_in_flight(time.perf_counter() + 1.0) for _ in range(concurrency)))  # warm-up
        tally.latencies_s.clear()
        calls[0] = 0
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        await asyncio.gather(*(one_in_flight(wall0 + duration_s) for _ in range(concurrency)))
        cpu1, wall1 = _cpu_s(), time.perf_counter()
    return {
        "client": "grpcio (Python, grpc.aio)", "mode": "closed loop", "concurrency": concurrency, "calls": calls[0],
        "ok": len(tally.latencies_s), "rps": len(tally.latencies_s) / (wall1 - wall0),
        "latency": percentiles(tally.latencies_s), "wrong_upstream": tally.wrong_upstream, "errors": tally.errors,
        "client_cores": (cpu1 - cpu0) / (wall1 - wall0),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one load, print its JSON summary."""
    p = argparse.ArgumentParser(prog="python -m bench.grpc.client", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("open", "closed"):
        s = sub.add_parser(mode)
        s.add_argument("--target", required=True, help="HOST:PORT")
        s.add_argument("--duration", type=float, required=True, help="seconds measured")
        s.add_argument("--expect", required=True, help="label of the upstream every reply must come from")
        s.add_argument("--routed", action="store_true", help="send baggage: turnout-session=bench")
        if mode == "open":
            s.add_argument("--rate", type=float, required=True, help="calls per second")
            s.add_argument("--warmup", type=float, default=1.0, help="seconds at the rate before measuring")
        else:
            s.add_argument("--concurrency", type=int, required=True, help="calls in flight")
    args = p.parse_args(argv)
    metadata = ROUTED_METADATA if args.routed else ()
    if args.mode == "open":
        result = open_loop(args.target, args.rate, args.duration, args.warmup, metadata, args.expect)
    else:
        result = asyncio.run(closed_loop(args.target, args.concurrency, args.duration, metadata, args.expect))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
