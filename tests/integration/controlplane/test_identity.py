"""Who is calling, on a real control plane: OIDC JWTs checked against a JWKS file, service-account JWTs
against a JWKS served over HTTP (with key rotation), tokens-file identities reloaded on SIGHUP, and the
same credentials on the gRPC push port (real grpcio clients).

Keys are made by the tests and tokens signed with PyJWT, as an identity provider would sign them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from tests.integration.controlplane.identities import (
    CLUSTER,
    IDP,
    JwksServer,
    SigningKey,
    claims,
    jwks,
    serving_jwks,
    unsigned,
)
from tests.integration.controlplane.test_security import first_reply_code, open_stream
from tests.integration.cp_support import (
    ROUTE,
    ControlPlane,
    eventually,
    running_control_plane,
    write_auth,
    write_tokens,
)

NODE_SA = "system:serviceaccount:turnout:turnout-node"
CI_SA = "system:serviceaccount:ci:pipeline-7"
ALICE_TOKEN = "alice-opaque-token-0001"
PROXY_TOKEN = "node-a-opaque-token-0002"


@dataclass
class Setup:
    cp: ControlPlane
    idp: SigningKey
    idp_ec: SigningKey
    cluster: SigningKey
    jwks_server: JwksServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("identity")
    idp, idp_ec, cluster = SigningKey.rsa("idp-1"), SigningKey.ec("idp-2"), SigningKey.rsa("sa-1")
    (tmp / "idp-jwks.json").write_text(json.dumps(jwks(idp, idp_ec)))
    write_tokens(tmp, {ALICE_TOKEN: {"identity": "alice", "groups": ["developers"]},
                       PROXY_TOKEN: {"identity": "node-a", "groups": ["proxies"], "node_ids": ["node-a"]}})
    with serving_jwks(jwks(cluster)) as server:
        auth = write_auth(tmp, {
            "admin_groups": ["platform"],
            "tokens_file": "tokens.yaml",
            "issuers": [
                {"issuer": IDP, "audiences": ["turnout"], "jwks_file": "idp-jwks.json",
                 "identity_claim": "email", "groups_claim": "groups", "groups_prefix": "idp:"},
                {"issuer": CLUSTER, "audiences": ["turnout-control-plane"], "jwks_url": server.url,
                 "jwks_min_refresh_s": 1, "node_id_claim": "/kubernetes.io/pod/name"},
            ],
            "groups": {"proxies": [NODE_SA], "ci": ["system:serviceaccount:ci:*"], "platform": ["root@example.com"]},
        })
        with running_control_plane(tmp, "--auth", str(auth), token=None) as cp:
            yield Setup(cp, idp, idp_ec, cluster, server)


def whoami(cp: ControlPlane, token: str) -> tuple[int, Any]:
    return cp.request("GET", "/v1/whoami", token=token)


def person(key: SigningKey, email: str = "alice@example.com") -> dict[str, Any]:
    return claims(IDP, "00u1abc", email=email, groups=["developers", "oncall"])


def service_account(name: str = NODE_SA, pod: str = "turnout-node-x7k2p") -> dict[str, Any]:
    """A projected service-account token's claims, as the Kubernetes API server issues them."""
    bound = {"namespace": "turnout", "pod": {"name": pod, "uid": "u-1"},
             "serviceaccount": {"name": name.rsplit(":", 1)[1], "uid": "u-2"}}
    return {**claims(CLUSTER, name, audience=["turnout-control-plane"]), "kubernetes.io": bound}


def test_oidc_tokens_signed_by_a_jwks_file_key(setup: Setup) -> None:
    for key in (setup.idp, setup.idp_ec):
        status, body = whoami(setup.cp, key.sign(person(key)))
        assert status == 200, body
        assert body["identity"] == "alice@example.com" and body["via"] == f"JWT from {IDP}"
        assert body["groups"] == ["idp:developers", "idp:oncall"] and not body["admin"]
    status, body = whoami(setup.cp, setup.idp.sign(person(setup.idp, email="root@example.com")))
    assert status == 200 and body["admin"], "a member of an admin group through the auth file's groups"
    status, body = setup.cp.request("POST", "/v1/sessions", {"key": "oidc", "routes": [ROUTE]},
                                    token=setup.idp.sign(person(setup.idp)))
    assert status == 201 and body["session"]["owner"] == "alice@example.com"


