"""Credentials on a real control plane: the push stream's bearer interceptor (real grpcio clients),
a separate proxy token, TLS for the API and gRPC, and refusing to start open."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.integration.cp_support import (
    ROOT,
    TOKEN,
    ControlPlane,
    run_cli,
    running_control_plane,
    state_env,
    write_token,
)
from turnout.v1 import config_pb2, config_pb2_grpc

PROXY_TOKEN = "proxy-only-token-9876543210"


@contextlib.contextmanager
def open_stream(target: str, token: str | None, credentials: grpc.ChannelCredentials | None = None,
                node_id: str = "proxy-1", timeout_s: float = 3.0) -> Iterator[Any]:
    """A StreamSessions call that has sent its first request and stays open until the block ends."""
    options = [("grpc.ssl_target_name_override", "localhost")] if credentials is not None else []
    channel = grpc.secure_channel(target, credentials, options) if credentials is not None \
        else grpc.insecure_channel(target)
    done = threading.Event()

    def requests() -> Iterator[config_pb2.DiscoveryRequest]:
        yield config_pb2.DiscoveryRequest(node=config_pb2.Node(id=node_id, cluster="test", services=["users"]))
        done.wait(timeout_s + 5)

    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    stub = config_pb2_grpc.SessionDiscoveryStub(channel)  # type: ignore[no-untyped-call]
    call = stub.StreamSessions(requests(), metadata=metadata, timeout=timeout_s)
    try:
        yield call
    finally:
        done.set()
        call.cancel()
        channel.close()


def first_reply_code(call: Any) -> grpc.StatusCode | None:
    """None when a response arrived, else the call's status code."""
    try:
        next(call)
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_push_stream_needs_the_token(control_plane: ControlPlane) -> None:
    for token, words in ((None, "missing bearer token"), ("wrong-token", "unknown token")):
        with open_stream(control_plane.grpc_target, token) as call:
            assert first_reply_code(call) is grpc.StatusCode.UNAUTHENTICATED
            assert words in call.details() and "control_plane.token_file" in call.details()
    with open_stream(control_plane.grpc_target, TOKEN, timeout_s=1.0) as call:
        assert first_reply_code(call) is not grpc.StatusCode.UNAUTHENTICATED


def test_aio_clients_always_see_unauthenticated(control_plane: ControlPlane) -> None:
    """grpc.aio clients (what proxies use) report INTERNAL when the status races their first write."""
    async def attempt(channel: grpc.aio.Channel, token: str | None, delta: bool) -> grpc.StatusCode:
        stub = config_pb2_grpc.SessionDiscoveryStub(channel)  # type: ignore[no-untyped-call]
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        call = (stub.DeltaSessions if delta else stub.StreamSessions)(metadata=metadata, timeout=5)
        node = config_pb2.Node(id="aio-intruder", services=["users"])
        try:
            await call.write(config_pb2.DeltaDiscoveryRequest(node=node) if delta
                             else config_pb2.DiscoveryRequest(node=node))
            await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def attempts() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(control_plane.grpc_target) as channel:
            return [await attempt(channel, token, delta)
                    for token in ("wrong-token", None) for delta in (True, False) for _ in range(25)]

    codes = asyncio.run(attempts())
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, collections.Counter(codes)


def test_status_shows_a_connected_proxy(control_plane: ControlPlane) -> None:
    with open_stream(control_plane.grpc_target, TOKEN, node_id="status-proxy", timeout_s=5.0) as call:
        assert first_reply_code(call) is None, "the push service answers the first request"
        deadline = time.monotonic() + 5
        while True:
            body = run_cli(control_plane, "status", "--json").json()
            if any(p["id"] == "status-proxy" for p in body["proxies"]):
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        table = run_cli(control_plane, "status")
        assert table.code == 0
        header, *rows = table.out.splitlines()[1:]
        assert header.split()[:5] == ["PROXY", "CLUSTER", "SERVICES", "PROTOCOL", "CONNECTED"]
        assert ["status-proxy", "test", "users", "sotw", "yes"] in [row.split()[:5] for row in rows]


def test_separate_proxy_token(tmp_path: Path) -> None:
    proxy_token = write_token(tmp_path, "proxy-token", PROXY_TOKEN)
    with running_control_plane(tmp_path, "--proxy-token-file", str(proxy_token)) as cp:
        with cp.client(token=PROXY_TOKEN) as http:
            response = http.get("/v1/sessions")
            assert response.status_code == 403 and "proxy credential" in response.json()["message"], \
                "the proxy token cannot use the API"
        with open_stream(cp.grpc_target, TOKEN) as call:
            assert first_reply_code(call) is grpc.StatusCode.PERMISSION_DENIED, "the API token opens no push stream"
            assert "no proxy group" in call.details()
        with open_stream(cp.grpc_target, PROXY_TOKEN, timeout_s=1.0) as call:
            assert first_reply_code(call) is not grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (made by openssl, as an operator would)."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with running_control_plane(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as cp:
        assert cp.api_url.startswith("https://127.0.0.1:") and "(tls)" in cp.ready_line
        context = ssl.create_default_context(cafile=str(cert))
        with cp.client(verify=context) as http:
            response = http.post("/v1/sessions", json={"id": "tls-1", "key": "k", "routes": [
                {"service": "users", "destination": "10.0.0.5:8080"}]})
            assert response.status_code == 201
        with pytest.raises(httpx.ConnectError):
            httpx.get(cp.api_url + "/healthz", verify=ssl.create_default_context())
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(cp.api_url.replace("https://", "http://") + "/healthz")

        listed = run_cli(cp, "session", "list", "--ca-file", str(cert))
        assert listed.code == 0 and "tls-1" in listed.out
        untrusted = run_cli(cp, "session", "list")
        assert untrusted.code == 3 and "certificate is not trusted" in untrusted.err and "--ca-file" in untrusted.err
        assert untrusted.err.count("\n") == 1 and "Traceback" not in untrusted.err
        plain = cp.api_url.replace("https://", "http://")
        mismatch = run_cli(None, "session", "list", url=plain, token=TOKEN)
        assert mismatch.code == 3 and mismatch.err.count("\n") == 1 and plain in mismatch.err
        assert "use https://" in mismatch.err and "Traceback" not in mismatch.err

        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with open_stream(cp.grpc_target, "wrong-token", credentials) as call:
            assert first_reply_code(call) is grpc.StatusCode.UNAUTHENTICATED
        with open_stream(cp.grpc_target, TOKEN, credentials, timeout_s=2.0) as call:
            assert first_reply_code(call) is None, "a TLS stream with the token gets its first push"


@pytest.mark.parametrize(("args", "message"), [
    (["--allow-unauthenticated"], "--allow-unauthenticated is gone: nothing is ever open"),
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["--policy", "missing.yaml"], "cannot read the policy file"),
    (["--api", "nonsense"], "expected host:port"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.pem"], "cannot load"),
    (["--auth", "missing.yaml"], "cannot read the auth file"),
])
def test_refuses_to_start(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "turnout.cli", "control-plane", "--api", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
         "--db", str(tmp_path / "s.db"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=False, env=state_env(tmp_path))
    assert result.returncode == 2 and message in result.stderr, result.stderr
