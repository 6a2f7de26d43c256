"""JWTs from OIDC issuers: signing keys (JWKS) from a file or a URL, and verification with PyJWT.

One ``Issuer`` per configured ``iss``: its accepted audiences, its keys, and how its claims
become an identity. Verification is PyJWT's: the signature with the key whose ``kid`` the
token names (PyJWK binds each key to one algorithm, so a token cannot pick a weaker one),
``iss``, ``aud``, ``exp`` and ``nbf`` with a small leeway; ``alg: none`` and symmetric keys
are refused before any of it.

Keys are cached. A JWKS URL is fetched at start, every ``jwks_refresh_s``, and when a token
names a key id the cache lacks (an issuer rotating keys), but never more often than
``jwks_min_refresh_s``: unknown key ids cannot make the control plane hammer the issuer. A
fetch is bounded in time and size, and a failed fetch keeps the keys it had. A JWKS file is
re-read when its modification time changes and on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from controlplane.errors import Unauthorized
from controlplane.identity import Identity, name_problem

log = logging.getLogger("turnout.controlplane.auth")

# Asymmetric algorithms only: a JWKS publishes public keys, and HS* would make the
# "public" key a shared secret.
DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# A JWKS document is a few KiB (Kubernetes: one or two keys; Google: three).
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
# An issuer that does not answer in this long is down; the keys already held keep working.
JWKS_FETCH_TIMEOUT_S = 5.0
# Groups one token may carry: IdPs cap theirs (Entra ID sends at most 200 in a token).
MAX_GROUPS = 1000
_LOOPBACK_HOSTS = frozenset({"localhost"})


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted issuer of the ``--auth`` file."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_file: str | None = None
    jwks_url: str | None = None
    # For a JWKS URL behind authentication (the Kubernetes API server's /openid/v1/jwks):
    # the CA bundle that signs its certificate and a file holding a bearer token.
    jwks_ca_file: str | None = None
    jwks_token_file: str | None = None
    # Istio re-fetches JWKS every 20 min; 5 min picks up a rotated key sooner without load.
    jwks_refresh_s: float = 300.0
    jwks_min_refresh_s: float = 30.0
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    identity_claim: str = "sub"
    identity_prefix: str = ""
    groups_claim: str | None = None
    groups_prefix: str = ""
    groups: tuple[str, ...] = ()
    node_id_claim: str | None = None
    # Clock skew between the issuer and this host (Kubernetes' own OIDC check allows none;
    # 30 s absorbs a drifting NTP client without making expired tokens useful).
    leeway_s: float = 30.0


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by JSON pointer (``/kubernetes.io/pod/name``) for nested ones; None when absent."""
    if not path.startswith("/"):
        return claims.get(path)
    value: Any = claims
    for escaped in path[1:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def check_jwks_url(url: str) -> str | None:
    """Why ``url`` cannot serve keys, or None: https, or http to this host only."""
    try:
        parts = urlsplit(url)
        host = parts.hostname  # parsed on first use: "https://[::1" fails here
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and host:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                return None
        if host in _LOOPBACK_HOSTS:
            return None
    return "must be an https:// URL (plain http only to this host): keys fetched in the clear could be replaced"


def parse_jwks(data: bytes, where: str) -> dict[str, jwt.PyJWK]:
    """Signing keys of a JWKS document by key id (``""`` for a lone key without one); raises ``ValueError``."""
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"{where}: larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f"{where}: not a JWKS document (no 'keys' list)")
    if len(keys) > MAX_JWKS_KEYS:
        raise ValueError(f"{where}: more than {MAX_JWKS_KEYS} keys")
    out: dict[str, jwt.PyJWK] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or key.get("use", "sig") != "sig" or key.get("kty") == "oct":
            continue  # encryption keys and shared secrets never verify a token
        try:
            parsed = jwt.PyJWK(key)
        except jwt.PyJWTError as exc:
            log.warning("%s: key %d (%s) skipped: %s", where, i, key.get("kid", "no kid"), exc)
            continue
        kid = key.get("kid", "")
        out[kid if isinstance(kid, str) else str(kid)] = parsed
    if not out:
        raise ValueError(f"{where}: no usable signing key")
    return out


def _fetch(url: str, ca_file: str | None, token_file: str | None) -> bytes:
    headers = {"accept": "application/jwk-set+json, application/json"}
    if token_file is not None:
        headers["authorization"] = "Bearer " + Path(token_file).read_text(encoding="utf-8").strip()
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=JWKS_FETCH_TIMEOUT_S, context=context) as response:
        data: bytes = response.read(MAX_JWKS_BYTES + 1)
    return data


