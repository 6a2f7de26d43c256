"""The real control plane as a subprocess, for end-to-end tests of the config channel."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.support import ROOT

_READY = re.compile(r"api (https?://\S+) grpc (\S+)(?: \(tls\))?;")


@dataclass
class ControlPlaneProcess:
    """``turnout control-plane`` running as a subprocess."""

    process: subprocess.Popen[bytes]
    api: str  # base URL
    grpc: str  # host:port
    token: str
    log_path: Path
    ca_file: Path | None = None  # the API's certificate, when it serves HTTPS

    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """One API call; returns (status, parsed JSON body or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("authorization", "Bearer " + (self.token if token is None else token))
        if data is not None:
            req.add_header("content-type", "application/json")
        context = None if self.ca_file is None else ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

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

    def log(self) -> str:
        """What the control plane printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (by PID) and wait; kill it if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_control_plane(tmp: Path, db: Path | None = None, grpc_address: str = "127.0.0.1:0",
                        extra: tuple[str, ...] = (), ca_file: Path | None = None) -> ControlPlaneProcess:
    """Start ``turnout control-plane`` with a token and wait for its ready line."""
    token = "cp-test-token"
    token_file = tmp / "cp.token"
    token_file.write_text(token + "\n")
    log_path = tmp / f"cp-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "turnout.cli", "control-plane", "--api", "127.0.0.1:0", "--grpc", grpc_address,
             "--db", str(db or tmp / "sessions.db"), "--token-file", str(token_file), "--id", "cp-test", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 20
    while True:
        found = _READY.search(log_path.read_text(errors="replace"))
        if found:
            return ControlPlaneProcess(process, found.group(1), found.group(2), token, log_path, ca_file)
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                process.kill()
            raise RuntimeError("control plane did not start:\n" + log_path.read_text(errors="replace"))
        time.sleep(0.05)


@contextlib.contextmanager
def running_control_plane(tmp: Path, **kwargs: Any) -> Iterator[ControlPlaneProcess]:
    """A control plane for a ``with`` block, stopped even on failure."""
    cp = start_control_plane(tmp, **kwargs)
    try:
        yield cp
    finally:
        cp.stop()


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
