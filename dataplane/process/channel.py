"""The config channel's client: one gRPC stream from the proxy (its supervisor) to the
control plane, sessions in, ACK or NACK out.

The stream is ``grpcstream``'s, a minimal gRPC client on turnout's own HTTP/2 engine, and
the messages are ``config_pb2``'s: grpcio stays out of the proxy process (importing it
costs about 13.6 MB of resident memory); the control plane serves with grpcio.

For every response: validate each session with ``filters`` and the whole set together
with the bootstrap file's static sessions (exactly what the workers will compile), keep it
on disk, hand it to the workers, then ACK. Anything invalid is NACKed with the reason and
nothing of it is applied: the previous set stays whole. When the stream fails, the last
good set keeps serving and the client reconnects with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from google.protobuf.message import DecodeError

from dataplane.config import ProxyConfig
from dataplane.process.grpcstream import Endpoint, GrpcError, StatusCode, open_stream, tls_context
from dataplane.process.statefile import PushedState, StateRenderer, load_state, write_atomic
from dataplane.rules import change_snapshot, compose_snapshot, rule_limits
from filters import Problem, Session, Snapshot, ValidationError, parse_address
from turnout.v1 import config_pb2
from turnout.v1.convert import session_from_proto

# The push service's methods (turnout/v1/config.proto, service SessionDiscovery).
_DELTA_PATH = "/turnout.v1.SessionDiscovery/DeltaSessions"
_SOTW_PATH = "/turnout.v1.SessionDiscovery/StreamSessions"
# A NACK's message names every problem; this many are plenty to act on.
_NACK_PROBLEMS = 20


@dataclass(frozen=True)
class Update:
    """A validated change of the pushed session set, as the workers apply it."""

    state: PushedState  # the whole new set
    previous_version: str  # the version it replaces
    upserted: tuple[Session, ...]  # added or changed since previous_version
    removed: tuple[str, ...]  # session ids gone since previous_version


def diff(old: PushedState, new: PushedState) -> tuple[tuple[Session, ...], tuple[str, ...]]:
    """Sessions added or changed (by version) and ids removed from ``old`` to ``new``."""
    upserted = tuple(session for sid, (session, version) in sorted(new.sessions.items())
                     if sid not in old.sessions or old.sessions[sid][1] != version)
    removed = tuple(sorted(sid for sid in old.sessions if sid not in new.sessions))
    return upserted, removed


class ChannelStatus:
    """What ``/ready``, ``/config_dump`` and the metrics say about the config channel."""

    def __init__(self, address: str, protocol: str, node_id: str) -> None:
        self.address = address
        self.protocol = protocol
        self.node_id = node_id
        self.state = "connecting"  # connecting | connected | disconnected
        self.state_since = time.time()
        self.initial_fetch = "pending"  # pending | done | timed_out
        self.version = ""
        self.control_plane_id = ""
        self.sessions = 0
        self.last_update_at: float | None = None
        self.last_error = ""
        self.last_nack: dict[str, Any] | None = None
        self.acks = 0
        self.nacks = 0
        self.stream_failures = 0
        self.state_file = ""
        self.state_file_error = ""

    def set_state(self, state: str) -> None:
        """Move to ``state`` (connecting, connected or disconnected)."""
        if state != self.state:
            self.state = state
            self.state_since = time.time()

    def summary(self) -> str:
        """One line for ``/ready``."""
        if self.state == "connected":
            text = f"connected to {self.address}"
        else:
            text = f"{self.state} ({self.address}" + (f": {self.last_error}" if self.last_error else "") + ")"
        served = f"version {self.version}, {self.sessions} pushed session(s)" if self.version else "no pushed sessions"
        if self.initial_fetch == "timed_out" and not self.version:
            served += ": initial fetch timed out, serving static sessions only"
        elif self.state != "connected" and self.version:
            served += ": last good set"
        return f"control plane: {text}; {served}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``/config_dump``."""
        return {key: getattr(self, key) for key in (
            "address", "protocol", "node_id", "state", "state_since", "initial_fetch", "version",
            "control_plane_id", "sessions", "last_update_at", "last_error", "last_nack", "acks", "nacks",
            "stream_failures", "state_file", "state_file_error")}