def _refusals(setup: Setup) -> list[tuple[str, str, str]]:
    idp, other = setup.idp, SigningKey.rsa("idp-1")  # same kid, not the issuer's key
    now = int(time.time())
    return [
        ("alg none", unsigned(person(idp), "idp-1"), "alg none"),
        ("wrong signature", other.sign(person(idp)), "signature does not verify"),
        ("wrong issuer", idp.sign({**person(idp), "iss": "https://evil.example.com"}), "not trusted here"),
        ("wrong audience", idp.sign({**person(idp), "aud": "someone-else"}), "audience is not accepted"),
        ("expired", idp.sign({**person(idp), "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
         "has expired"),
        ("not yet valid", idp.sign({**person(idp), "nbf": now + 3600}), "not valid yet"),
        ("unknown kid", idp.sign(person(idp), kid="idp-9"), "unknown key id 'idp-9'"),
        ("no exp", idp.sign({k: v for k, v in person(idp).items() if k != "exp"}), "no 'exp' claim"),
        ("hs256 with the public key", _hs256_confusion(idp), "not accepted"),
        ("tampered payload", _tampered(idp.sign(person(idp))), "signature does not verify"),
        ("opaque unknown token", "not-a-known-token", "unknown token"),
    ]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _hs256_confusion(key: SigningKey) -> str:
    # The classic confusion: HMAC "signed" with the public key's bytes, hoping they are used as the secret.
    public = key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64(json.dumps({"alg": "HS256", "kid": key.kid}).encode())
    payload = _b64(json.dumps(person(key)).encode())
    signature = _b64(hmac.new(public, header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["email"] = "root@example.com"
    forged = _b64(json.dumps(data).encode()).decode()
    return f"{header}.{forged}.{signature}"


def test_bad_tokens_are_refused_saying_why(setup: Setup) -> None:
    for name, token, reason in _refusals(setup):
        with setup.cp.client(token=token) as http:
            response = http.get("/v1/sessions")
        assert response.status_code == 401, name
        assert reason in response.json()["message"], (name, response.json())
        assert 'error="invalid_token"' in response.headers["www-authenticate"], name


def test_the_push_port_refuses_bad_tokens_too(setup: Setup) -> None:
    for name, token, reason in _refusals(setup)[:4]:
        with open_stream(setup.cp.grpc_target, token) as call:
            assert first_reply_code(call) is grpc.StatusCode.UNAUTHENTICATED, name
            assert reason in call.details(), (name, call.details())


def test_service_account_tokens_from_a_jwks_url_and_a_rotated_key(setup: Setup) -> None:
    status, body = whoami(setup.cp, setup.cluster.sign(service_account(CI_SA)))
    assert status == 200 and body["identity"] == CI_SA and body["groups"] == ["ci"]
    time.sleep(1.1)  # past jwks_min_refresh_s since the last fetch
    rotated = SigningKey.ec("sa-2")
    fetches = setup.jwks_server.fetches
    setup.jwks_server.document = jwks(setup.cluster, rotated)
    status, body = whoami(setup.cp, rotated.sign(service_account(CI_SA)))
    assert status == 200 and body["identity"] == CI_SA, "an unknown kid fetches the JWKS again"
    assert setup.jwks_server.fetches == fetches + 1
    started = time.monotonic()
    with setup.cp.client() as http:  # one connection: as fast as the control plane answers
        for i in range(20):
            response = http.get("/v1/whoami", headers={
                "authorization": "Bearer " + rotated.sign(service_account(CI_SA), kid=f"made-up-{i}")})
            assert response.status_code == 401 and "unknown key id" in response.json()["message"]
    # jwks_min_refresh_s is 1: at most one fetch per second, whatever the tokens say.
    allowed = 1 + int(time.monotonic() - started)
    assert setup.jwks_server.fetches - (fetches + 1) <= allowed, "unknown key ids cannot make it hammer the issuer"


def test_a_service_account_proxy_may_stream_only_as_its_pod(setup: Setup) -> None:
    token = setup.cluster.sign(service_account(NODE_SA, pod="turnout-node-x7k2p"))
    for node_id in ("turnout-node-x7k2p", "turnout-node-x7k2p:15001"):
        with open_stream(setup.cp.grpc_target, token, node_id=node_id) as call:
            assert first_reply_code(call) is None, node_id
    with open_stream(setup.cp.grpc_target, token, node_id="turnout-node-other") as call:
        assert first_reply_code(call) is grpc.StatusCode.PERMISSION_DENIED
        assert "may stream as node ids" in call.details()
    developer = setup.idp.sign(person(setup.idp))
    with open_stream(setup.cp.grpc_target, developer, node_id="laptop") as call:
        assert first_reply_code(call) is grpc.StatusCode.PERMISSION_DENIED
        assert "no proxy group" in call.details()


def test_tokens_file_identities_are_reloaded_on_sighup(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path, {ALICE_TOKEN: {"identity": "alice", "groups": ["developers"]}})
    auth = write_auth(tmp_path, {"tokens_file": str(tokens)})
    with running_control_plane(tmp_path, "--auth", str(auth), token=None) as cp:
        status, body = whoami(cp, ALICE_TOKEN)
        assert status == 200 and (body["identity"], body["groups"], body["via"], body["admin"]) == (
            "alice", ["developers"], "tokens file", False)
        assert whoami(cp, "bob-new-token")[0] == 401
        write_tokens(tmp_path, {"bob-new-token": {"identity": "bob", "groups": ["admins"]}})
        cp.process.send_signal(signal.SIGHUP)
        eventually(lambda: whoami(cp, "bob-new-token")[0] == 200)
        assert whoami(cp, "bob-new-token")[1]["admin"]
        assert whoami(cp, ALICE_TOKEN)[0] == 401, "a token taken out of the file stops working"
        tokens.write_text("tokens: [{identity: ' eve', sha256: nothex}]\n")
        cp.process.send_signal(signal.SIGHUP)
        eventually(lambda: "credentials not reloaded" in cp.log())
        assert whoami(cp, "bob-new-token")[0] == 200, "an invalid file is refused and the old one kept"
        assert "tokens[0].sha256" in cp.log() and "tokens[0].identity" in cp.log()
