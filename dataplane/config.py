"""The proxy's bootstrap configuration: one YAML file, validated with field-named messages.

Every limit, timeout and watermark lives in ``Limits``, with its unit in its name and a
comment saying where the default comes from.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.rules import ConfigError, load_yaml, parse_yaml, snapshot_from_config
from filters import UPSTREAM_PROTOCOLS, Address, Problem, Snapshot, finite_number, parse_address


@dataclass(frozen=True)
class Limits:
    """Every limit, timeout and watermark of the proxy."""

    # --- request heads
    # Envoy's max_request_headers_kb defaults to 60 KiB; larger heads get 431.
    max_head_bytes: int = 60 * 1024
    # Envoy's max_headers_count defaults to 100; more header lines get 431.
    max_header_count: int = 100
    # nginx's large_client_header_buffers is 8 KiB per line; a longer request line gets 414.
    max_request_line_bytes: int = 8 * 1024
    # Chunk-size lines carry a size and optional extensions; 4 KiB is generous (h11 uses 4 KiB).
    max_chunk_line_bytes: int = 4096
    # Trailer section of a chunked body; same order as a small head.
    max_trailer_bytes: int = 16 * 1024
    # --- timeouts
    # nginx client_header_timeout is 60 s, Envoy's request_headers_timeout is off; 10 s
    # stops slowloris without hurting real clients, which send a head in one packet.
    header_read_timeout_s: float = 10.0
    # nginx client_body_timeout: 60 s between two reads of the request body.
    body_idle_timeout_s: float = 60.0
    # nginx keepalive_timeout is 75 s; Envoy's idle_timeout is 1 h. 60 s frees sockets sooner.
    keepalive_idle_timeout_s: float = 60.0
    # Envoy's cluster connect_timeout default.
    upstream_connect_timeout_s: float = 5.0
    # Envoy's route timeout default: request sent to the whole response head received.
    upstream_response_timeout_s: float = 15.0
    # nginx upstream keepalive_timeout: 60 s idle before a pooled connection is closed.
    upstream_idle_timeout_s: float = 60.0
    # Graceful drain on SIGTERM: Kubernetes' default grace period is 30 s; leave margin.
    drain_timeout_s: float = 20.0
    # After an error reply, input is read and discarded this long (nginx lingering_timeout
    # is 5 s) so the client reads the reply instead of a reset.
    lingering_timeout_s: float = 2.0
    # --- capacity
    # Idle connections kept per destination. nginx's usual `keepalive 32` makes a proxy
    # under 64 concurrent clients close and reopen upstream connections constantly
    # (measured: one connect per 4 requests); Envoy and HAProxy keep them all. 256 covers
    # the concurrency of one worker; the idle timeout trims them.
    upstream_max_idle_per_destination: int = 256
    # nginx worker_connections is commonly 1024-4096.
    max_connections_per_worker: int = 4096
    # --- flow control
    # asyncio's default transport high-water mark is 64 KiB (low is a quarter).
    write_high_watermark_bytes: int = 64 * 1024
    write_low_watermark_bytes: int = 16 * 1024
    # Bytes of pipelined requests held while an earlier one is in flight before reading pauses.
    pipeline_buffer_bytes: int = 64 * 1024
    # --- mirroring (best effort, bounded)
    # A mirrored request whose body is larger than this is dropped (and counted).
    mirror_max_body_bytes: int = 64 * 1024
    # Mirrored requests in flight per worker; the excess is dropped (and counted).
    mirror_max_in_flight: int = 64
    # --- config channel (control plane)
    # Envoy's initial_fetch_timeout is 15 s; past it the proxy serves what it has (static
    # sessions and the state file) and says so on /ready instead of waiting for ever.
    control_plane_initial_fetch_timeout_s: float = 10.0
    # Reconnect backoff: Envoy's xDS retries start at 500 ms and cap at 30 s; full jitter
    # keeps a fleet of proxies from reconnecting in lockstep after a control-plane restart.
    control_plane_reconnect_base_s: float = 0.5
    control_plane_reconnect_max_s: float = 30.0
    # gRPC keepalive pings on the stream: a dead control plane is noticed within
    # keepalive + timeout even when no push is due (gRPC servers allow 5 s and up).
    control_plane_keepalive_s: float = 30.0
    control_plane_keepalive_timeout_s: float = 10.0
    # Largest push accepted: 100,000 sessions (the snapshot limit) take about 20 MB; a
    # larger message is refused by gRPC before it is parsed, so memory stays bounded.
    control_plane_max_message_bytes: int = 32 * 1024 * 1024
    # The state file is written at most once per this interval (each write is an fsync);
    # a proxy that dies in between resumes from the previous set and is sent the rest.
    control_plane_state_write_interval_s: float = 1.0
    # Workers apply a validated push within this long, or the supervisor stops waiting
    # (and NACKs); a worker that missed one gets the whole set when it is back.
    control_plane_apply_timeout_s: float = 10.0
    # --- HTTP/2 and gRPC
    # nginx's http2_max_concurrent_streams is 128. Advertised in SETTINGS; streams beyond
    # it get REFUSED_STREAM (only the excess fails, RFC 9113 §5.1.2).
    h2_max_concurrent_streams: int = 128
    # Receive window per stream, both sides: what a peer may send before the other side
    # took it, so a slow reader costs at most this per stream. Envoy's edge guidance is
    # 64 KiB; 256 KiB keeps large gRPC messages near wire speed.
    h2_initial_stream_window_bytes: int = 256 * 1024
    # Receive window per connection (the sum over its streams): Envoy's edge guidance, 1 MiB.
    h2_initial_connection_window_bytes: int = 1024 * 1024
    # Rapid reset (CVE-2023-44487): Envoy's premature_reset_total_stream_count is 500.
    # Past this many streams the client reset before their response ended, when they are
    # at least half of its streams: GOAWAY ENHANCE_YOUR_CALM, upstream streams cancelled.
    h2_max_premature_resets: int = 500
    # PING, SETTINGS and PRIORITY frames per second per connection; the first two queue an
    # ACK each. Envoy caps queued control frames at 1000 (max_outbound_control_frames).
    h2_max_control_frames_per_s: int = 1000
    # DATA frames without payload nor END_STREAM in a row: Envoy's
    # max_consecutive_inbound_frames_with_empty_payload is 1.
    h2_max_consecutive_empty_frames: int = 1
    # Envoy's stream_idle_timeout is 5 min: long gRPC streams live under it, not a route timeout.
    h2_stream_idle_timeout_s: float = 300.0
    # Graceful drain: advisory GOAWAY, then the final one this much later. Envoy waits its
    # drain_timeout (5 s); 1 s covers in-flight streams' round trips and keeps drains short.
    h2_goaway_grace_s: float = 1.0
    # Liveness of upstream HTTP/2 connections with streams in flight: a PING after this
    # long without a frame, and the connection is closed (its streams fail) when nothing
    # answers within the timeout. gRPC servers refuse pings more often than every 5 min
    # without data (min_recv_ping_interval_without_data); 20 s is gRPC's keepalive_timeout.
    h2_upstream_ping_interval_s: float = 300.0
    h2_upstream_ping_timeout_s: float = 20.0
    # --- passive outlier detection of sandbox destinations
    # Failures in a row that eject a sandbox (a timeout ejects at once: it already cost a
    # caller the whole response timeout). Envoy's consecutive_5xx is 5; a sandbox is one
    # developer's process, so fewer failures are enough to stop paying for it.
    outlier_consecutive_failures: int = 3
    # First ejection; each further one of the same destination doubles, up to the max.
    # Envoy's base_ejection_time is 30 s; 10 s lets a restarted sandbox back in sooner.
    outlier_base_ejection_s: float = 10.0
    # Envoy's max_ejection_time default.
    outlier_max_ejection_s: float = 300.0


_LIMIT_FIELDS = {f.name: f for f in dataclasses.fields(Limits)}


@dataclass(frozen=True)
class ListenerTls:
    """Certificate chain and key (PEM files) of a TLS listener; ALPN offers h2, http/1.1."""

    cert_file: str
    key_file: str

    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        """The server-side TLS context, built once per process (the files are read here)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2+ (RFC 9113 §9.2)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context


