"""``turnout control-plane``: the store, the policy, the HTTP API, TTL expiry and the gRPC push service.

Start order: the auth file, tokens, policy and TLS files are read first so a mistake fails
before anything listens; then the store, the push service, both listeners, and one ready
line on standard output with the bound addresses. SIGHUP reloads the policy file, the
tokens file and JWKS files (an invalid one is refused and the old one kept). SIGTERM or
SIGINT: stop accepting, end every push stream, give requests in flight
``SHUTDOWN_GRACE_S``, close the store, exit 0.

Credentials: ``--auth FILE`` configures identities (``controlplane.authconfig``). Two
bootstrap tokens add to it or stand alone: ``--token-file`` (identity ``admin``, in an admin
group, and in a proxy group too unless ``--proxy-token-file`` is given; the alphabetically
first of each) and ``--proxy-token-file`` (identity ``proxy``, in a proxy group). With neither ``--auth`` nor
``--token-file``, an admin token is generated for the run and written to
``controlplane.auth.local_token_path(port)``, where the CLI on this machine finds it: local
use needs no setup, and nothing is ever open.

The control plane runs on plain asyncio (not uvloop): grpc.aio brings its own loop
integration, and nothing here is on a request's hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
from prometheus_client import CollectorRegistry

from controlplane.api import ApiService
from controlplane.audit import AuditLog, audit_log
from controlplane.auth import (
    api_ssl_context,
    local_token_path,
    read_token,
    write_local_token,
)
from controlplane.authconfig import AuthConfig, load_auth_config
from controlplane.authn import Authenticator
from controlplane.errors import StartupError
from controlplane.expiry import Expirer
from controlplane.http import HttpServer
from controlplane.identity import Identity
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import Policy, load_policy
from controlplane.push import PushService
from controlplane.store import SessionStore
from controlplane.tokens import token_digest
from controlplane.tunnels import TunnelRegistry
from filters import ValidationError
from turnout.v1 import config_pb2_grpc

log = logging.getLogger("turnout.controlplane")

# Kubernetes waits 30 s after SIGTERM; 5 s lets in-flight requests finish well inside that.
SHUTDOWN_GRACE_S = 5.0
GRPC_OPTIONS = [
    # A full state-of-the-world push of 100,000 sessions fits.
    ("grpc.max_send_message_length", 64 << 20),
    # Keepalives find a dead proxy (or a dead path to it) within half a minute.
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    # Proxies ping as their own keepalive; accept it at this rate instead of GOAWAY.
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpc sets SO_REUSEPORT by default: a second control plane on the same port would
    # silently take half the proxies instead of failing to start.
    ("grpc.so_reuseport", 0),
    # A proxy always holds its stream open, so a connection with no call for this long holds
    # nothing but a socket (Envoy's idle_timeout for upstream connections is 1 h; this port
    # only ever serves long-lived streams).
    ("grpc.max_connection_idle_ms", 60000),
    # A proxy opens one stream per connection (a second only while reconnecting).
    ("grpc.max_concurrent_streams", 16),
]


@dataclass(frozen=True)
class ServerOptions:
    """The ``turnout control-plane`` flags."""

    api: str = "127.0.0.1:18080"
    grpc: str = "127.0.0.1:18000"
    db: str = "turnout-sessions.db"
    auth: str | None = None
    token_file: str | None = None
    proxy_token_file: str | None = None
    gateway_token_file: str | None = None
    policy: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    control_plane_id: str = ""


def split_address(text: str, flag: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) of a listen flag; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise StartupError(f"{flag} {text!r}: expected host:port, e.g. 127.0.0.1:18080")
    return host, int(port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlPlane:
    """One running control plane; ``run`` serves until SIGTERM/SIGINT or ``stop``."""

    def __init__(self, options: ServerOptions, out: TextIO = sys.stdout) -> None:
        self._options = options
        self._out = out
        self._stopping = asyncio.Event()
        if (options.tls_cert is None) != (options.tls_key is None):
            raise StartupError("--tls-cert and --tls-key go together")
        self._api_address = split_address(options.api, "--api")
        self._grpc_address = split_address(options.grpc, "--grpc")
        self._auth_config = self._load_auth()
        bootstrap, self._generated_token = self._bootstrap_tokens()
        self._authenticator = Authenticator(self._auth_config, bootstrap)
        self._policy = self._load_policy()
        self._ssl_context: ssl.SSLContext | None = None
        self._grpc_credentials: grpc.ServerCredentials | None = None
        if options.tls_cert is not None and options.tls_key is not None:
            self._ssl_context = api_ssl_context(options.tls_cert, options.tls_key)
            self._grpc_credentials = grpc_server_credentials(options.tls_cert, options.tls_key)
        self._control_plane_id = options.control_plane_id or socket.gethostname()

    def _load_auth(self) -> AuthConfig:
        if self._options.auth is None:
            return AuthConfig()
        try:
            return load_auth_config(self._options.auth)
        except ValidationError as exc:
            raise StartupError(f"--auth {self._options.auth}: invalid auth file:\n  "
                               + "\n  ".join(map(str, exc.problems))) from None

    def _bootstrap_tokens(self) -> tuple[dict[str, Identity], str | None]:
        """Identities of --token-file and --proxy-token-file, or the generated admin token."""
        options, roles = self._options, self._auth_config.roles
        bootstrap: dict[str, Identity] = {}
        generated = None
        separate_proxy = options.proxy_token_file is not None
        if options.token_file is not None:
            token = read_token(options.token_file, "--token-file")
            bootstrap[token_digest(token)] = roles.admin_identity("admin", "--token-file", not separate_proxy)
        elif options.auth is None:
            generated = secrets.token_urlsafe(32)
            bootstrap[token_digest(generated)] = roles.admin_identity("admin", "generated token", not separate_proxy)
        if options.proxy_token_file is not None:
            digest = token_digest(read_token(options.proxy_token_file, "--proxy-token-file"))
            if digest in bootstrap:
                raise StartupError("--proxy-token-file holds the same token as --token-file; give proxies their own")
            bootstrap[digest] = roles.proxy_identity("proxy", "--proxy-token-file")
        if options.gateway_token_file is not None:
            digest = token_digest(read_token(options.gateway_token_file, "--gateway-token-file"))
            if digest in bootstrap:
                raise StartupError("--gateway-token-file holds the same token as another bootstrap token; give "
                                   "gateways their own")
            bootstrap[digest] = roles.gateway_identity("gateway", "--gateway-token-file")
        return bootstrap, generated

    def _load_policy(self) -> Policy:
        if self._options.policy is None:
            return Policy()
        try:
            return load_policy(self._options.policy)
        except ValidationError as exc:
            raise StartupError(f"--policy {self._options.policy}: invalid policy file:\n  "
                               + "\n  ".join(map(str, exc.problems))) from None

    def stop(self) -> None:
        """Begin the graceful shutdown."""
        self._stopping.set()

    async def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        store = SessionStore(self._options.db, retention=self._auth_config.limits)
        authenticator = self._authenticator
        try:
            await authenticator.start()
            return await self._serve(store, authenticator)
        finally:
            await authenticator.close()
            store.close()

    async def _serve(self, store: SessionStore, authenticator: Authenticator) -> int:
        limits = self._auth_config.limits
        roles = self._auth_config.roles
        registry = CollectorRegistry()
        metrics = ControlPlaneMetrics(registry, store)
        audit = AuditLog(store, limits)
        metrics.watch_audit(lambda: audit.suppressed_total)
        tunnels = TunnelRegistry(store, audit)
        push = PushService(store, self._control_plane_id, registry, authenticate=authenticator.authenticate,
                           roles=roles, audit=audit, limits=limits, resolve=tunnels.resolve)
        api = ApiService(store, self._policy, authenticator.authenticate, roles, push, registry, metrics, audit,
                         limits, tunnels=tunnels)
        http = HttpServer(api.handle, api.admit, limits)
        metrics.watch_connections(lambda: http.connections - http.unauthenticated, lambda: http.unauthenticated,
                                  lambda: http.evicted)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        config_pb2_grpc.add_SessionDiscoveryServicer_to_server(push, server)  # type: ignore[no-untyped-call]
        grpc_host, grpc_port = self._grpc_address
        target = _host_port(grpc_host, grpc_port)
        try:
            bound_grpc_port = server.add_secure_port(target, self._grpc_credentials) \
                if self._grpc_credentials is not None else server.add_insecure_port(target)
        except RuntimeError as exc:
            raise StartupError(f"--grpc {self._options.grpc}: cannot listen: {exc}") from None
        try:
            api_host, api_port = await http.start(*self._api_address, self._ssl_context)
        except OSError as exc:
            raise StartupError(f"--api {self._options.api}: cannot listen: {exc.strerror}") from None
        token_path = self._write_generated_token(api_port)
        await server.start()
        expirer = asyncio.create_task(Expirer(store, metrics, audit).run())
        leases = asyncio.create_task(_expire_tunnels(tunnels))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(api, authenticator, metrics))
        tls = self._ssl_context is not None
        scheme = "https" if tls else "http"
        self._out.write(
            f"turnout control-plane {self._control_plane_id}: api {scheme}://{_host_port(api_host, api_port)} "
            f"grpc {_host_port(grpc_host, bound_grpc_port)}{' (tls)' if tls else ''}; "
            f"revision {store.revision}, {store.count()} session(s)"
            + (f"; admin token in {token_path}" if token_path is not None else "") + "\n")
        self._out.flush()
        try:
            await self._stopping.wait()
        finally:
            log.info("shutting down")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            # grpc's stop() refuses new streams at once and waits out the grace for open ones,
            # which push.close() ends.
            grpc_stopped = asyncio.create_task(server.stop(SHUTDOWN_GRACE_S))
            await push.close()
            await asyncio.gather(grpc_stopped, http.close(SHUTDOWN_GRACE_S))
            expirer.cancel()
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expirer
            with contextlib.suppress(asyncio.CancelledError):
                await leases
            if token_path is not None:
                # The token dies with this run; a stale file would only make the CLI say 401.
                with contextlib.suppress(OSError):
                    token_path.unlink()
        return 0

    def _write_generated_token(self, api_port: int) -> Path | None:
        if self._generated_token is None:
            return None
        path = local_token_path(api_port)
        try:
            write_local_token(path, self._generated_token)
        except OSError as exc:
            raise StartupError(f"no --auth: cannot write the generated admin token to {path}: {exc.strerror}; "
                               "give --auth FILE or --token-file FILE (or set XDG_STATE_HOME)") from None
        log.warning("no --auth given: generated an admin token for this run (identity 'admin') in %s; the turnout "
                    "CLI on this machine uses it for port %d. Configure identities with --auth FILE to share "
                    "this control plane", path, api_port)
        return path

    def _reload(self, api: ApiService, authenticator: Authenticator, metrics: ControlPlaneMetrics) -> None:
        try:
            authenticator.reload()
            log.info("SIGHUP: credentials reloaded (%d tokens)", authenticator.token_count)
        except StartupError as exc:
            log.error("SIGHUP: credentials not reloaded, the running ones stay: %s", exc)
        if self._options.policy is None:
            return
        try:
            policy = self._load_policy()
        except StartupError as exc:
            metrics.policy_reload(ok=False)
            log.error("SIGHUP: policy not reloaded, the running one stays: %s", exc)
            return
        api.policy = policy
        metrics.policy_reload(ok=True)
        log.info("SIGHUP: policy reloaded from %s", self._options.policy)


async def _expire_tunnels(tunnels: TunnelRegistry) -> None:
    """Remove tunnels whose gateway stopped reporting (checked every second)."""
    while True:
        await asyncio.sleep(1.0)
        for tunnel_id in tunnels.expire():
            log.warning("tunnel %s removed: its gateway stopped reporting for %g s", tunnel_id, tunnels.lease_s)


def run_control_plane(options: ServerOptions) -> int:
    """Run ``turnout control-plane`` to completion; a startup error is printed and exits 2."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Audit entries are one JSON line each, with nothing in front, for a log pipeline.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_log.addHandler(handler)
    audit_log.propagate = False
    try:
        return asyncio.run(_main(options))
    except StartupError as exc:
        sys.stderr.write(f"turnout control-plane: {exc}\n")
        return 2


async def _main(options: ServerOptions) -> int:
    return await ControlPlane(options).run()


def grpc_server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials for the gRPC push server from the same files as the API's."""
    try:
        cert = Path(cert_file).read_bytes()
        key = Path(key_file).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])
