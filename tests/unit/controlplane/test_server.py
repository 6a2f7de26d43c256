"""Unit tests for the control plane's start: credentials and the auth file are checked before anything
listens (the subprocess path, exit status 2 and the message, is in tests/integration/controlplane)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.errors import StartupError
from controlplane.server import ControlPlane, ServerOptions

ISSUER = "https://idp.example.com"


def options(tmp_path: Path, auth: dict[str, Any] | None = None, **extra: Any) -> ServerOptions:
    path = None
    if auth is not None:
        path = tmp_path / "auth.yaml"
        path.write_text(yaml.safe_dump(auth))
    return ServerOptions(api="127.0.0.1:0", grpc="127.0.0.1:0", db=str(tmp_path / "s.db"),
                         auth=None if path is None else str(path), **extra)


def token_file(tmp_path: Path, name: str, token: str) -> str:
    path = tmp_path / name
    path.write_text(token + "\n")
    return str(path)


@pytest.mark.parametrize(("auth", "message"), [
    ({"issuers": [{"issuer": ISSUER, "audiences": ["t"], "jwks_url": "http://idp.example.com/jwks"}]},
     "must be an https:// URL"),
    ({"tokens_file": "missing.yaml"}, "cannot read the tokens file"),
    ({"issuers": [{"issuer": ISSUER, "audiences": ["t"], "jwks_file": "missing.json"}]}, "cannot load its keys"),
    ({"bogus": True}, "auth.bogus: unknown field"),
])
def test_a_bad_auth_file_stops_the_start(tmp_path: Path, auth: dict[str, Any], message: str) -> None:
    with pytest.raises(StartupError) as info:
        ControlPlane(options(tmp_path, auth))
    assert message in str(info.value)


def test_bootstrap_tokens_must_be_distinct(tmp_path: Path) -> None:
    same = token_file(tmp_path, "a", "same-token")
    with pytest.raises(StartupError, match="--proxy-token-file holds the same token"):
        ControlPlane(options(tmp_path, token_file=same, proxy_token_file=token_file(tmp_path, "b", "same-token")))
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"identity": "x", "sha256": hashlib.sha256(b"same-token").hexdigest()}]}))
    with pytest.raises(StartupError, match="holds the token given by --token-file"):
        ControlPlane(options(tmp_path, {"tokens_file": "tokens.yaml"}, token_file=same))


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="the file is empty"):
        ControlPlane(options(tmp_path, token_file=token_file(tmp_path, "t", "")))
