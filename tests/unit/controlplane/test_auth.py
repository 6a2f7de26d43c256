"""Unit tests for controlplane.auth: token files, bearer parsing, the generated local token's file."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.auth import bearer_token, local_token_path, read_token, write_local_token
from controlplane.errors import StartupError


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_token_strips_whitespace(tmp_path: Path) -> None:
    assert read_token(write(tmp_path, "t", "  s3cr3t-token\n\n"), "--token-file") == "s3cr3t-token"


@pytest.mark.parametrize(("text", "reason"), [("", "empty"), (" \n\t", "empty"), ("two words", "one word"),
                                              ("tök", "one word")])
def test_read_token_refuses(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(StartupError, match=reason) as info:
        read_token(write(tmp_path, "t", text), "--token-file")
    assert "--token-file" in str(info.value)


def test_read_token_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="cannot read"):
        read_token(str(tmp_path / "missing"), "--proxy-token-file")


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Basic abc", None), ("Bearer", None),
    ("Bearer ", None), ("abc", None), (None, None),
])
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_local_token_file_is_private_and_found_by_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = local_token_path(18080)
    assert path == tmp_path / "state" / "turnout" / "control-plane-18080.token"
    path.parent.mkdir(parents=True)
    path.write_text("old")
    path.chmod(0o644)
    write_local_token(path, "generated-token")
    assert read_token(str(path), "the generated admin token") == "generated-token"
    assert path.stat().st_mode & 0o777 == 0o600, "an older, readable file is made private"
    assert local_token_path(18081) != path
