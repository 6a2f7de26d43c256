"""Who is calling: an authenticated identity, its groups, and what the groups make it.

An identity comes from a credential (a tokens-file entry, a verified JWT, the token of
``--token-file`` or the one generated when no ``--auth`` is given). Its ``name`` is what a
session's owner is and what audit entries name; it is never taken from a request body.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

# Identity and group names are shown in tables and audit lines and compared exactly:
# Kubernetes user names and OIDC subjects fit in this.
MAX_NAME_CHARS = 256


def name_problem(name: object, what: str = "an identity") -> str | None:
    """Why ``name`` cannot be used as an identity or group name, or None.

    Surrounding whitespace and control characters are refused rather than stripped:
    ``"capped "`` and ``"capped"`` must never be two names for one caller.
    """
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    if len(name) > MAX_NAME_CHARS:
        return f"{what} is longer than {MAX_NAME_CHARS} characters"
    if name != name.strip() or not name.isprintable():
        return f"{what} {name!r} has surrounding whitespace or unprintable characters"
    return None


@dataclass(frozen=True)
class Identity:
    """An authenticated caller.

    ``via`` says how it authenticated (for messages and audit). ``node_ids`` are the proxy
    node ids its credential may use (fnmatch patterns); None leaves them unbound, and then
    a live stream of one node id can still not be taken over from another address.
    """

    name: str
    groups: frozenset[str]
    via: str
    node_ids: tuple[str, ...] | None = None

    def may_use_node_id(self, node_id: str) -> bool:
        """Whether this credential may open a push stream as ``node_id``."""
        if self.node_ids is None:
            return True
        return any(fnmatch.fnmatchcase(node_id, pattern) for pattern in self.node_ids)

    def in_any(self, groups: Iterable[str]) -> bool:
        """Whether the identity is a member of at least one of ``groups``."""
        return not self.groups.isdisjoint(groups)


@dataclass(frozen=True)
class Roles:
    """Which groups are administrators (may change anyone's sessions), which are proxies, and
    which are tunnel gateways (``turnout gateway``: may register the tunnels machines attach)."""

    admin_groups: frozenset[str] = frozenset({"admins"})
    proxy_groups: frozenset[str] = frozenset({"proxies"})
    gateway_groups: frozenset[str] = frozenset({"gateways"})

    def is_admin(self, identity: Identity) -> bool:
        """Whether ``identity`` may update, extend and delete any session."""
        return identity.in_any(self.admin_groups)

    def is_proxy(self, identity: Identity) -> bool:
        """Whether ``identity`` may open a push stream."""
        return identity.in_any(self.proxy_groups)

    def is_gateway(self, identity: Identity) -> bool:
        """Whether ``identity`` may register tunnels (a gateway, or an admin)."""
        return identity.in_any(self.gateway_groups) or self.is_admin(identity)

    def proxy_only(self, identity: Identity) -> bool:
        """A proxy credential and nothing more: it may not use the API."""
        return self.is_proxy(identity) and not self.is_admin(identity)

    def gateway_identity(self, name: str, via: str) -> Identity:
        """A gateway identity for ``--gateway-token-file``: it registers tunnels and nothing else."""
        return Identity(name, frozenset({min(self.gateway_groups)}), via)

    def admin_identity(self, name: str, via: str, also_proxy: bool) -> Identity:
        """An administrator identity for a bootstrap token (``--token-file`` or the generated one)."""
        groups = {min(self.admin_groups)}
        if also_proxy:
            groups.add(min(self.proxy_groups))
        return Identity(name, frozenset(groups), via)

    def proxy_identity(self, name: str, via: str) -> Identity:
        """A proxy identity for ``--proxy-token-file``: it opens push streams and nothing else."""
        return Identity(name, frozenset({min(self.proxy_groups)}), via)
