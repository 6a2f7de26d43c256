"""The last good set of pushed sessions, on disk, so a restarted proxy routes at once.

The supervisor writes the file (write to a temporary file in the same directory, fsync,
rename: a reader sees the old file or the new one, never half of one) after it validated a
push and before the workers apply it; a worker loads it at start. A missing, unreadable or
invalid file means "nothing pushed yet", never a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filters import RuleLimits, Session, ValidationError, parse_session

FORMAT = 1


@dataclass(frozen=True)
class PushedState:
    """Sessions received from the control plane: id -> (session, version), and the set's version."""

    version: str = ""
    sessions: dict[str, tuple[Session, str]] = field(default_factory=dict)
    control_plane_id: str = ""

    def resource_versions(self) -> dict[str, str]:
        """Session id -> version, as a delta stream's ``initial_resource_versions``."""
        return {sid: version for sid, (_, version) in self.sessions.items()}

    def session_list(self) -> list[Session]:
        """The sessions, in id order (a stable snapshot order)."""
        return [self.sessions[sid][0] for sid in sorted(self.sessions)]

    def to_json(self) -> dict[str, Any]:
        """The file's JSON form."""
        return {
            "format": FORMAT,
            "version": self.version,
            "control_plane_id": self.control_plane_id,
            "sessions": {sid: {"version": v, "session": s.to_dict()} for sid, (s, v) in sorted(self.sessions.items())},
        }


def state_from_json(data: Any, limits: RuleLimits | None = None) -> PushedState:
    """Validate the file's JSON form; raises ``ValidationError``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("sessions"), dict):
        raise ValidationError([])
    sessions: dict[str, tuple[Session, str]] = {}
    for sid, item in data["sessions"].items():
        if not isinstance(item, dict):
            raise ValidationError([])
        session = parse_session(item.get("session"), f"sessions.{sid}", limits)
        sessions[session.id] = (session, str(item.get("version", "")))
    return PushedState(str(data.get("version", "")), sessions, str(data.get("control_plane_id", "")))


def load_state(path: str, limits: RuleLimits | None = None) -> tuple[PushedState | None, str]:
    """The state in ``path``, or None and why not (missing, unreadable, invalid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "no state file yet"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        return state_from_json(json.loads(text), limits), ""
    except (ValueError, ValidationError) as exc:
        return None, f"{path} is not a valid state file ({exc or 'wrong format'}); ignored"


class StateRenderer:
    """Renders a state file, re-encoding only the sessions whose version changed.

    With 10,000 sessions a full ``json.dumps`` costs tens of milliseconds; a push changes
    one or two, so each session's JSON is kept and only new versions are encoded.
    """

    def __init__(self) -> None:
        self._encoded: dict[str, tuple[str, str]] = {}  # id -> (version, JSON of {"version", "session"})

    def render(self, state: PushedState) -> bytes:
        """The file's bytes for ``state``."""
        encoded = {}
        previous = self._encoded
        for sid, (session, version) in sorted(state.sessions.items()):
            cached = previous.get(sid)
            if cached is None or cached[0] != version:
                cached = (version, json.dumps({"version": version, "session": session.to_dict()},
                                              separators=(",", ":")))
            encoded[sid] = cached
        self._encoded = encoded
        head = json.dumps({"format": FORMAT, "version": state.version, "control_plane_id": state.control_plane_id},
                          separators=(",", ":"))
        body = ",".join(json.dumps(sid) + ":" + text for sid, (_, text) in encoded.items())
        return (head[:-1] + ',"sessions":{' + body + "}}").encode()


def write_atomic(path: str, data: bytes) -> None:
    """Write a file atomically (temporary file, fsync, rename); raises ``OSError``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".turnout-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_state(path: str, state: PushedState) -> None:
    """Render and write ``state`` atomically; raises ``OSError``."""
    write_atomic(path, StateRenderer().render(state))
