"""The real ``turnout session ...`` and ``turnout status`` commands against a real control plane."""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

from tests.integration.cp_support import ControlPlane, run_cli, running_control_plane, write_policy
from tests.integration.support import closed_port


def test_session_lifecycle_human_output(control_plane: ControlPlane, tmp_path: Path) -> None:
    match_file = tmp_path / "match.yaml"
    match_file.write_text("header: {name: x-user, exact: alice}\n")
    created = run_cli(control_plane, "session", "create", "--id", "cli-1", "--key", "cli-key",
                      "--route", "users=10.0.0.5:8080", "--route", "orders=10.0.0.6:80", "--mode", "mirror",
                      "--fallback", "error", "--upstream-protocol", "http1", "--match", f"@{match_file}",
                      "--priority", "5", "--ttl", "1h30m",
                      "--owner", "alice", "--label", "team=payments", "--label", "ticket=T-1")
    assert created.code == 0, created.err
    assert "created session cli-1" in created.out
    assert "baggage: turnout-session=cli-key" in created.out
    assert re.search(r"expires\s+\S+Z \(in 1h(29m|30m)", created.out), created.out
    assert re.search(r"orders\s+10\.0\.0\.6:80\s+mirror\s+error\s+http1\s+5\s+\{\"header\"", created.out), created.out

    got = run_cli(control_plane, "session", "get", "cli-1")
    assert got.code == 0 and "labels    team=payments, ticket=T-1" in got.out

    listed = run_cli(control_plane, "session", "list", "--owner", "alice")
    assert listed.code == 0
    header, *rows = listed.out.splitlines()
    assert header.split() == ["ID", "KEY", "OWNER", "SERVICES", "EXPIRES", "REVISION", "REFUSED", "BY"]
    assert len(rows) == 1 and rows[0].split()[:4] == ["cli-1", "cli-key", "alice", "users,orders"]
    assert rows[0].split()[-1] == "-", "no proxy refused it"
    assert header.index("KEY") == rows[0].index("cli-key"), "columns are aligned"

    extended = run_cli(control_plane, "session", "extend", "cli-1", "--ttl", "3h")
    assert extended.code == 0 and "extended session cli-1" in extended.out and "(in 3h" in extended.out

    deleted = run_cli(control_plane, "session", "delete", "cli-1")
    assert deleted.code == 0 and deleted.out == "deleted session cli-1\n"
    gone = run_cli(control_plane, "session", "get", "cli-1")
    assert gone.code == 1 and "no session 'cli-1'" in gone.err


def test_json_output_is_the_apis(control_plane: ControlPlane) -> None:
    created = run_cli(control_plane, "session", "create", "--json", "--key", "json-key", "--route",
                      "users=10.0.0.5:8080", "--owner", "")
    assert created.code == 0, created.err
    body = created.json()
    sid = body["session"]["id"]
    assert re.fullmatch(r"s-[0-9a-f]{10}", sid) and set(body) == {"session", "revision", "proxies"}
    assert body["session"]["expires_at"] - body["session"]["created_at"] == 7200, "the default TTL"
    assert body["session"]["owner"] == "admin", "the identity of the token, whatever --owner says"
    assert run_cli(control_plane, "session", "get", sid, "--json").json() == body
    listed = run_cli(control_plane, "session", "list", "--json").json()
    assert {"session": body["session"], "revision": body["revision"]} in listed["sessions"]
    conflict = run_cli(control_plane, "session", "create", "--json", "--key", "json-key", "--route",
                       "users=10.0.0.7:80")
    assert conflict.code == 1
    assert conflict.json()["error"] == "conflict" and conflict.json()["holder"] == sid
    assert run_cli(control_plane, "session", "delete", sid, "--json").json() == {"deleted": sid}


