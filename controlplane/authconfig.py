"""The ``--auth`` file: who may call the control plane, as what, and its abuse limits.

::

    admin_groups: [platform-admins]          # may update, extend and delete anyone's sessions (default [admins])
    proxy_groups: [proxies]                  # may open push streams, and nothing else (default [proxies])
    tokens_file: tokens.yaml                 # opaque tokens by SHA-256 (controlplane.tokens); SIGHUP reloads it
    issuers:                                 # OIDC / service-account JWTs
      - issuer: https://kubernetes.default.svc.cluster.local
        audiences: [turnout]
        jwks_file: /etc/turnout/cluster-jwks.json        # or jwks_url (+ jwks_ca_file, jwks_token_file)
        identity_claim: sub                              # a claim name, or a JSON pointer: /kubernetes.io/pod/name
        identity_prefix: ""
        groups_claim: groups                             # optional; groups_prefix, and static groups: [...]
        node_id_claim: /kubernetes.io/pod/name           # proxies with this issuer's tokens may only stream as
                                                         # that value (or <value>:<port>)
    groups:                                  # extra members by identity name (fnmatch patterns)
      proxies: ["system:serviceaccount:turnout:turnout-node"]
      alice-agents: [alice@example.com, "system:serviceaccount:agents:alice-*"]
    limits: {...}                            # controlplane.limits.Limits

Relative paths are relative to the file. Every problem is reported with its field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.identity import Roles, name_problem
from controlplane.jwks import DEFAULT_ALGORITHMS, IssuerConfig, check_jwks_url
from controlplane.limits import Limits, parse_limits
from filters import Problem, ValidationError, finite_number
from filters.documents import load_yaml

_FIELDS = ("admin_groups", "proxy_groups", "gateway_groups", "tokens_file", "issuers", "groups", "limits")
_ISSUER_FIELDS = ("issuer", "audiences", "jwks_file", "jwks_url", "jwks_ca_file", "jwks_token_file",
                  "jwks_refresh_s", "jwks_min_refresh_s", "algorithms", "identity_claim", "identity_prefix",
                  "groups_claim", "groups_prefix", "groups", "node_id_claim", "leeway_s")


@dataclass(frozen=True)
class AuthConfig:
    """A validated ``--auth`` file (``AuthConfig()``: no tokens file, no issuers, default limits)."""

    roles: Roles = field(default_factory=Roles)
    tokens_file: str | None = None
    issuers: tuple[IssuerConfig, ...] = ()
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


def load_auth_config(path: str | Path) -> AuthConfig:
    """Read and validate an ``--auth`` file; raises ``ValidationError`` naming every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError([Problem(str(path), f"cannot read the auth file: {exc}")]) from None
    try:
        data = load_yaml(text)  # ValidationError naming a number too long to convert
    except yaml.YAMLError as exc:
        raise ValidationError([Problem(str(path), f"invalid YAML: {exc}")]) from None
    return parse_auth_config({} if data is None else data, Path(path).resolve().parent)


def parse_auth_config(data: Any, base: Path, where: str = "auth") -> AuthConfig:
    """Validate an auth mapping; relative paths are taken from ``base``."""
    problems: list[Problem] = []

    def fail(at: str, reason: str) -> None:
        problems.append(Problem(at, reason))

    if not isinstance(data, Mapping):
        raise ValidationError([Problem(where, "must be a mapping of: " + ", ".join(_FIELDS))])
    for name in data:
        if name not in _FIELDS:
            fail(f"{where}.{name}", "unknown field; known fields: " + ", ".join(_FIELDS))
    roles = Roles(
        admin_groups=_group_set(data.get("admin_groups"), Roles().admin_groups, f"{where}.admin_groups", fail),
        proxy_groups=_group_set(data.get("proxy_groups"), Roles().proxy_groups, f"{where}.proxy_groups", fail),
        gateway_groups=_group_set(data.get("gateway_groups"), Roles().gateway_groups, f"{where}.gateway_groups",
                                  fail),
    )
    if roles.admin_groups & roles.proxy_groups:
        fail(f"{where}.proxy_groups", "a group cannot be both an admin group and a proxy group")
    tokens_file = None
    if data.get("tokens_file") is not None:
        tokens_file = _path(data["tokens_file"], base, f"{where}.tokens_file", fail)
    issuers: list[IssuerConfig] = []
    raw_issuers = data.get("issuers") or []
    if not isinstance(raw_issuers, list):
        fail(f"{where}.issuers", "must be a list of issuers")
        raw_issuers = []
    seen: set[str] = set()
    for i, spec in enumerate(raw_issuers):
        issuer = _issuer(spec, base, f"{where}.issuers[{i}]", fail)
        if issuer is None:
            continue
        if issuer.issuer in seen:
            fail(f"{where}.issuers[{i}].issuer", f"{issuer.issuer!r} is configured twice")
        seen.add(issuer.issuer)
        issuers.append(issuer)
    members = _members(data.get("groups"), f"{where}.groups", fail)
    limits = parse_limits(data.get("limits"), f"{where}.limits", problems)
    if problems:
        raise ValidationError(problems)
    return AuthConfig(roles, tokens_file, tuple(issuers), members, limits)


