"""Real credentials for the control plane's tests: RSA and EC keys made here, JWTs signed with them
(PyJWT, as an identity provider would), JWKS documents, and a JWKS served over a real local HTTP server."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

IDP = "https://idp.example.com"
CLUSTER = "https://kubernetes.default.svc.cluster.local"


@dataclass
class SigningKey:
    """A private key, its key id and algorithm, and its public JWK."""

    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.alg.startswith("RS") else jwt.algorithms.ECAlgorithm
        key: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**key, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, claims: dict[str, Any], kid: str | None = "same", **headers: Any) -> str:
        """A JWT with ``claims``, signed by this key, naming ``kid`` (default: this key's)."""
        extra = dict(headers)
        if kid is not None:
            extra["kid"] = self.kid if kid == "same" else kid
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=extra)


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """A JWKS document publishing these keys."""
    return {"keys": [k.jwk() for k in keys]}


def claims(issuer: str, subject: str, audience: str | list[str] = "turnout", ttl_s: float = 600,
           **extra: Any) -> dict[str, Any]:
    """Claims as an issuer sets them: iss, sub, aud, iat, nbf, exp."""
    now = int(time.time())
    return {"iss": issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now, "exp": now + int(ttl_s),
            **extra}


def unsigned(payload: dict[str, Any], kid: str) -> str:
    """A token with ``alg: none`` and no signature, as an attacker would forge it."""
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{part(payload)}."


class JwksServer:
    """A JWKS document served over HTTP on 127.0.0.1 (it can be replaced: key rotation); counts fetches."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/openid/v1/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextmanager
def serving_jwks(document: dict[str, Any]) -> Iterator[JwksServer]:
    """A JWKS server for a ``with`` block, stopped even when the test fails."""
    server = JwksServer(document)
    try:
        yield server
    finally:
        server.stop()