class Issuer:
    """Keys and claim mapping of one issuer; ``verify`` turns its tokens into identities."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self._keys: dict[str, jwt.PyJWK] = {}
        self._file_mtime: float | None = None
        self._last_fetch = -float("inf")
        self._lock = asyncio.Lock()
        self.last_error = ""

    @property
    def source(self) -> str:
        """Where the keys come from, for messages."""
        return self.config.jwks_file or self.config.jwks_url or "-"

    def load_file(self) -> None:
        """(Re-)read the JWKS file now; raises ``ValueError`` or ``OSError`` (the keys held stay)."""
        path = self.config.jwks_file
        assert path is not None
        mtime = os.stat(path).st_mtime
        self._keys = parse_jwks(Path(path).read_bytes(), f"jwks_file {path}")
        self._file_mtime = mtime
        self.last_error = ""

    async def refresh(self, force: bool = False) -> None:
        """Fetch the JWKS URL (or re-read a changed file) unless it was done within ``jwks_min_refresh_s``."""
        config = self.config
        if config.jwks_file is not None:
            with contextlib.suppress(OSError):
                if os.stat(config.jwks_file).st_mtime == self._file_mtime:
                    return
            try:
                self.load_file()
            except (OSError, ValueError) as exc:
                self.last_error = str(exc)
                log.error("issuer %s: keeping the keys held: %s", config.issuer, exc)
            return
        assert config.jwks_url is not None
        async with self._lock:  # concurrent unknown key ids wait for one fetch
            if not force and time.monotonic() - self._last_fetch < config.jwks_min_refresh_s:
                return
            self._last_fetch = time.monotonic()
            try:
                data = await asyncio.to_thread(_fetch, config.jwks_url, config.jwks_ca_file, config.jwks_token_file)
                self._keys = parse_jwks(data, f"jwks_url {config.jwks_url}")
                self.last_error = ""
            except (OSError, ValueError) as exc:
                self.last_error = f"cannot fetch {config.jwks_url}: {exc}"
                log.error("issuer %s: %s; keeping the %d key(s) held", config.issuer, self.last_error,
                          len(self._keys))

    async def run(self) -> None:
        """Refresh a JWKS URL every ``jwks_refresh_s`` until cancelled (the first fetch is at start)."""
        while True:
            await asyncio.sleep(self.config.jwks_refresh_s)
            await self.refresh(force=True)

    def holds(self, kid: str | None) -> bool:
        """Whether a token naming ``kid`` (None: none) would be checked with a key this issuer holds."""
        return self._key(kid) is not None

    def _key(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # A token without a key id is only unambiguous when the issuer has one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def verify(self, token: str, header: Mapping[str, Any]) -> Identity:
        """The identity of a token this issuer signed; raises ``Unauthorized`` saying what is wrong."""
        config = self.config
        kid = header.get("kid")
        key = self._key(kid)
        if key is None:
            await self.refresh()
            key = self._key(kid)
        if key is None:
            held = ", ".join(sorted(k or "(no kid)" for k in self._keys)) or "none"
            reason = f"unknown key id {kid!r}" if kid is not None else "no key id (kid) and the issuer has several keys"
            raise _refused(f"{reason} for issuer {config.issuer} (keys held: {held}"
                           + (f"; last fetch failed: {self.last_error}" if self.last_error else "") + ")")
        alg = header.get("alg")
        if alg not in config.algorithms:
            raise _refused(f"algorithm {alg!r} is not accepted for issuer {config.issuer} (accepted: "
                           f"{', '.join(config.algorithms)})")
        try:
            claims = jwt.decode(token, key, algorithms=[str(alg)], audience=list(config.audiences),
                                issuer=config.issuer, leeway=config.leeway_s,
                                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True})
        except jwt.ExpiredSignatureError:
            raise _refused("the token has expired; get a new one") from None
        except jwt.ImmatureSignatureError:
            raise _refused("the token is not valid yet (nbf or iat in the future); check the clocks") from None
        except jwt.InvalidAudienceError:
            raise _refused(f"the token's audience is not accepted; this control plane accepts "
                           f"{', '.join(config.audiences)} (Kubernetes: a projected token with that "
                           "audience)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _refused(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise _refused(f"the token's issuer is not trusted here: its key {kid!r} belongs to "
                           f"{config.issuer}") from None
        except jwt.InvalidSignatureError:
            raise _refused(f"the token's signature does not verify with key {kid!r} of {config.issuer}") from None
        except jwt.PyJWTError as exc:
            raise _refused(f"invalid token: {exc}") from None
        return self._identity(claims)

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        config = self.config
        subject = claim(claims, config.identity_claim)
        problem = name_problem(subject, f"claim {config.identity_claim!r}")
        if problem is not None:
            raise _refused(f"the token's identity claim is not usable: {problem}")
        name = config.identity_prefix + str(subject)
        if name_problem(name) is not None:
            raise _refused(f"the identity {name[:80]!r}… is longer than this control plane accepts")
        groups = set(config.groups)
        if config.groups_claim is not None:
            raw = claim(claims, config.groups_claim)
            values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
            if len(values) > MAX_GROUPS:
                raise _refused(f"the token carries more than {MAX_GROUPS} groups")
            groups.update(config.groups_prefix + g for g in values
                          if isinstance(g, str) and name_problem(g, "a group") is None)
        node_ids = None
        if config.node_id_claim is not None:
            node = claim(claims, config.node_id_claim)
            # The proxy's default node id is <hostname>:<port>, and in a pod the host name is
            # the pod name: both forms are this proxy's.
            node_ids = (_literal(node), _literal(node) + ":*") if isinstance(node, str) and node else ()
        return Identity(name, frozenset(groups), f"JWT from {config.issuer}", node_ids)


def _literal(text: str) -> str:
    """``text`` as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _refused(message: str) -> Unauthorized:
    return Unauthorized(message, invalid_token=True)
