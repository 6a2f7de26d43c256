"""The bootstrap file as bytes on disk: whatever it holds, ``load_config`` gives a config or a
``ConfigError`` naming the problem (inputs the config_loader fuzz target found or checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.config import load_config, parse_config_text
from dataplane.rules import ConfigError

NOW = 1_800_000_000.0
LISTENER = "listeners: [{name: in, address: '127.0.0.1:15001', service: users, baseline: '127.0.0.1:8080'}]\n"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "f.yaml", now=NOW)
    return {p.field: p.reason for p in info.value.problems}


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "turnout.yaml"
    path.write_bytes(b"\xff\xfe" + LISTENER.encode("utf-16-le"))
    with pytest.raises(ConfigError) as info:
        load_config(path, now=NOW)
    assert info.value.problems[0].field == str(path) and "not UTF-8" in info.value.problems[0].reason


@pytest.mark.parametrize("text", [
    "expires: 2001-02-30\n",  # PyYAML's timestamp constructor: ValueError
    "when: !!timestamp nonsense\n",  # AttributeError inside PyYAML
    "n: !!int x\n",
    "[" * 600 + "]" * 600 + "\n",  # RecursionError in PyYAML's composer (~2 frames a level)
])
def test_yaml_the_loader_cannot_construct_is_a_config_error(text: str) -> None:
    assert problems(text)["f.yaml"].startswith("invalid YAML")


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1.0e+400", "0", "-1", "'10'", "true"])
def test_a_timeout_must_be_a_positive_finite_number(value: str) -> None:
    assert problems(LISTENER + f"limits: {{header_read_timeout_s: {value}}}\n") == {
        "limits.header_read_timeout_s": "must be a positive number of seconds"}


def test_a_timeout_too_long_to_convert_is_named() -> None:
    text = LISTENER + "limits: {header_read_timeout_s: 1" + "0" * 400 + "}\n"
    assert "limits.header_read_timeout_s" in problems(text)


def test_timeouts_and_sizes_that_are_fine() -> None:
    config = parse_config_text(LISTENER + "limits: {header_read_timeout_s: 2.5, max_head_bytes: 1000}\n", now=NOW)
    assert config.limits.header_read_timeout_s == 2.5 and config.limits.max_head_bytes == 1000


@pytest.mark.parametrize(("session", "field"), [
    ("expires_at: 1" + "0" * 400, "sessions[0].expires_at"),  # float() of it: OverflowError
    ("ttl_s: 1" + "0" * 400, "sessions[0].ttl_s"),
    ("created_at: 1" + "0" * 400, "sessions[0].created_at"),
])
def test_session_times_too_large_for_a_float_are_named(session: str, field: str) -> None:
    text = LISTENER + "sessions: [{id: s, key: k, routes: [{service: users, destination: '10.0.0.1:80'}], " \
        + session + "}]\n"
    assert field in problems(text)