class ConfigChannel:
    """Keeps one stream to the control plane open and applies what it pushes."""

    def __init__(self, config: ProxyConfig, apply: Callable[[Update], Awaitable[None]],
                 log: Callable[[str], None] | None = None) -> None:
        assert config.control_plane is not None
        self.config = config
        self.settings = config.control_plane
        self.limits = config.limits
        self._apply = apply
        self._log = log or logging.getLogger("turnout.channel").info
        self.status = ChannelStatus(self.settings.address, self.settings.protocol, config.node_id())
        self.state = PushedState()
        # Static + pushed sessions as the workers run them: pushes are validated against it.
        self._snapshot = config.snapshot
        self.state_path = config.state_path()
        self.status.state_file = self.state_path or ""
        self.initial_done = asyncio.Event()
        self._last_logged_error = ""
        self._renderer = StateRenderer()
        self._save_pending: PushedState | None = None
        self._saver: asyncio.Task[None] | None = None
        self._last_save = 0.0
        self._flushing = asyncio.Event()

    def load_persisted(self) -> PushedState:
        """The last good set from the state file (empty when there is none)."""
        if self.state_path is None:
            self._log("state file: none (control_plane.state_path is null): a restart serves the bootstrap "
                      "sessions until the control plane pushes")
            return self.state
        self._log(f"state file: {self.state_path}" + ("" if self.settings.state_path else
                                                      " (the default; control_plane.state_path changes it)"))
        state, why = load_state(self.state_path, rule_limits(self.config.snapshot))
        if state is None:
            if "not a valid" in why or "cannot read" in why:
                self.status.state_file_error = why
                self._log("state file: " + why)
            return self.state
        try:
            self._snapshot = compose_snapshot(self.config.snapshot, state.session_list(), state.version)
        except ValidationError as exc:
            self.status.state_file_error = f"conflicts with the bootstrap file: {exc}"
            self._log("state file ignored: " + self.status.state_file_error)
            return self.state
        self.state = state
        self.status.version = state.version
        self.status.control_plane_id = state.control_plane_id
        self.status.sessions = len(state.sessions)
        return state

    def node(self) -> config_pb2.Node:
        """Who this proxy is and which services it fronts."""
        listeners = self.config.listeners
        try:
            build = metadata.version("turnout")
        except metadata.PackageNotFoundError:
            build = "dev"
        return config_pb2.Node(
            id=self.status.node_id,
            cluster=self.settings.cluster or os.environ.get("TURNOUT_CLUSTER", ""),
            services=sorted({lst.service for lst in listeners if lst.mode == "inbound" and lst.service}),
            all_services=any(lst.mode == "outbound" for lst in listeners),
            build_version=build,
        )

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Connect, stream, reconnect with backoff; runs until cancelled."""
        attempt = 0
        while True:
            got_response = False
            try:
                got_response = await self._stream()
                self._failed("the control plane ended the stream")
            except GrpcError as exc:
                got_response = got_response or self.status.state == "connected"
                self._failed(_rpc_error(exc))
            except OSError as exc:
                self._failed(f"cannot read {exc.filename or 'a credentials file'}: {exc.strerror}")
            except Exception as exc:  # a bug here must not end the channel for good: log, reconnect
                self._log("config channel error: " + "".join(traceback.format_exception(exc)).rstrip())
                self._failed(f"internal error: {type(exc).__name__}: {exc}")
            if got_response:
                attempt = 0
            # Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^n)].
            ceiling = min(self.limits.control_plane_reconnect_max_s,
                          self.limits.control_plane_reconnect_base_s * (2 ** min(attempt, 30)))
            attempt += 1
            await asyncio.sleep(random.uniform(0, ceiling))

    def _failed(self, reason: str) -> None:
        self.status.stream_failures += 1
        self.status.last_error = reason
        self.status.set_state("disconnected")
        if reason != self._last_logged_error:
            self._last_logged_error = reason
            served = f"version {self.status.version}" if self.status.version else "static sessions only"
            self._log(f"control plane {self.settings.address}: {reason}; serving {served}, reconnecting")

    def _endpoint(self) -> Endpoint:
        limits = self.limits
        settings = self.settings
        address = parse_address(settings.address)  # valid: the config was checked
        # The CA file is read at every connect, as the token is: it can rotate.
        return Endpoint(address.host, address.port, tls_context(settings.ca_file) if settings.tls else None,
                        settings.server_name, keepalive_s=limits.control_plane_keepalive_s,
                        keepalive_timeout_s=limits.control_plane_keepalive_timeout_s,
                        max_message_bytes=limits.control_plane_max_message_bytes)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token_file = self.settings.token_file
        if token_file is None:
            return ()
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        return (("authorization", "Bearer " + token),)

    async def _stream(self) -> bool:
        """One stream until it fails; True when at least one response arrived."""
        self.status.set_state("connecting")
        metadata_ = self._metadata()
        delta = self.settings.protocol == "delta"
        got = False
        stream = await open_stream(self._endpoint(), _DELTA_PATH if delta else _SOTW_PATH, metadata_)
        with contextlib.closing(stream):
            node = self.node()
            if delta:
                first: Any = config_pb2.DeltaDiscoveryRequest(
                    node=node, initial_resource_versions=self.state.resource_versions())
            else:
                first = config_pb2.DiscoveryRequest(node=node, version_info=self.state.version)
            await stream.write(first.SerializeToString())
            while True:
                data = await stream.read()
                if data is None:
                    return got
                response = _parse(data, delta)
                if not got:
                    got = True
                    self.status.set_state("connected")
                    self.status.last_error = ""
                    if self._last_logged_error:
                        self._log(f"control plane {self.settings.address}: connected")
                    self._last_logged_error = ""
                error = await self._handle(response, delta)
                if delta:
                    answer: Any = config_pb2.DeltaDiscoveryRequest(response_nonce=response.nonce)
                else:
                    answer = config_pb2.DiscoveryRequest(response_nonce=response.nonce, version_info=self.state.version)
                if error is not None:
                    answer.error_detail.code = StatusCode.INVALID_ARGUMENT  # the push was refused
                    answer.error_detail.message = error
                await stream.write(answer.SerializeToString())

    async def _handle(self, response: Any, delta: bool) -> str | None:
        """Validate and apply one response; returns None (ACK) or the reason to NACK."""
        status = self.status
        version = response.system_version_info if delta else response.version_info
        try:
            new, upserted, removed, snapshot = self._next_state(response, delta, version)
        except ValidationError as exc:
            problems = [str(p) for p in exc.problems] or [str(exc)]
            reason = "; ".join(problems[:_NACK_PROBLEMS]) + (
                f"; and {len(problems) - _NACK_PROBLEMS} more" if len(problems) > _NACK_PROBLEMS else "")
            status.nacks += 1
            status.last_nack = {"version": version, "nonce": response.nonce, "message": reason, "at": time.time()}
            self._log(f"control plane push {version} refused (NACK), keeping version {self.state.version or '-'}: "
                      + reason)
            self._initial_fetch_done()
            return reason
        previous = self.state.version
        self.state = new
        self._snapshot = snapshot
        await self._apply(Update(new, previous, upserted, removed))
        status.acks += 1
        status.version = version
        status.control_plane_id = new.control_plane_id
        status.sessions = len(new.sessions)
        status.last_update_at = time.time()
        self._initial_fetch_done()
        self._save_soon(new)
        return None

    def _save_soon(self, state: PushedState) -> None:
        # Off the ACK path: the file is a cache for restarts. If the proxy dies before it is
        # written, it resumes from the previous version and the control plane sends the rest.
        if self.state_path is None:
            return
        self._save_pending = state
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_loop())

    async def _save_loop(self) -> None:
        assert self.state_path is not None
        while self._save_pending is not None:
            # A burst of pushes is written once per interval, not once per push (each write
            # is an fsync); only the latest set is written.
            wait_s = self._last_save + self.limits.control_plane_state_write_interval_s - time.monotonic()
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flushing.wait(), wait_s)
            self._last_save = time.monotonic()
            state, self._save_pending = self._save_pending, None
            data = self._renderer.render(state)
            try:
                await asyncio.to_thread(write_atomic, self.state_path, data)
                self.status.state_file_error = ""
            except OSError as exc:
                error = f"cannot write {self.state_path}: {exc.strerror}"
                if error != self.status.state_file_error:
                    self._log("state file: " + error)
                self.status.state_file_error = error

    async def flush(self) -> None:
        """Write a pending state file now instead of at the end of the interval (shutdown)."""
        self._flushing.set()
        if self._saver is not None:
            await self._saver

    def _next_state(self, response: Any, delta: bool,
                    version: str) -> tuple[PushedState, tuple[Session, ...], tuple[str, ...], Snapshot]:
        """The set a response makes, what changed, and the snapshot after it; raises ``ValidationError``.

        Costs O(changed) for a delta response: each pushed session is parsed, and the change is
        applied to the supervisor's snapshot exactly as the workers will apply it.
        """
        limits = rule_limits(self.config.snapshot)
        old = self.state.sessions
        incoming = {resource.name for resource in response.resources}
        if delta:
            removed_names = [n for n in dict.fromkeys(response.removed_resources) if n in old and n not in incoming]
            total = len(old) + sum(1 for n in incoming if n not in old) - len(removed_names)
        else:
            total = len(incoming)
        # Count before validating: refusing a million sessions must not cost a million parses.
        total += len(self.config.snapshot.sessions)
        if total > limits.max_sessions:
            raise ValidationError([Problem("resources", f"the push makes {total} sessions, over the limit of "
                                           f"{limits.max_sessions} per snapshot")])
        problems: list[Problem] = []
        entries: dict[str, tuple[Session, str]] = {}
        for resource in response.resources:
            try:
                session = session_from_proto(resource.session, limits)
            except ValidationError as exc:
                problems.extend(exc.problems)
                continue
            if session.id != resource.name:
                problems.append(Problem(f"resource {resource.name}", f"holds session {session.id!r}"))
                continue
            entries[session.id] = (session, resource.version)
        if problems:
            raise ValidationError(problems)
        if delta:
            sessions = dict(old)
            sessions.update(entries)
            for name in removed_names:
                del sessions[name]
            new = PushedState(version, sessions, response.control_plane_id)
            upserted = tuple(s for sid, (s, v) in entries.items() if sid not in old or old[sid][1] != v)
            removed = tuple(removed_names)
        else:
            new = PushedState(version, entries, response.control_plane_id)
            upserted, removed = diff(self.state, new)
        return new, upserted, removed, change_snapshot(self._snapshot, self.config.snapshot, upserted, removed,
                                                       version)

    def set_config(self, config: ProxyConfig) -> None:
        """A reloaded bootstrap file (checked against the pushed sessions by the caller)."""
        self.config = config
        self._snapshot = compose_snapshot(config.snapshot, self.state.session_list(),
                                          self.state.version or config.snapshot.version)

    def exposition(self) -> bytes:
        """The channel's Prometheus samples (merged into the supervisor's ``/metrics``)."""
        status = self.status
        label = 'worker="supervisor"'
        version = status.version.replace("\\", "\\\\").replace('"', '\\"')
        lines = [
            "# HELP turnout_control_plane_connected Whether the config stream to the control plane is up",
            "# TYPE turnout_control_plane_connected gauge",
            f"turnout_control_plane_connected{{{label}}} {1.0 if status.state == 'connected' else 0.0}",
            "# HELP turnout_control_plane_updates_total Pushes from the control plane, by answer",
            "# TYPE turnout_control_plane_updates_total counter",
            f'turnout_control_plane_updates_total{{{label},result="ack"}} {float(status.acks)}',
            f'turnout_control_plane_updates_total{{{label},result="nack"}} {float(status.nacks)}',
            "# HELP turnout_control_plane_stream_failures_total Config streams that failed or could not open",
            "# TYPE turnout_control_plane_stream_failures_total counter",
            f"turnout_control_plane_stream_failures_total{{{label}}} {float(status.stream_failures)}",
            "# HELP turnout_control_plane_last_update_timestamp_seconds When the last push was applied",
            "# TYPE turnout_control_plane_last_update_timestamp_seconds gauge",
            f"turnout_control_plane_last_update_timestamp_seconds{{{label}}} {status.last_update_at or 0.0}",
            "# HELP turnout_control_plane_initial_fetch_timed_out 1 when the proxy started serving without a push",
            "# TYPE turnout_control_plane_initial_fetch_timed_out gauge",
            f"turnout_control_plane_initial_fetch_timed_out{{{label}}} "
            f"{1.0 if status.initial_fetch == 'timed_out' else 0.0}",
            "# HELP turnout_control_plane_sessions Sessions pushed by the control plane and in use",
            "# TYPE turnout_control_plane_sessions gauge",
            f"turnout_control_plane_sessions{{{label}}} {float(status.sessions)}",
            "# HELP turnout_control_plane_version_info The pushed version in use (value is always 1)",
            "# TYPE turnout_control_plane_version_info gauge",
            f'turnout_control_plane_version_info{{{label},version="{version}"}} 1.0',
        ]
        return ("\n".join(lines) + "\n").encode()

    def _initial_fetch_done(self) -> None:
        if self.status.initial_fetch == "pending":
            self.status.initial_fetch = "done"
        self.initial_done.set()

    async def wait_initial(self) -> None:
        """Wait for the first push, up to the initial-fetch timeout; then serve what there is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.initial_done.wait(), self.limits.control_plane_initial_fetch_timeout_s)
        if not self.initial_done.is_set():
            self.status.initial_fetch = "timed_out"
            served = f"version {self.state.version} from the state file" if self.state.version else \
                "static sessions only"
            self._log(f"control plane {self.settings.address}: no push within "
                      f"{self.limits.control_plane_initial_fetch_timeout_s:g} s; serving {served}")
            self.initial_done.set()


def _parse(data: bytes, delta: bool) -> Any:
    """A response message from its bytes; one that does not parse fails the stream, as in gRPC."""
    kind = config_pb2.DeltaDiscoveryResponse if delta else config_pb2.DiscoveryResponse
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise GrpcError(StatusCode.INTERNAL, f"the control plane sent a response that is not a valid "
                                             f"{kind.__name__}: {exc}") from None


def _rpc_error(exc: GrpcError) -> str:
    code = exc.code
    if code == StatusCode.UNAUTHENTICATED:
        return "credentials refused (UNAUTHENTICATED): check control_plane.token_file"
    if code == StatusCode.RESOURCE_EXHAUSTED:
        return "push larger than limits.control_plane_max_message_bytes refused (RESOURCE_EXHAUSTED): " + exc.message
    return f"{code.name}: {exc.message}".strip()
