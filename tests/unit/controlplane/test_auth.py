"""Unit tests for controlplane.auth: token files, bearer parsing, which token works where."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.auth import Credentials, bearer_token, read_token, token_matches
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


def test_token_matches() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc") and not token_matches("ab", "abc") and not token_matches(None, "abc")


def test_credentials(tmp_path: Path) -> None:
    api = write(tmp_path, "api", "api-token")
    proxy = write(tmp_path, "proxy", "proxy-token")
    assert Credentials.load(api, None, False) == Credentials("api-token", "api-token"), "one token serves both"
    assert Credentials.load(api, proxy, False) == Credentials("api-token", "proxy-token")
    assert Credentials.load(None, None, True) == Credentials(None, None)
    with pytest.raises(StartupError, match="--token-file is required"):
        Credentials.load(None, proxy, False)
    with pytest.raises(StartupError, match="same token"):
        Credentials.load(api, write(tmp_path, "same", "api-token\n"), False)