@dataclass(frozen=True)
class Listener:
    """One listening address: ``inbound`` fronts one service, ``outbound`` any service."""

    name: str
    address: Address
    mode: str
    service: str | None = None
    baseline: Address | None = None
    # outbound: authority (host[:port]) -> service name; unmapped authorities are their own name.
    authorities: Mapping[str, str] = field(default_factory=dict)
    tls: ListenerTls | None = None  # TLS with ALPN h2 / http/1.1 instead of cleartext
    # How requests reach its upstreams (baseline, and every route that does not say):
    # http1 (as nginx and Envoy do) | http2 | auto (the client's protocol); gRPC always HTTP/2.
    upstream_protocol: str = "http1"
    # outbound: authority -> (service, baseline), resolved once per authority, not per request
    _targets: dict[str, tuple[str, Address]] = field(default_factory=dict, compare=False, repr=False)

    def target(self, authority: str) -> tuple[str, Address]:
        """The service and baseline a request goes to (``authority``: lower-case Host or :authority).

        Raises ``ValueError`` when an outbound listener cannot route to the authority.
        """
        if self.mode == "inbound":
            assert self.service is not None and self.baseline is not None
            return self.service, self.baseline
        found = self._targets.get(authority)
        if found is None:
            address = parse_address(authority if ":" in authority.rstrip("]") else authority + ":80")
            found = (self.authorities.get(authority, authority), address)
            if len(self._targets) >= _MAX_CACHED_AUTHORITIES:
                self._targets.clear()  # a client inventing authorities must not grow memory
            self._targets[authority] = found
        return found


