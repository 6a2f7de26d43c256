"""The control plane's Prometheus metrics (the push service adds its own to the same registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.store import SessionStore

# A hostile client can send any method name; only these become label values.
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class ControlPlaneMetrics:
    """Sessions, revision, API requests, refused credentials, policy refusals and reloads, rate
    limiting, expired sessions."""

    def __init__(self, registry: CollectorRegistry, store: SessionStore) -> None:
        self._registry = registry
        sessions = Gauge("turnout_cp_sessions", "Sessions in the store", registry=registry)
        sessions.set_function(store.count)
        revision = Gauge("turnout_cp_revision", "Revision of the last change to the store", registry=registry)
        revision.set_function(lambda: store.revision)
        self._api_requests = Counter("turnout_cp_api_requests", "API requests by method and status code",
                                     ["method", "code"], registry=registry)
        self._policy_refusals = Counter("turnout_cp_policy_refusals", "Requests refused by policy, by policy name",
                                        ["policy"], registry=registry)
        self.sessions_expired = Counter("turnout_cp_sessions_expired", "Sessions removed because their TTL ran out",
                                        registry=registry)
        self._policy_reloads = Counter("turnout_cp_policy_reloads", "Policy file reloads (SIGHUP) by result",
                                       ["result"], registry=registry)
        # Push streams refused are turnout_cp_push_streams_refused_total{code}.
        self.auth_failures = Counter("turnout_cp_auth_failures", "API requests refused for their credentials (401)",
                                     registry=registry)
        self.rate_limited = Counter("turnout_cp_rate_limited", "Session changes refused by the per-identity rate "
                                    "limit (429)", registry=registry)

    def watch_connections(self, authenticated: Callable[[], int], unauthenticated: Callable[[], int],
                          evicted: Callable[[], int]) -> None:
        """Export the API server's connection pools (read at scrape time)."""
        open_connections = Gauge("turnout_cp_api_connections", "Open API connections, by whether one of their "
                                 "requests has authenticated", ["state"], registry=self._registry)
        open_connections.labels("authenticated").set_function(authenticated)
        open_connections.labels("unauthenticated").set_function(unauthenticated)
        Gauge("turnout_cp_api_connections_evicted", "Unauthenticated API connections closed to make room for new "
              "ones, since start", registry=self._registry).set_function(evicted)

    def watch_audit(self, left_out: Callable[[], int]) -> None:
        """Export how many refusals the audit trail counted but did not store (per-source limit)."""
        gauge = Gauge("turnout_cp_audit_refusals_left_out", "Refused credentials not stored in the audit trail "
                      "(over audit_refusals_per_minute for their source), since start", registry=self._registry)
        gauge.set_function(left_out)

    def api_request(self, method: str, status: int) -> None:
        """Count one answered API request."""
        self._api_requests.labels(method if method in _METHODS else "other", str(status)).inc()

    def policy_refusal(self, policy: str) -> None:
        """Count one refusal by ``policy``."""
        self._policy_refusals.labels(policy).inc()

    def policy_reload(self, ok: bool) -> None:
        """Count one policy reload, applied or refused as invalid."""
        self._policy_reloads.labels("ok" if ok else "invalid").inc()