def test_refusals_print_every_problem_and_exit_1(control_plane: ControlPlane) -> None:
    invalid = run_cli(control_plane, "session", "create", "--key", "bad key", "--route", "users=nohost",
                      "--route", "orders=10.0.0.1:99999")
    assert invalid.code == 1
    lines = invalid.err.splitlines()
    assert lines[0] == "turnout: the control plane refused the session:"
    assert {line.split(":")[0].strip() for line in lines[1:]} == {
        "session.key", "session.routes[0].destination", "session.routes[1].destination"}

    policy = run_cli(control_plane, "session", "create", "--route", "users=10.0.0.5:8080")
    assert policy.code == 1 and policy.err.startswith("turnout: refused by policy forbid_unfiltered_steal: ")

    as_json = run_cli(control_plane, "session", "create", "--json", "--key", "bad key", "--route", "users=nohost")
    assert as_json.code == 1 and as_json.json()["error"] == "invalid" and len(as_json.json()["problems"]) == 2

    wrong_token = run_cli(control_plane, "session", "list", token="not-the-token")
    assert wrong_token.code == 1 and "unknown token" in wrong_token.err


def test_usage_errors_exit_2(control_plane: ControlPlane, tmp_path: Path) -> None:
    for args in (["session", "create", "--key", "k", "--route", "users=10.0.0.5:8080", "--ttl", "2x"],
                 ["session", "create", "--key", "k", "--route", "users"],
                 ["session", "create", "--key", "k", "--route", "users=10.0.0.5:8080", "--match", "[1, 2]"],
                 ["session", "create", "--key", "k"],
                 ["session", "extend", "some-id"],
                 ["session", "list", "--control-plane", "ftp://x"]):
        result = run_cli(control_plane, *args)
        assert result.code == 2, (args, result.err)
        assert result.err, args
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    result = run_cli(control_plane, "session", "list", "--token-file", str(empty))
    assert result.code == 2 and "empty" in result.err


def test_token_file_option(control_plane: ControlPlane, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {control_plane.token}\n")
    result = run_cli(control_plane, "session", "list", "--token-file", str(token_file), token=None)
    assert result.code == 0, result.err


def test_unreachable_exits_3_naming_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_cli(None, "session", "list", url=url, token="t")
    assert result.code == 3 and url in result.err and "connection refused" in result.err
    as_json = run_cli(None, "status", "--json", "--control-plane", url, token="t")
    assert as_json.code == 3 and as_json.json()["error"] == "unreachable" and as_json.json()["url"] == url


def test_a_server_that_is_not_a_turnout_control_plane_is_named_as_such() -> None:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = run_cli(None, "session", "list", url=url, token="t")
        assert result.code == 3 and result.err.count("\n") == 1 and url in result.err
        assert "is not a turnout control plane" in result.err and "18080" in result.err
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_https_to_a_plain_http_control_plane_says_to_use_http(control_plane: ControlPlane) -> None:
    url = control_plane.api_url.replace("http://", "https://")
    result = run_cli(None, "session", "list", url=url, token="t")
    assert result.code == 3 and result.err.count("\n") == 1 and url in result.err
    assert "does not speak TLS there; use http://" in result.err and "Traceback" not in result.err


def test_extend_is_capped_by_policy(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, {"max_ttl_s": 3600, "default_ttl_s": 600})
    with running_control_plane(tmp_path, "--policy", str(policy)) as cp:
        created = run_cli(cp, "session", "create", "--json", "--key", "k", "--route", "users=10.0.0.5:8080")
        sid = created.json()["session"]["id"]
        refused = run_cli(cp, "session", "extend", sid, "--ttl", "2h")
        assert refused.code == 1 and "refused by policy max_ttl_s" in refused.err
        assert run_cli(cp, "session", "extend", sid, "--ttl", "59m").code == 0


def test_help_texts() -> None:
    for args, expected in ((["session", "create", "--help"], "SERVICE=HOST:PORT"), (["status", "--help"], "--json"),
                           (["control-plane", "--help"], "--auth FILE"), (["audit", "--help"], "--since"),
                           (["session", "update", "--help"], "--group")):
        result = run_cli(None, *args)
        assert result.code == 0 and expected in result.out, args


def test_status_without_proxies(control_plane: ControlPlane) -> None:
    result = run_cli(control_plane, "status")
    assert result.code == 0
    assert re.fullmatch(r"control plane revision \d+\nno proxies have connected\n", result.out)
    body = run_cli(control_plane, "status", "--json").json()
    assert body == {"revision": body["revision"], "proxies": [], "tunnels": []}