# Distinct authorities an outbound listener remembers; a node proxy sees a few dozen services.
_MAX_CACHED_AUTHORITIES = 4096


@dataclass(frozen=True)
class AccessLog:
    """Optional JSON access log: one line per request, written by a background thread."""

    path: str


@dataclass(frozen=True)
class ControlPlane:
    """Where sessions are pushed from, and how the proxy identifies itself."""

    address: str  # host:port of the gRPC push service
    protocol: str = "delta"  # delta (incremental) | sotw (state of the world)
    token_file: str | None = None  # bearer token; re-read at every connect, so it can rotate
    tls: bool = False
    ca_file: str | None = None  # TLS roots; the system's when absent
    server_name: str | None = None  # TLS name to verify, when it differs from the address
    node_id: str = ""  # empty: $TURNOUT_NODE_ID, else <hostname>:<first listener port>
    cluster: str = ""  # empty: $TURNOUT_CLUSTER
    state_path: str | None = ""  # "": the default path; None: no state file


@dataclass(frozen=True)
class Tracing:
    """Optional OpenTelemetry spans, one per proxied request; absent: no tracing and no cost."""

    sampling_ratio: float = 1.0  # by trace id, so every hop with the same ratio keeps the same traces
    exporter: str = "otlp"  # otlp (gRPC, needs its package) | console (JSON lines) | memory (tests)
    endpoint: str | None = None  # otlp: the collector; None: the exporter's default (OTEL_* env, localhost)
    path: str = "-"  # console: file spans are appended to, one JSON object a line; '-' for standard output
    service_name: str = "turnout"


# The OTLP exporter is optional (not a dependency): a config that asks for it is refused
# with the package to install rather than failing in every worker.
OTLP_EXPORTER_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
OTLP_EXPORTER_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc"


@dataclass(frozen=True)
class ProxyConfig:
    """The whole validated bootstrap configuration."""

    admin: Address | None
    listeners: tuple[Listener, ...]
    limits: Limits
    snapshot: Snapshot
    debug_headers: bool = False
    access_log: AccessLog | None = None
    control_plane: ControlPlane | None = None
    source: Mapping[str, Any] = field(default_factory=dict)
    tracing: Tracing | None = None

    def node_id(self) -> str:
        """The id this proxy gives the control plane (stable across restarts)."""
        cp = self.control_plane
        if cp is not None and cp.node_id:
            return cp.node_id
        env = os.environ.get("TURNOUT_NODE_ID")
        if env:
            return env
        port = self.listeners[0].address.port if self.listeners else 0
        return f"{socket.gethostname()}:{port}"

    def state_path(self) -> str | None:
        """Where the last good push is kept, or None when it is not kept."""
        cp = self.control_plane
        if cp is None or cp.state_path is None:
            return None
        if cp.state_path:
            return cp.state_path
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.node_id())
        return os.path.join(default_state_dir(), safe + ".state.json")