def _group_set(value: Any, default: frozenset[str], where: str, fail: Callable[[str, str], None]) -> frozenset[str]:
    if value is None:
        return default
    if not isinstance(value, list) or not value or any(name_problem(g, "a group") for g in value):
        fail(where, "must be a non-empty list of group names")
        return default
    return frozenset(value)


def _path(value: Any, base: Path, where: str, fail: Callable[[str, str], None]) -> str | None:
    if not isinstance(value, str) or not value:
        fail(where, "must be a file path")
        return None
    return str(base / value)


def _members(value: Any, where: str, fail: Callable[[str, str], None]) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(where, "must map group names to lists of identity names (fnmatch patterns)")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for group, names in value.items():
        problem = name_problem(group, "a group")
        if problem is not None:
            fail(f"{where}", problem)
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            fail(f"{where}.{group}", "must be a list of identity names (fnmatch patterns)")
            continue
        out[group] = tuple(names)
    return out


def _issuer(spec: Any, base: Path, where: str, fail: Callable[[str, str], None]) -> IssuerConfig | None:
    if not isinstance(spec, Mapping):
        fail(where, "must be a mapping with issuer, audiences and jwks_file or jwks_url")
        return None
    problems_before: list[str] = []

    def bad(at: str, reason: str) -> None:
        problems_before.append(at)
        fail(at, reason)

    for name in spec:
        if name not in _ISSUER_FIELDS:
            bad(f"{where}.{name}", "unknown field; known fields: " + ", ".join(_ISSUER_FIELDS))
    issuer = spec.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        bad(f"{where}.issuer", "must be the issuer's URL, exactly as in the tokens' iss claim")
    audiences = spec.get("audiences")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        bad(f"{where}.audiences", "must list the audiences accepted (a token for another audience is refused), "
            "e.g. [turnout]")
    has_file, has_url = spec.get("jwks_file") is not None, spec.get("jwks_url") is not None
    if has_file == has_url:
        bad(where, "give exactly one of jwks_file or jwks_url")
    changes: dict[str, Any] = {}
    for name in ("jwks_file", "jwks_ca_file", "jwks_token_file"):
        if spec.get(name) is not None:
            changes[name] = _path(spec[name], base, f"{where}.{name}", bad)
    if has_url:
        url = spec["jwks_url"]
        problem = check_jwks_url(url) if isinstance(url, str) else "must be a URL"
        if problem is not None:
            bad(f"{where}.jwks_url", problem)
        changes["jwks_url"] = url
    for name, least in (("jwks_refresh_s", 1.0), ("jwks_min_refresh_s", 0.0), ("leeway_s", 0.0)):
        if name in spec:
            value = finite_number(spec[name])
            if value is None or value < least:
                bad(f"{where}.{name}", "must be a positive number of seconds" if least else "must be a number of "
                    "seconds, 0 or more")
            else:
                changes[name] = value
    if "algorithms" in spec:
        algorithms = spec["algorithms"]
        if not isinstance(algorithms, list) or not algorithms or not all(a in DEFAULT_ALGORITHMS for a in algorithms):
            bad(f"{where}.algorithms", "must be a non-empty list of: " + ", ".join(DEFAULT_ALGORITHMS))
        else:
            changes["algorithms"] = tuple(algorithms)
    for name in ("identity_claim", "groups_claim", "node_id_claim"):
        if spec.get(name) is not None:
            if not isinstance(spec[name], str) or not spec[name]:
                bad(f"{where}.{name}", "must be a claim name or a JSON pointer such as /kubernetes.io/pod/name")
            else:
                changes[name] = spec[name]
    for name in ("identity_prefix", "groups_prefix"):
        if spec.get(name) is not None:
            if not isinstance(spec[name], str):
                bad(f"{where}.{name}", "must be a string")
            else:
                changes[name] = spec[name]
    if spec.get("groups") is not None:
        groups = spec["groups"]
        if not isinstance(groups, list) or any(name_problem(g, "a group") for g in groups):
            bad(f"{where}.groups", "must be a list of group names every identity of this issuer joins")
        else:
            changes["groups"] = tuple(groups)
    if problems_before:
        return None
    assert isinstance(issuer, str) and isinstance(audiences, list)
    return IssuerConfig(issuer=issuer, audiences=tuple(audiences), **changes)
