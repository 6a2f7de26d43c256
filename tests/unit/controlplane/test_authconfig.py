"""Unit tests for the --auth file, the tokens file and the limits: every problem named by its field;
the Kubernetes manifest's auth file parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.authconfig import load_auth_config, parse_auth_config
from controlplane.identity import Roles
from controlplane.limits import Limits, RateLimiter
from controlplane.tokens import load_tokens, parse_tokens, token_digest
from filters import ValidationError

ROOT = Path(__file__).resolve().parents[3]
DIGEST = token_digest("t")


def test_defaults(tmp_path: Path) -> None:
    config = parse_auth_config({}, tmp_path)
    assert config.roles == Roles() and config.issuers == () and config.tokens_file is None
    assert config.limits == Limits()


def test_the_kubernetes_manifests_auth_file_parses() -> None:
    manifest = yaml.safe_load((ROOT / "deploy/kubernetes/base/control-plane/auth.yaml").read_text())
    config = parse_auth_config(yaml.safe_load(manifest["data"]["auth.yaml"]), Path("/etc/turnout-auth"))
    (issuer,) = config.issuers
    assert issuer.jwks_url == "https://kubernetes.default.svc/openid/v1/jwks"
    assert issuer.node_id_claim == "/kubernetes.io/pod/name"
    assert config.members["proxies"] == ("system:serviceaccount:turnout:turnout-node",)


def test_relative_paths_are_taken_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text("tokens_file: tokens.yaml\nissuers: [{issuer: https://i, audiences: t, jwks_file: k.json}]\n")
    config = load_auth_config(path)
    assert config.tokens_file == str(tmp_path / "tokens.yaml")
    assert config.issuers[0].jwks_file == str(tmp_path / "k.json") and config.issuers[0].audiences == ("t",)


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"bogus": 1}, "auth.bogus", "unknown field"),
    ({"admin_groups": []}, "auth.admin_groups", "non-empty list"),
    ({"admin_groups": ["x"], "proxy_groups": ["x"]}, "auth.proxy_groups", "both an admin group and a proxy group"),
    ({"issuers": [{"issuer": "https://i", "jwks_file": "k"}]}, "auth.issuers[0].audiences", "audiences accepted"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"]}]}, "auth.issuers[0]", "exactly one of jwks_file"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_url": "http://i.example/jwks"}]},
     "auth.issuers[0].jwks_url", "https://"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k", "algorithms": ["HS256"]}]},
     "auth.issuers[0].algorithms", "RS256"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k", "jwks_refresh_s": 0}]},
     "auth.issuers[0].jwks_refresh_s", "positive"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k", "colour": "red"}]},
     "auth.issuers[0].colour", "unknown field"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k"}] * 2}, "auth.issuers[1].issuer",
     "configured twice"),
    ({"groups": {"ci": "system:serviceaccount:ci:*"}}, "auth.groups.ci", "list of identity names"),
    ({"limits": {"max_json_depth": 0}}, "auth.limits.max_json_depth", "at least 1"),
    ({"limits": {"idle_timeout_s": "30"}}, "auth.limits.idle_timeout_s", "positive number"),
    ({"limits": {"max_nothing": 3}}, "auth.limits.max_nothing", "unknown limit"),
    ({"limits": {"max_unauthenticated_connections": 4, "max_unauthenticated_per_source": 8}},
     "auth.limits.max_unauthenticated_per_source", "must not exceed"),
    # Found by the policy_file fuzz target: each of these raised instead (TypeError, ValueError, OverflowError).
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k", "algorithms": [["RS256"]]}]},
     "auth.issuers[0].algorithms", "RS256"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_url": "https://[::1"}]},
     "auth.issuers[0].jwks_url", "is not a URL"),
    ({"issuers": [{"issuer": "https://i", "audiences": ["t"], "jwks_file": "k", "leeway_s": 10**400}]},
     "auth.issuers[0].leeway_s", "0 or more"),
    ({"limits": {"idle_timeout_s": 10**400}}, "auth.limits.idle_timeout_s", "positive number"),
    ({"limits": {"idle_timeout_s": float("nan")}}, "auth.limits.idle_timeout_s", "positive number"),
])
def test_invalid_auth_names_the_field(tmp_path: Path, data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_auth_config(data, tmp_path)
    assert any(p.field == field and reason in p.reason for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(("entry", "field", "reason"), [
    ({"identity": "alice", "sha256": "t"}, "sha256", "never the token itself"),
    ({"identity": "alice ", "sha256": DIGEST}, "identity", "surrounding whitespace"),
    ({"identity": "", "sha256": DIGEST}, "identity", "non-empty"),
    ({"identity": "a\tb", "sha256": DIGEST}, "identity", "unprintable"),
    ({"identity": "alice", "groups": "devs", "sha256": DIGEST}, "groups", "list of group names"),
    ({"identity": "alice", "sha256": DIGEST, "node_ids": []}, "node_ids", "non-empty list"),
    ({"identity": "alice", "sha256": DIGEST, "token": "t"}, "", "unknown field"),
])
def test_invalid_tokens_name_the_entry(entry: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_tokens({"tokens": [entry]}, "tokens")
    where = "tokens: tokens[0]" + (f".{field}" if field else "")
    assert any(p.field == where and reason in p.reason for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("content", [b"\xff\xfe", b"limits: {idle_timeout_s: 2001-02-30}\n", b"[" * 600])
def test_an_unreadable_auth_or_tokens_file_is_a_validation_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "auth.yaml"
    path.write_bytes(content)
    with pytest.raises(ValidationError, match=r"not UTF-8|invalid YAML|cannot read"):
        load_auth_config(path)
    with pytest.raises(ValidationError, match=r"not UTF-8|invalid YAML|cannot read"):
        load_tokens(path)


def test_tokens_are_kept_by_digest_and_each_is_its_own() -> None:
    tokens = parse_tokens({"tokens": [{"identity": "alice", "groups": ["devs"], "sha256": DIGEST.upper()}]}, "t")
    assert tokens[DIGEST].name == "alice" and tokens[DIGEST].groups == {"devs"}
    with pytest.raises(ValidationError, match="every token must be its own"):
        parse_tokens({"tokens": [{"identity": "a", "sha256": DIGEST}, {"identity": "b", "sha256": DIGEST}]}, "t")
    assert parse_tokens({"tokens": None}, "t") == {}


def test_rate_limiter_refills_and_forgets_full_buckets() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=2, clock=lambda: now[0], max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] += 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.5
    limiter.take("b")
    now[0] += 10
    limiter.take("c")  # three keys: the refilled ones are dropped
    assert len(limiter._buckets) <= 2


def test_auth_and_tokens_files_with_numbers_too_long_to_convert_name_the_field(tmp_path: Path) -> None:
    auth = tmp_path / "auth.yaml"
    auth.write_text("limits:\n  max_connections: " + "9" * 5000 + "\n")
    with pytest.raises(ValidationError) as caught:
        load_auth_config(auth)
    assert [p.field for p in caught.value.problems] == ["limits.max_connections"]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  - identity: x\n    sha256: " + "1" * 5000 + "\n")
    with pytest.raises(ValidationError) as caught:
        load_tokens(tokens)
    assert [p.field for p in caught.value.problems] == ["tokens[0].sha256"]