# The image creates this directory and the Kubernetes manifests mount an emptyDir on it, so
# a restarted container keeps its sessions.
SYSTEM_STATE_DIR = "/var/lib/turnout"


def default_state_dir() -> str:
    """``$TURNOUT_STATE_DIR``; else ``/var/lib/turnout`` when this user can write it (the
    image, the manifests); else the user's own state directory (``$XDG_STATE_HOME/turnout``,
    ``~/.local/state/turnout``), which a non-root user can always create."""
    env = os.environ.get("TURNOUT_STATE_DIR")
    if env:
        return env
    if os.path.isdir(SYSTEM_STATE_DIR) and os.access(SYSTEM_STATE_DIR, os.W_OK):
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "turnout")


TOP_FIELDS = frozenset({"admin", "routing", "listeners", "sessions", "limits", "access_log", "control_plane",
                        "tracing"})
TRACING_FIELDS = frozenset({"sampling_ratio", "exporter", "endpoint", "path", "service_name"})
CONTROL_PLANE_FIELDS = frozenset({"address", "protocol", "token_file", "tls", "node_id", "cluster", "state_path"})
LISTENER_FIELDS = frozenset({"name", "address", "mode", "service", "baseline", "authorities", "tls",
                             "upstream_protocol"})


def load_config(path: str | Path, now: float | None = None) -> ProxyConfig:
    """Read and validate a bootstrap file; raises ``ConfigError`` listing every problem."""
    return parse_config(load_yaml(path), now=now)


def parse_config_text(text: str, origin: str = "config", now: float | None = None) -> ProxyConfig:
    """Validate bootstrap YAML given as text."""
    return parse_config(parse_yaml(text, origin), now=now)


def parse_config(data: Mapping[str, Any], now: float | None = None) -> ProxyConfig:
    """Validate a bootstrap mapping; raises ``ConfigError`` listing every problem."""
    problems: list[Problem] = []
    unknown = set(data) - TOP_FIELDS
    if unknown:
        problems.append(Problem("", "unknown top-level field(s): " + ", ".join(sorted(map(str, unknown)))))
    admin = None
    admin_spec = data.get("admin")
    if admin_spec is not None:
        if not isinstance(admin_spec, Mapping) or set(admin_spec) - {"address"}:
            problems.append(Problem("admin", "must be a mapping with 'address'"))
        else:
            admin = _address(admin_spec.get("address"), "admin.address", problems)
    listeners = _listeners(data.get("listeners"), problems)
    if admin is not None and any(lst.address == admin for lst in listeners):
        problems.append(Problem("admin.address", f"{admin} is also a listener's address"))
    limits = _limits(data.get("limits"), problems)
    access_log = None
    log_spec = data.get("access_log")
    if log_spec is not None:
        if not isinstance(log_spec, Mapping) or set(log_spec) != {"path"} or not isinstance(log_spec["path"], str):
            problems.append(Problem("access_log", "must be {path: FILE} ('-' for standard output)"))
        else:
            access_log = AccessLog(log_spec["path"])
    routing = data.get("routing") or {}
    debug_headers = False
    if isinstance(routing, Mapping):
        debug_headers = routing.get("debug_headers", False)
        if not isinstance(debug_headers, bool):
            problems.append(Problem("routing.debug_headers", "must be true or false"))
            debug_headers = False
    control_plane = _control_plane(data.get("control_plane"), problems)
    tracing = _tracing(data.get("tracing"), problems)
    snapshot = None
    try:
        snapshot = snapshot_from_config(data, version="bootstrap", now=time.time() if now is None else now)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or snapshot is None:
        raise ConfigError(problems)
    return ProxyConfig(admin, listeners, limits, snapshot, debug_headers, access_log, control_plane, data, tracing)


