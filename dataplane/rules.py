"""Loading routing rules (the ``routing`` and ``sessions`` sections) from a YAML file."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from filters import (
    KeyConfig,
    Problem,
    RuleLimits,
    Session,
    Snapshot,
    ValidationError,
    compile_snapshot,
    documents,
    parse_key_config,
    parse_sessions,
)

ROUTING_FIELDS = frozenset({"key_sources", "baggage_keys", "baggage_max_members", "baggage_max_bytes",
                            "debug_headers"})


class ConfigError(ValidationError):
    """A configuration file that cannot be used, with every problem named by field."""


def load_yaml(path: str | Path) -> Mapping[str, Any]:
    """Read a YAML mapping, turning I/O and syntax errors into ``ConfigError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: not UTF-8 ({exc})")]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, origin: str) -> Mapping[str, Any]:
    """Parse YAML text that must hold a mapping."""
    try:
        data = documents.load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(origin, f"invalid YAML: {exc}")]) from None
    except ValidationError as exc:  # a number too long to convert
        raise ConfigError(exc.problems) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError([Problem(origin, "must be a YAML mapping")])
    return data


def snapshot_from_config(config: Mapping[str, Any], version: str, now: float | None = None) -> Snapshot:
    """Validate ``routing`` and ``sessions`` and compile them into a snapshot."""
    problems: list[Problem] = []
    routing = config.get("routing") or {}
    key_config = KeyConfig()
    if not isinstance(routing, Mapping):
        problems.append(Problem("routing", "must be a mapping"))
    else:
        unknown = set(routing) - ROUTING_FIELDS
        if unknown:
            problems.append(Problem("routing", "unknown field(s): " + ", ".join(sorted(map(str, unknown)))))
        try:
            key_config = parse_key_config(routing)
        except ValidationError as exc:
            problems.extend(exc.problems)
    limits = RuleLimits(baggage_max_members=key_config.baggage_max_members,
                        baggage_max_bytes=key_config.baggage_max_bytes)
    sessions = []
    try:
        sessions = parse_sessions(config.get("sessions") or [], limits=limits,
                                  now=time.time() if now is None else now)
    except ValidationError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return compile_snapshot(sessions, version, key_config, limits)


def compose_snapshot(base: Snapshot, pushed: Iterable[Session], version: str) -> Snapshot:
    """The bootstrap file's sessions plus the control plane's, compiled as one snapshot.

    Raises ``ValidationError`` (and builds nothing) when they conflict, e.g. a pushed
    session claiming a (key, service) that a static one holds.
    """
    return compile_snapshot((*base.sessions, *pushed), version, base.key_config, rule_limits(base))


def change_snapshot(snapshot: Snapshot, static: Snapshot, upserted: Sequence[Session], removed: Sequence[str],
                    version: str) -> Snapshot:
    """``snapshot`` (static + pushed sessions) after a change of pushed sessions, in O(changed).

    The supervisor validates a push with this and every worker applies it with this, so
    they cannot disagree. Raises ``ValidationError`` (and builds nothing) on a conflict, over
    the limits, or when a change would replace or remove a session of the bootstrap file.
    """
    static_ids = {s.id for s in static.sessions}
    clash = sorted({s.id for s in upserted if s.id in static_ids} | {sid for sid in removed if sid in static_ids})
    if clash:
        raise ValidationError([Problem("sessions", f"session id(s) {', '.join(clash)} belong to static sessions "
                                                   "of the bootstrap file")])
    return snapshot.with_changes(upserted, removed, version, rule_limits(static))


def rule_limits(snapshot: Snapshot) -> RuleLimits:
    """The rule limits a snapshot's sessions were validated with."""
    key_config = snapshot.key_config
    return RuleLimits(baggage_max_members=key_config.baggage_max_members,
                      baggage_max_bytes=key_config.baggage_max_bytes)
