"""The real ``turnout control-plane`` as a subprocess on 127.0.0.1 port 0, and the real CLI.

Every process is started here and stopped here, by its own PID, even when a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.integration.support import stop_process

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-test-token-0123456789"
READY_RE = re.compile(r"api (https?)://([0-9.]+):(\d+) grpc ([0-9.]+):(\d+)")
ROUTE = {"service": "users", "destination": "10.0.0.5:8080"}


@dataclass
class ControlPlane:
    """A running control plane and where to reach it."""

    process: subprocess.Popen[str]
    api_url: str
    grpc_target: str
    db: Path
    token: str | None
    log_path: Path
    ready_line: str
    ca_file: Path | None = None  # the API's certificate, when it serves HTTPS

    def client(self, token: str | None = "default", **kwargs: Any) -> httpx.Client:
        """An httpx client for the API; ``token`` None sends no Authorization header."""
        token = self.token if token == "default" else token
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=10, **kwargs)

    def log(self) -> str:
        """What the control plane logged so far."""
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, token: str | None = "default") -> tuple[int, Any]:
        """One API call with the token (or ``token``); returns (status, parsed JSON body or None)."""
        verify: Any = True if self.ca_file is None else ssl.create_default_context(cafile=str(self.ca_file))
        with self.client(token=token, verify=verify) as http:
            response = http.request(method, path, json=body)
        return response.status_code, response.json() if response.content else None

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a session; fails the test unless the API answers 201."""
        status, body = self.request("POST", "/v1/sessions", spec)
        assert status == 201, (status, body)
        return dict(body)

    def delete(self, session_id: str) -> None:
        """Delete a session; fails the test unless the API answers 204."""
        status, body = self.request("DELETE", "/v1/sessions/" + session_id)
        assert status == 204, (status, body)

    def proxies(self) -> dict[str, dict[str, Any]]:
        """``/v1/proxies`` by node id."""
        status, body = self.request("GET", "/v1/proxies")
        assert status == 200, (status, body)
        return {p["id"]: p for p in body["proxies"]}

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
        """Signal it and wait for its exit status; kill it if it hangs (and raise)."""
        try:
            return stop_process(self.process, sig, timeout_s)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def write_token(tmp: Path, name: str = "token", token: str = TOKEN) -> Path:
    """A token file."""
    path = tmp / name
    path.write_text(token + "\n")
    return path


def write_tokens(tmp: Path, tokens: dict[str, dict[str, Any]], name: str = "tokens.yaml") -> Path:
    """A tokens file: token -> {identity, groups, node_ids?}, stored as SHA-256 digests."""
    path = tmp / name
    path.write_text(yaml.safe_dump({"tokens": [
        {**entry, "sha256": hashlib.sha256(token.encode()).hexdigest()} for token, entry in tokens.items()]}))
    return path


def write_auth(tmp: Path, auth: dict[str, Any], name: str = "auth.yaml") -> Path:
    """An --auth file."""
    path = tmp / name
    path.write_text(yaml.safe_dump(auth))
    return path


def state_env(tmp: Path) -> dict[str, str]:
    """The environment for a turnout process: this checkout, and a private state directory (where a
    control plane without --auth writes its generated token, and the CLI looks for it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TURNOUT_TOKEN", "TURNOUT_CONTROL_PLANE")}
    env.update(PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp / "state"))
    return env


def write_policy(tmp: Path, policy: dict[str, Any], name: str = "policy.yaml") -> Path:
    """A policy file."""
    path = tmp / name
    path.write_text(yaml.safe_dump(policy))
    return path


def start_control_plane(tmp: Path, *extra: str, token: str | None = TOKEN, db: Path | None = None,
                        grpc: str = "127.0.0.1:0", ca_file: Path | None = None, timeout_s: float = 20) -> ControlPlane:
    """Start ``turnout control-plane`` (API on a free port, gRPC on ``grpc``); returns once it is ready.

    ``ca_file``: the certificate to trust when ``extra`` makes the API serve HTTPS.
    """
    db = db or tmp / "sessions.db"
    args = [sys.executable, "-m", "turnout.cli", "control-plane", "--api", "127.0.0.1:0", "--grpc", grpc,
            "--db", str(db), "--id", "cp-test"]
    if token is not None:
        args += ["--token-file", str(write_token(tmp, "api-token", token))]
    args += extra
    log_path = tmp / f"control-plane-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                   env=state_env(tmp))
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"control plane not ready in {timeout_s} s:\n" + log_path.read_text())
            line = process.stdout.readline()
            if not line:
                process.wait(5)
                raise RuntimeError(f"control plane exited ({process.returncode}) during start:\n"
                                   + log_path.read_text())
            match = READY_RE.search(line)
            if match:
                break
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        process.stdout.close()
        raise
    scheme, api_host, api_port, grpc_host, grpc_port = match.groups()
    return ControlPlane(process, f"{scheme}://{api_host}:{api_port}", f"{grpc_host}:{grpc_port}", db, token,
                        log_path, line, ca_file)


@contextlib.contextmanager
def running_control_plane(tmp: Path, *extra: str, token: str | None = TOKEN, db: Path | None = None,
                          grpc: str = "127.0.0.1:0", ca_file: Path | None = None) -> Iterator[ControlPlane]:
    """A control plane for a ``with`` block, stopped (and killed if need be) even on failure."""
    cp = start_control_plane(tmp, *extra, token=token, db=db, grpc=grpc, ca_file=ca_file)
    try:
        yield cp
    finally:
        with contextlib.suppress(Exception):
            cp.stop()
        if cp.process.poll() is None:
            cp.process.kill()
            cp.process.wait(5)


@dataclass
class CliResult:
    """A finished ``turnout`` command."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """Standard output as JSON."""
        return json.loads(self.out)


def run_cli(cp: ControlPlane | None, *args: str, token: str | None = "default", url: str | None = None,
            timeout_s: float = 30, state: Path | None = None) -> CliResult:
    """Run the real ``turnout`` command against ``cp`` (token in TURNOUT_TOKEN); ``state``: the directory
    whose state/ the CLI searches for a generated token (default: none to find)."""
    env = state_env(state if state is not None else Path("/nonexistent"))
    if cp is not None:
        env["TURNOUT_CONTROL_PLANE"] = cp.api_url
        token = cp.token if token == "default" else token
    if url is not None:
        env["TURNOUT_CONTROL_PLANE"] = url
    if token is not None and token != "default":
        env["TURNOUT_TOKEN"] = token
    done = subprocess.run([sys.executable, "-m", "turnout.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout_s, check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


def eventually(check: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Retry ``check`` until it returns a truthy value without raising; re-raise at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"still {result!r} after {timeout_s} s")
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval_s)