def _address(value: Any, where: str, problems: list[Problem]) -> Address | None:
    try:
        return parse_address(value)
    except ValueError as exc:
        problems.append(Problem(where, str(exc)))
        return None


def _control_plane(spec: Any, problems: list[Problem]) -> ControlPlane | None:
    if spec is None:
        return None
    where = "control_plane"
    if not isinstance(spec, Mapping):
        problems.append(Problem(where, "must be a mapping with at least 'address'"))
        return None
    before = len(problems)
    unknown = set(spec) - CONTROL_PLANE_FIELDS
    if unknown:
        problems.append(Problem(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown)))))
    address = spec.get("address")
    _address(address, where + ".address", problems)
    protocol = spec.get("protocol", "delta")
    if protocol not in ("delta", "sotw"):
        problems.append(Problem(where + ".protocol", "must be delta (incremental) or sotw (state of the world)"))
    strings: dict[str, str | None] = {}
    for name in ("token_file", "node_id", "cluster"):
        value = spec.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append(Problem(f"{where}.{name}", "must be a non-empty string"))
        strings[name] = value
    state_path = spec.get("state_path", "")
    if state_path is not None and not isinstance(state_path, str):
        problems.append(Problem(where + ".state_path", "must be a file path, or null to keep no state file"))
    tls = spec.get("tls", False)
    ca_file = server_name = None
    if isinstance(tls, Mapping):
        extra = set(tls) - {"ca_file", "server_name"}
        if extra:
            problems.append(Problem(where + ".tls", "unknown field(s): " + ", ".join(sorted(map(str, extra)))))
        ca_file, server_name = tls.get("ca_file"), tls.get("server_name")
        for name, value in (("ca_file", ca_file), ("server_name", server_name)):
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(Problem(f"{where}.tls.{name}", "must be a non-empty string"))
        tls = True
    elif not isinstance(tls, bool):
        problems.append(Problem(where + ".tls", "must be true, false or {ca_file, server_name}"))
    if len(problems) != before:
        return None
    return ControlPlane(str(address), str(protocol), strings["token_file"], bool(tls), ca_file, server_name,
                        strings["node_id"] or "", strings["cluster"] or "", state_path)


