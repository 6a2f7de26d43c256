"""The ``turnout`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys


def turnout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnout.cli", *args], capture_output=True, text=True,
                          timeout=90, check=False)


def test_demo_routes_real_requests_through_the_proxy() -> None:
    result = turnout("demo", "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("sd-routing-key=abc123" in line and "200" in line and "sandbox" in line and "fix-123" in line
               for line in lines)
    assert any("agent7" in line and "baseline" in line and "agent-7" in line for line in lines)
    assert any("turnout-session=nope" in line and "baseline" in line for line in lines)
    assert "The mirror target received 1 copy(ies): ['POST /api/users HTTP/1.1']" in result.stdout
    # The control plane part: the printed create line ran, and the next request used the session.
    assert "turnout session create --id live-1 --key live42 --route users=127.0.0.1:" in result.stdout
    assert any("turnout-session=live42" in line and "sandbox" in line and "live-1" in line
               and "pushed by the control plane" in line for line in lines)
    assert "turnout demo: stopped" in result.stdout


def test_explain_with_a_config_file(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text(
        "routing: {baggage_keys: [sd-routing-key]}\n"
        "sessions:\n"
        "  - {id: s1, key: k1, routes: [{service: users, destination: '10.1.2.3:80'}]}\n"
    )
    result = turnout("explain", "--config", str(config), "--service", "users",
                     "-H", "baggage: a=b, sd-routing-key=k1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["key"] == {"value": "k1", "where": "baggage member sd-routing-key"}
    assert report["decision"]["session"] == "s1"
    assert report["decision"]["destination"] == "10.1.2.3:80"


def test_explain_prints_one_line_by_default(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "rules.yaml"
    config.write_text("sessions:\n  - {id: s1, key: k1, routes: [{service: users, destination: '10.1.2.3:80'}]}\n")
    routed = turnout("explain", "--config", str(config), "--service", "users", "-H", "baggage: turnout-session=k1")
    assert routed.returncode == 0, routed.stderr
    assert routed.stdout.count("\n") == 1
    assert "-> sandbox 10.1.2.3:80 (session s1" in routed.stdout
    assert "key 'k1' from baggage member turnout-session" in routed.stdout
    unrouted = turnout("explain", "--config", str(config), "--service", "users", "--target", "/a")
    assert unrouted.stdout == "GET /a for users -> baseline (no routing key; no routing key in the request)\n"


def test_invalid_config_names_every_field(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "routing: {baggage_keys: ['bad key'], colour: blue}\n"
        "sessions:\n"
        "  - {id: s1, routes: [{service: users, destination: 'nohost', mode: teleport}]}\n"
    )
    result = turnout("explain", "--config", str(config), "--service", "users")
    assert result.returncode == 2
    assert "routing: unknown field(s): colour" in result.stderr
    assert "routing.baggage_keys[0]: must be a non-empty HTTP token" in result.stderr
    assert "sessions[0].routes[0].destination: 'nohost' is not 'host:port'" in result.stderr
    assert "sessions[0].routes[0].mode: must be one of: steal, mirror" in result.stderr


def test_missing_file_and_bad_yaml(tmp_path: pathlib.Path) -> None:
    missing = turnout("explain", "--config", str(tmp_path / "nope.yaml"), "--service", "users")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("sessions: [unclosed\n")
    result = turnout("explain", "--config", str(bad), "--service", "users")
    assert result.returncode == 2 and "invalid YAML" in result.stderr


def test_every_command_has_help_and_json() -> None:
    top = turnout("--help")
    assert top.returncode == 0 and "usage: turnout" in top.stdout
    commands = re.findall(r"^    (\S+)", top.stdout, re.MULTILINE)
    assert {"proxy", "check-config", "explain", "demo", "inject", "session", "status"} <= set(commands)
    for command in commands:
        result = turnout(command, "--help")
        assert result.returncode == 0 and "usage: turnout " + command in result.stdout, command
        if command in ("proxy", "check-config", "explain", "demo", "inject"):
            assert "--json" in result.stdout, command


def test_explain_line_names_the_tunnel() -> None:
    from dataplane.cli import explain_line

    report = {"service": "users", "key": {"value": "k", "where": "baggage member turnout-session"}, "decision": {
        "kind": "sandbox", "session": "s1", "destination": "10.0.0.7:4000", "mode": "steal", "fallback": "baseline",
        "tunnel": "t-1 on gateway gw", "tunnel_connected": True}}
    assert "10.0.0.7:4000 (session s1, mode steal, fallback baseline, tunnel via t-1 on gateway gw)" in \
        explain_line("GET", "/", report)
    report["decision"].update(destination="tunnel (local process disconnected)", tunnel=None,  # type: ignore[attr-defined]
                              tunnel_connected=False)
    assert "tunnel not connected: fallback baseline applies" in explain_line("GET", "/", report)
