"""The control plane's policy file (controlplane/policy.py ``load_policy``) and ``--auth``
file (controlplane/authconfig.py ``load_auth_config``) loaders on arbitrary file bytes: a
``Policy`` / ``AuthConfig`` or ``ValidationError`` naming the problems, never another
exception. A policy that loads is then used as the API uses it (create, update, extend,
overlap checks for callers in its groups, ``whoami``'s rules): only its refusals
(``PolicyRefused``, ``Conflict``) may come out.

The first byte picks the loader (even: policy, odd: auth); the rest is the file.
"""

from __future__ import annotations

import dataclasses
import json

from controlplane.authconfig import load_auth_config
from controlplane.errors import Conflict, PolicyRefused
from controlplane.policy import Policy, load_policy
from filters import Session, ValidationError, parse_session
from fuzz.targets._files import as_file

NOW = 1_800_000_000.0
_SESSIONS = [parse_session(spec, now=NOW) for spec in (
    {"id": "keyed", "key": "k1", "ttl_s": 600,
     "routes": [{"service": "users", "destination": "10.1.2.3:80", "priority": 7}]},
    {"id": "filtered", "ttl_s": 100000, "routes": [
        {"service": "orders-a", "destination": "b.sandbox.local:443", "mode": "steal",
         "match": {"header": {"name": "x-user", "exact": "alice"}}},
        {"service": "users", "destination": "[fd00::5]:8080", "mode": "mirror"}]},
    {"id": "open", "routes": [{"service": "users", "destination": "192.168.0.1:80"}]},
)]
_GROUPS: tuple[frozenset[str], ...] = (frozenset(), frozenset({"developers"}),
                                        frozenset({"agents", "developers", "admins"}))


@dataclasses.dataclass(frozen=True)
class _Rival:
    """Another owner's stored session, as the overlap check reads it."""

    session: Session
    group: str | None


def _use(policy: Policy) -> None:
    rivals = [_Rival(dataclasses.replace(session, id=session.id + "-bob", owner="bob"), None)
              for session in _SESSIONS]
    for groups in _GROUPS:
        json.dumps(policy.rules_for(groups).to_dict())
        assert policy.default_ttl_for(groups) > 0
        for session in _SESSIONS:
            try:
                policy.check_create(session, NOW, 10, 2, groups)
                policy.check_extend(session.expires_at, NOW, groups)
                policy.check_overlap(session, "developers", rivals, NOW, groups)
            except (PolicyRefused, Conflict):
                pass


def fuzz_one(data: bytes) -> None:
    """Load ``data[1:]`` as a policy or an auth file (``data[0]``'s low bit)."""
    if not data:
        return
    path = as_file(data[1:])
    try:
        if data[0] & 1:
            load_auth_config(path)
        else:
            _use(load_policy(path))
    except ValidationError as exc:
        assert exc.problems, "a ValidationError naming no problem"


def seeds() -> list[bytes]:
    """Policy and auth files with every field."""
    policies = [
        """allowed_services: [users, "orders-*"]
allowed_destinations: [10.0.0.0/8, "fd00::/8", "*.sandbox.local"]
modes: [steal, mirror, steal_without_key]
forbid_unfiltered_steal: true
max_priority: 100
max_ttl_s: 28800
max_sessions_per_owner: 5
allow_lower_priority_overlap: true
groups:
  developers: {max_ttl_s: 7200}
  agents: {modes: [steal, mirror], max_sessions_per_owner: 20, allowed_destinations: ["a?.sandbox.local"]}
max_sessions: 1000
default_ttl_s: 3600
require_owner: false
limits: {max_routes_per_session: 8, max_labels: 16, max_regex_chars: 200, max_regex_program_size: 500,
         max_literal_chars: 1024, max_match_nodes: 16}
""",
        "modes: [[steal]]\n",
        "allowed_destinations: ['10.0.0.0/33', '1.2.3.*', '[a-']\nmax_ttl_s: 1e999\n",
        "groups: {' x': {}, developers: [1]}\n",
        "default_ttl_s: 99999999\nmax_ttl_s: 60\n",
    ]
    auths = [
        """admin_groups: [platform-admins]
proxy_groups: [proxies]
tokens_file: tokens.yaml
issuers:
  - issuer: https://kubernetes.default.svc.cluster.local
    audiences: [turnout]
    jwks_file: /etc/turnout/cluster-jwks.json
    identity_claim: sub
    groups_claim: groups
    node_id_claim: /kubernetes.io/pod/name
    algorithms: [RS256]
    leeway_s: 30
  - {issuer: https://idp, audiences: turnout, jwks_url: "https://idp/keys", jwks_refresh_s: 300}
groups:
  proxies: ["system:serviceaccount:turnout:turnout-node"]
limits: {max_body_bytes: 65536, changes_per_minute: 10.5, idle_timeout_s: 5}
""",
        "issuers: [{issuer: a, audiences: [b], jwks_url: 'http://[::1'}]\n",
        "issuers: [{issuer: a, audiences: [b], jwks_file: f, algorithms: [[RS256]]}]\n",
    ]
    return [b"\x00" + text.encode() for text in policies] + [b"\x01" + text.encode() for text in auths]