def _tracing(spec: Any, problems: list[Problem]) -> Tracing | None:
    if spec is None:
        return None
    where = "tracing"
    if not isinstance(spec, Mapping):
        problems.append(Problem(where, "must be a mapping (sampling_ratio, exporter, endpoint, path, service_name)"))
        return None
    before = len(problems)
    unknown = set(spec) - TRACING_FIELDS
    if unknown:
        problems.append(Problem(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown)))))
    ratio = spec.get("sampling_ratio", 1.0)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        problems.append(Problem(where + ".sampling_ratio", "must be a number from 0 to 1"))
    exporter = spec.get("exporter", "otlp")
    if exporter not in ("otlp", "console", "memory"):
        problems.append(Problem(where + ".exporter", "must be otlp, console or memory (memory: tests only)"))
    elif exporter == "otlp" and not _importable(OTLP_EXPORTER_MODULE):
        problems.append(Problem(where + ".exporter", f"otlp needs the package {OTLP_EXPORTER_PACKAGE}, which is "
                                f"not installed: pip install {OTLP_EXPORTER_PACKAGE} (or use exporter: console)"))
    strings: dict[str, str | None] = {}
    for name in ("endpoint", "path", "service_name"):
        value = spec.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append(Problem(f"{where}.{name}", "must be a non-empty string"))
        strings[name] = value
    if strings["endpoint"] is not None and exporter != "otlp":
        problems.append(Problem(where + ".endpoint", "only the otlp exporter sends to an endpoint"))
    if strings["path"] is not None and exporter != "console":
        problems.append(Problem(where + ".path", "only the console exporter writes to a file"))
    if len(problems) != before:
        return None
    return Tracing(float(ratio), str(exporter), strings["endpoint"], strings["path"] or "-",
                   strings["service_name"] or "turnout")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _listeners(spec: Any, problems: list[Problem]) -> tuple[Listener, ...]:
    if not isinstance(spec, list) or not spec:
        problems.append(Problem("listeners", "must be a non-empty list"))
        return ()
    out = []
    names: set[str] = set()
    addresses: set[Address] = set()
    for i, item in enumerate(spec):
        where = f"listeners[{i}]"
        if not isinstance(item, Mapping):
            problems.append(Problem(where, "must be a mapping"))
            continue
        before = len(problems)
        unknown = set(item) - LISTENER_FIELDS
        if unknown:
            problems.append(Problem(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown)))))
        name = item.get("name", f"listener-{i}")
        if not isinstance(name, str) or not name or name in names:
            problems.append(Problem(where + ".name", "must be a unique non-empty string"))
        names.add(str(name))
        address = _address(item.get("address"), where + ".address", problems)
        if address is not None and address in addresses:
            problems.append(Problem(where + ".address", f"{address} is already used by another listener"))
        mode = item.get("mode", "inbound")
        service = item.get("service")
        baseline = None
        authorities: dict[str, str] = {}
        if mode == "inbound":
            if not isinstance(service, str) or not service:
                problems.append(Problem(where + ".service", "an inbound listener needs the service it fronts"))
            baseline = _address(item.get("baseline"), where + ".baseline", problems)
            if "authorities" in item:
                problems.append(Problem(where + ".authorities", "only outbound listeners map authorities"))
        elif mode == "outbound":
            if "service" in item or "baseline" in item:
                problems.append(Problem(where, "an outbound listener takes service and baseline from the "
                                               "request's authority; remove 'service' and 'baseline'"))
            raw = item.get("authorities", {})
            if not isinstance(raw, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in raw.items()
            ):
                problems.append(Problem(where + ".authorities", "must map authority strings to service names"))
            else:
                authorities = {k.lower(): v for k, v in raw.items()}
        else:
            problems.append(Problem(where + ".mode", "must be inbound or outbound"))
        tls = _listener_tls(item.get("tls"), where + ".tls", problems)
        upstream_protocol = item.get("upstream_protocol", "http1")
        if upstream_protocol not in UPSTREAM_PROTOCOLS:
            problems.append(Problem(where + ".upstream_protocol", "must be one of: " + ", ".join(UPSTREAM_PROTOCOLS)))
        if len(problems) == before and address is not None:
            addresses.add(address)
            out.append(Listener(str(name), address, mode, service, baseline, authorities, tls, upstream_protocol))
    return tuple(out)


def _listener_tls(spec: Any, where: str, problems: list[Problem]) -> ListenerTls | None:
    if spec is None:
        return None
    if (not isinstance(spec, Mapping) or set(spec) != {"cert_file", "key_file"}
            or not all(isinstance(v, str) and v for v in spec.values())):
        problems.append(Problem(where, "must be {cert_file: PEM file, key_file: PEM file}"))
        return None
    tls = ListenerTls(spec["cert_file"], spec["key_file"])
    try:
        tls.server_context  # noqa: B018 - loads the files now, so a bad one is a config error
    except (OSError, ssl.SSLError) as exc:
        problems.append(Problem(where, f"cannot load certificate/key: {exc}"))
        return None
    return tls


def _limits(spec: Any, problems: list[Problem]) -> Limits:
    if spec is None:
        return Limits()
    if not isinstance(spec, Mapping):
        problems.append(Problem("limits", "must be a mapping"))
        return Limits()
    values: dict[str, Any] = {}
    for key, value in spec.items():
        f = _LIMIT_FIELDS.get(key)
        if f is None:
            problems.append(Problem(f"limits.{key}", "unknown limit; known: " + ", ".join(_LIMIT_FIELDS)))
            continue
        if f.type == "float":
            # Finite: YAML's .inf and .nan are floats, and a NaN timeout would never fire.
            seconds = finite_number(value)
            if seconds is None or seconds <= 0:
                problems.append(Problem(f"limits.{key}", "must be a positive number of seconds"))
                continue
            values[key] = seconds
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(Problem(f"limits.{key}", "must be a positive integer"))
        else:
            values[key] = value
    limits = Limits(**values)
    if limits.write_low_watermark_bytes > limits.write_high_watermark_bytes:
        problems.append(Problem("limits.write_low_watermark_bytes", "must not exceed write_high_watermark_bytes"))
    return limits
