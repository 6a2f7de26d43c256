"""The state file: atomic, validated, and never a reason to crash."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from dataplane.process.channel import diff
from dataplane.process.statefile import PushedState, load_state, save_state
from filters import parse_session


def state(version: str, **sessions: str) -> PushedState:
    return PushedState(version, {
        sid: (parse_session({"id": sid, "key": "k-" + sid, "routes": [
            {"service": "users", "destination": "10.0.0.1:80"}]}, now=1.0), v)
        for sid, v in sessions.items()}, "cp-1")


def test_save_then_load_round_trips(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "sub" / "state.json")
    save_state(path, state("7", a="3", b="7"))
    loaded, why = load_state(path)
    assert why == "" and loaded is not None
    assert loaded.version == "7" and loaded.control_plane_id == "cp-1"
    assert loaded.resource_versions() == {"a": "3", "b": "7"}
    assert [s.id for s in loaded.session_list()] == ["a", "b"]
    assert not [n for n in os.listdir(tmp_path / "sub") if n.startswith(".turnout-state-")]  # no temp left


def test_missing_corrupt_and_invalid_files_load_as_nothing(tmp_path: pathlib.Path) -> None:
    assert load_state(str(tmp_path / "none.json")) == (None, "no state file yet")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": 1, "sessions": {')
    loaded, why = load_state(str(corrupt))
    assert loaded is None and "not a valid state file" in why
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"format": 1, "version": "1", "sessions": {
        "x": {"version": "1", "session": {"id": "x", "routes": [{"service": "users", "destination": "nohost"}]}}}}))
    loaded, why = load_state(str(invalid))
    assert loaded is None and "destination" in why
    other_format = tmp_path / "v2.json"
    other_format.write_text(json.dumps({"format": 2, "sessions": {}}))
    assert load_state(str(other_format))[0] is None


def test_a_failed_write_keeps_the_old_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    save_state(str(path), state("1", a="1"))
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_state(str(path), state("2", a="2"))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # the temporary file is gone too


def test_diff_by_version() -> None:
    old = state("5", a="1", b="2", c="3")
    new = state("6", a="1", b="6", d="6")
    upserted, removed = diff(old, new)
    assert [s.id for s in upserted] == ["b", "d"]
    assert removed == ("c",)
