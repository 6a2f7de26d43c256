"""The committed protobuf and gRPC modules match ``turnout/v1/config.proto``."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from filters import ValidationError, parse_session
from turnout.v1 import config_pb2
from turnout.v1.convert import session_from_proto, session_to_proto

ROOT = pathlib.Path(__file__).resolve().parents[3]
GENERATED = ["config_pb2.py", "config_pb2.pyi", "config_pb2_grpc.py"]


def test_generated_modules_are_not_stale(tmp_path: pathlib.Path) -> None:
    (tmp_path / "turnout" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "turnout" / "v1" / "config.proto", tmp_path / "turnout" / "v1" / "config.proto")
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "turnout/v1/config.proto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh = (tmp_path / "turnout" / "v1" / name).read_bytes()
        committed = (ROOT / "turnout" / "v1" / name).read_bytes()
        assert fresh == committed, f"turnout/v1/{name} is stale: run `make proto` and commit the result"


@pytest.mark.parametrize("spec", [
    {"id": "s1", "key": "k1", "owner": "alice", "labels": {"team": "a"}, "expires_at": 2e9,
     "routes": [{"service": "users", "destination": "10.0.0.5:8080", "mode": "mirror", "fallback": "error",
                 "priority": 3, "match": {"all_of": [{"header": {"name": "x-user", "exact": "alice"}},
                                                     {"path": {"prefix": "/api/"}}]}}]},
    {"id": "h1", "key": "k2", "routes": [
        {"service": "web", "destination": "10.0.0.6:80", "upstream_protocol": "http1"},
        {"service": "api", "destination": "10.0.0.7:80", "upstream_protocol": "http2"}]},
    {"id": "filter-only", "routes": [{"service": "users", "destination": "[::1]:9000",
                                      "match": {"http_filter": {"header_filter": "^x-dev: carol"}}}]},
])
def test_a_session_survives_the_wire(spec: dict[str, object]) -> None:
    session = parse_session(spec, now=1000.0)
    msg = session_to_proto(session)
    assert msg is not None
    decoded = config_pb2.Session.FromString(msg.SerializeToString())
    back = session_from_proto(decoded)
    assert back.to_dict() == session.to_dict()


def test_routes_are_cut_to_the_subscribed_services() -> None:
    session = parse_session({"id": "s", "key": "k", "routes": [
        {"service": "users", "destination": "10.0.0.1:80"}, {"service": "orders", "destination": "10.0.0.2:80"}]},
        now=0.0)
    only_orders = session_to_proto(session, {"orders"})
    assert only_orders is not None and [r.service for r in only_orders.routes] == ["orders"]
    assert session_to_proto(session, {"payments"}) is None


def test_an_invalid_session_on_the_wire_is_refused_with_its_fields() -> None:
    msg = config_pb2.Session(id="bad", key="k")
    msg.routes.add(service="users", destination="nohost", mode="sideways", match_json='{"header": {}}')
    with pytest.raises(ValidationError) as info:
        session_from_proto(msg)
    text = str(info.value)
    assert "destination" in text and "mode" in text and "match" in text
