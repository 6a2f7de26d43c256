"""The tokens file: opaque bearer tokens for small setups, stored only as SHA-256 digests.

::

    tokens:
      - identity: alice
        groups: [developers, alice-agents]
        sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
      - identity: node-a
        groups: [proxies]
        sha256: ...
        node_ids: ["node-a", "node-a:*"]     # proxies only: the node ids this token may stream as

The file never holds a token, so reading it (a backup, a ConfigMap, a review) gives
nobody a credential. Make a token and its line with::

    TOKEN=$(openssl rand -hex 32); printf %s "$TOKEN" | sha256sum

Tokens are looked up by their digest: a dictionary lookup keyed by a SHA-256 says nothing
about the token through its timing, because finding a token from its digest is as hard as
guessing it. SIGHUP reloads the file; an invalid file is refused and the old one kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from controlplane.identity import Identity, name_problem
from filters import Problem, ValidationError
from filters.documents import load_yaml

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = frozenset({"identity", "groups", "sha256", "node_ids"})
# A tokens file is for small setups (an OIDC issuer serves the rest); bounding it bounds the
# memory a mistaken file can take.
MAX_TOKENS = 10_000


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> dict[str, Identity]:
    """Read a tokens file: digest -> identity; raises ``ValidationError`` naming every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError([Problem(str(path), f"cannot read the tokens file: {exc}")]) from None
    try:
        data = load_yaml(text)  # ValidationError naming a number too long to convert
    except yaml.YAMLError as exc:
        raise ValidationError([Problem(str(path), f"invalid YAML: {exc}")]) from None
    return parse_tokens(data, f"tokens file {path}")


def parse_tokens(data: Any, where: str) -> dict[str, Identity]:
    """Validate a tokens mapping (``{"tokens": [...]}``); raises ``ValidationError`` listing every problem."""
    problems: list[Problem] = []
    if not isinstance(data, Mapping) or set(data) - {"tokens"}:
        raise ValidationError([Problem(where, "must be a mapping with one field, tokens: a list of "
                                       "{identity, groups, sha256}")])
    entries = data.get("tokens") or []
    if not isinstance(entries, list):
        raise ValidationError([Problem(f"{where}: tokens", "must be a list of {identity, groups, sha256}")])
    if len(entries) > MAX_TOKENS:
        raise ValidationError([Problem(f"{where}: tokens", f"more than {MAX_TOKENS} tokens; use an OIDC issuer")])
    out: dict[str, Identity] = {}
    for i, entry in enumerate(entries):
        at = f"{where}: tokens[{i}]"
        identity = _entry(entry, at, problems)
        if identity is None:
            continue
        digest = entry["sha256"].lower()
        if digest in out:
            problems.append(Problem(f"{at}.sha256", f"is also the token of {out[digest].name!r}; every token must "
                                    "be its own"))
            continue
        out[digest] = identity
    if problems:
        raise ValidationError(problems)
    return out


def _entry(entry: Any, at: str, problems: list[Problem]) -> Identity | None:
    before = len(problems)
    if not isinstance(entry, Mapping):
        problems.append(Problem(at, "must be a mapping {identity, groups, sha256}"))
        return None
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        problems.append(Problem(at, "unknown field(s): " + ", ".join(sorted(map(str, unknown)))
                                + "; known: " + ", ".join(sorted(_ENTRY_FIELDS))))
    name = entry.get("identity")
    problem = name_problem(name)
    if problem is not None:
        problems.append(Problem(f"{at}.identity", problem))
    groups = entry.get("groups", [])
    if not isinstance(groups, list) or any(name_problem(g, "a group") is not None for g in groups):
        problems.append(Problem(f"{at}.groups", "must be a list of group names"))
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest.lower()):
        problems.append(Problem(f"{at}.sha256", "must be the 64 hex digits of the token's SHA-256 (printf %s "
                                "\"$TOKEN\" | sha256sum), never the token itself"))
    node_ids = entry.get("node_ids")
    if node_ids is not None and (not isinstance(node_ids, list) or not node_ids
                                 or not all(isinstance(n, str) and n for n in node_ids)):
        problems.append(Problem(f"{at}.node_ids", "must be a non-empty list of node ids (fnmatch patterns)"))
    if len(problems) != before:
        return None
    assert isinstance(name, str)
    return Identity(name, frozenset(groups), "tokens file", None if node_ids is None else tuple(node_ids))
