"""The bootstrap file's ``control_plane`` section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataplane.config import SYSTEM_STATE_DIR, default_state_dir, parse_config_text
from dataplane.rules import ConfigError

BASE = ("listeners: [{name: in, address: '127.0.0.1:15001', mode: inbound, service: users, "
        "baseline: '127.0.0.1:8080'}]\n")


def test_defaults() -> None:
    config = parse_config_text(BASE + "control_plane: {address: 'cp.turnout.svc:18000'}\n")
    cp = config.control_plane
    assert cp is not None
    assert (cp.address, cp.protocol, cp.tls, cp.token_file) == ("cp.turnout.svc:18000", "delta", False, None)
    assert config.node_id().endswith(":15001")
    path = config.state_path()
    assert path is not None and path.startswith(default_state_dir() + "/") and path.endswith(".state.json")
    assert config.limits.control_plane_initial_fetch_timeout_s == 10.0


def test_default_state_dir_is_one_this_user_can_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TURNOUT_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    chosen = default_state_dir()
    if os.path.isdir(SYSTEM_STATE_DIR) and os.access(SYSTEM_STATE_DIR, os.W_OK):
        assert chosen == SYSTEM_STATE_DIR  # the image's directory, when it is there and writable
    else:
        assert chosen == str(tmp_path / "state" / "turnout")  # a non-root user's own state directory
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir() == str(tmp_path / "explicit")
    config = parse_config_text(BASE + "control_plane: {address: 'cp:18000', node_id: 'pod/a'}\n")
    assert config.state_path() == str(tmp_path / "explicit" / "pod_a.state.json")


def test_everything_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_NODE_ID", "from-env")
    config = parse_config_text(BASE + (
        "control_plane: {address: '10.0.0.1:18000', protocol: sotw, token_file: /run/token, node_id: pod-a,\n"
        "  cluster: staging, state_path: /tmp/s.json, tls: {ca_file: /run/ca.pem, server_name: cp.local}}\n"
        "limits: {control_plane_reconnect_max_s: 5, control_plane_max_message_bytes: 1048576}\n"))
    cp = config.control_plane
    assert cp is not None
    assert (cp.protocol, cp.token_file, cp.tls, cp.ca_file, cp.server_name) == (
        "sotw", "/run/token", True, "/run/ca.pem", "cp.local")
    assert config.node_id() == "pod-a"  # the file wins over the environment
    assert config.state_path() == "/tmp/s.json"
    assert config.limits.control_plane_reconnect_max_s == 5.0
    assert config.limits.control_plane_max_message_bytes == 1048576


def test_node_id_from_the_environment_and_no_state_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_NODE_ID", "pod-b")
    config = parse_config_text(BASE + "control_plane: {address: 'cp:1', state_path: null}\n")
    assert config.node_id() == "pod-b"
    assert config.state_path() is None


def test_every_problem_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(BASE + (
            "control_plane: {address: nohost, protocol: push, token_file: '', tls: maybe,\n"
            "  state_path: 3, color: red}\n"))
    fields = {p.field for p in info.value.problems}
    assert {"control_plane", "control_plane.address", "control_plane.protocol", "control_plane.token_file",
            "control_plane.tls", "control_plane.state_path"} <= fields
