"""Prometheus metrics of one worker; the admin listener merges every worker's.

The two per-request families (request count and latency) are plain integers per
(service, route) on the hot path, turned into Prometheus families only when scraped: no
lock and no label lookup per request. The rare events use prometheus_client children,
looked up once per label combination and cached.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Latency buckets: sub-millisecond resolution where a proxy's own overhead lives.
_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class _RouteStats:
    """Request counts by status class and a latency histogram for one (service, route)."""

    __slots__ = ("by_class", "buckets", "total_s")

    def __init__(self) -> None:
        self.by_class = [0] * 6  # index: status // 100
        self.buckets = [0] * (len(_BUCKETS_S) + 1)  # the last one is +Inf
        self.total_s = 0.0


class _RequestCollector(Collector):
    """Exposes the plain per-request counters as Prometheus families at scrape time."""

    def __init__(self, worker: str, stats: dict[tuple[str, str], _RouteStats]) -> None:
        self._worker = worker
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("turnout_requests", "Requests proxied, by service, route kind and status class",
                                       labels=["worker", "service", "route", "status_class"])
        duration = HistogramMetricFamily("turnout_request_duration_seconds",
                                         "Time from request head to the end of the response",
                                         labels=["worker", "service", "route"])
        for (service, route), stats in sorted(self._stats.items()):
            for status_class, count in enumerate(stats.by_class):
                if count:
                    requests.add_metric([self._worker, service, route, _STATUS_CLASS.get(status_class, "5xx")],
                                        count)
            cumulative = 0
            buckets = []
            for bound, count in zip((*(str(b) for b in _BUCKETS_S), "+Inf"), stats.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([self._worker, service, route], buckets, stats.total_s)
        yield requests
        yield duration


class Metrics:
    """The worker's metric families and cached label children."""

    def __init__(self, worker: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        w = ["worker"]
        self._worker = worker
        r = self.registry
        self._stats: dict[tuple[str, str], _RouteStats] = {}
        r.register(_RequestCollector(worker, self._stats))
        self.upstream_errors = Counter("turnout_upstream_errors", "Upstream failures by cause",
                                       [*w, "service", "route", "cause"], registry=r)
        self.downstream_errors = Counter("turnout_downstream_errors",
                                         "Requests refused before routing, by cause", [*w, "cause"], registry=r)
        self.local_replies = Counter("turnout_local_replies", "Responses turnout made itself, by status",
                                     [*w, "status"], registry=r)
        self.fallbacks = Counter("turnout_fallbacks", "Requests re-sent to baseline after a sandbox failed, "
                                 "by the sandbox's failure", [*w, "service", "cause"], registry=r)
        self.ejections = Counter("turnout_outlier_ejections", "Sandbox destinations ejected after repeated "
                                 "failures (their fallback applies at once while ejected)", [*w, "service"],
                                 registry=r)
        self.mirror = Counter("turnout_mirror_requests", "Mirrored copies by result", [*w, "result"], registry=r)
        self.grpc = Counter("turnout_grpc_responses", "gRPC calls by the grpc-status they ended with",
                            [*w, "service", "route", "grpc_status"], registry=r)
        self.connections = Gauge("turnout_open_connections", "Open client connections", w, registry=r)
        self.refused = Counter("turnout_connections_refused", "Connections refused over the per-worker cap",
                               w, registry=r)
        self.snapshot = Gauge("turnout_snapshot_info", "The routing snapshot in use (value is always 1)",
                              [*w, "version"], registry=r)
        self.sessions = Gauge("turnout_sessions", "Sessions in the routing snapshot", w, registry=r)
        self.reloads = Counter("turnout_config_reloads", "Configuration reloads by result", [*w, "result"],
                               registry=r)
        self._children: dict[Any, Any] = {}
        self._open = self.connections.labels(worker)
        self._refused = self.refused.labels(worker)

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(self._worker, *labels)
        return child

    def request(self, service: str, route: str, status: int, seconds: float) -> None:
        """One proxied request finished."""
        stats = self._stats.get((service, route))
        if stats is None:
            stats = self._stats[(service, route)] = _RouteStats()
        klass = status // 100
        stats.by_class[klass if 0 < klass < 6 else 5] += 1
        stats.buckets[bisect_left(_BUCKETS_S, seconds)] += 1
        stats.total_s += seconds

    def upstream_error(self, service: str, route: str, cause: str) -> None:
        """An upstream failed for one request."""
        self._child(self.upstream_errors, service, route, cause).inc()

    def downstream_error(self, cause: str) -> None:
        """A request was refused before routing."""
        self._child(self.downstream_errors, cause).inc()

    def local_reply(self, status: int) -> None:
        """turnout answered a request itself."""
        self._child(self.local_replies, str(status)).inc()

    def grpc_response(self, service: str, route: str, grpc_status: str) -> None:
        """A gRPC call ended with ``grpc_status`` (the upstream's, or one turnout made)."""
        self._child(self.grpc, service, route, grpc_status).inc()

    def fallback(self, service: str, cause: str) -> None:
        """A request whose sandbox failed (``cause``) was sent to baseline."""
        self._child(self.fallbacks, service, cause).inc()

    def outlier_ejection(self, service: str) -> None:
        """A sandbox destination of ``service`` was ejected."""
        self._child(self.ejections, service).inc()

    def mirror_sent(self, status: int) -> None:
        """A mirrored copy got an answer."""
        self._child(self.mirror, "sent").inc()

    def mirror_dropped(self, reason: str) -> None:
        """A mirrored copy was dropped."""
        self._child(self.mirror, "dropped_" + reason).inc()

    def connection_opened(self) -> None:
        """A client connection was accepted."""
        self._open.inc()

    def connection_closed(self) -> None:
        """A client connection closed."""
        self._open.dec()

    def connection_refused(self) -> None:
        """A client connection was refused over the cap."""
        self._refused.inc()

    def snapshot_loaded(self, version: str, sessions: int) -> None:
        """A new routing snapshot is in use."""
        self.snapshot.clear()
        self.snapshot.labels(self._worker, version).set(1)
        self.sessions.labels(self._worker).set(sessions)

    def reload(self, result: str) -> None:
        """A configuration reload was attempted."""
        self._child(self.reloads, result).inc()

    def exposition(self) -> bytes:
        """Prometheus text format."""
        return bytes(generate_latest(self.registry))


def merge_expositions(texts: list[bytes]) -> bytes:
    """Merge several workers' expositions: each family's HELP/TYPE once, then all samples."""
    order: list[bytes] = []
    meta: dict[bytes, list[bytes]] = {}
    samples: dict[bytes, list[bytes]] = {}
    for text in texts:
        family = b""
        for line in text.splitlines():
            if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
                family = line.split(b" ", 3)[2]
                if family not in meta:
                    order.append(family)
                    meta[family] = []
                    samples[family] = []
                if line not in meta[family]:
                    meta[family].append(line)
            elif line and not line.startswith(b"#"):
                samples.setdefault(family, []).append(line)
    out = []
    for family in order:
        out.extend(meta[family])
        out.extend(samples[family])
    return b"\n".join(out) + b"\n"
