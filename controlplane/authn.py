"""Authentication: an ``Authorization: Bearer`` value in, an ``Identity`` out, for the API and the push stream.

A bearer token is looked up first among the opaque tokens (the tokens file, and the
bootstrap tokens of ``--token-file``, ``--proxy-token-file`` or the generated admin token),
by SHA-256; a token shaped like a JWT (three dot-separated parts) is then verified against
the issuer its ``iss`` names. Either way the identity's groups are completed from the
``groups`` section of the ``--auth`` file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
from collections.abc import Mapping
from typing import Any

import jwt

from controlplane.auth import bearer_token
from controlplane.authconfig import AuthConfig
from controlplane.errors import StartupError, Unauthorized
from controlplane.identity import Identity, Roles
from controlplane.jwks import Issuer
from controlplane.tokens import load_tokens, token_digest
from filters import ValidationError


class Authenticator:
    """Verifies credentials; ``reload`` re-reads the tokens file and JWKS files (SIGHUP).

    ``bootstrap`` maps token digests to identities that exist whatever the files say.
    """

    def __init__(self, config: AuthConfig, bootstrap: Mapping[str, Identity] | None = None) -> None:
        self.config = config
        self.roles: Roles = config.roles
        self._bootstrap = dict(bootstrap or {})
        self._tokens = self._load_tokens()
        self._issuers = {c.issuer: Issuer(c) for c in config.issuers}
        for issuer in self._issuers.values():
            if issuer.config.jwks_file is not None:
                try:
                    issuer.load_file()
                except (OSError, ValueError) as exc:
                    raise StartupError(f"issuer {issuer.config.issuer}: cannot load its keys: {exc}") from None
        self._refreshers: list[asyncio.Task[None]] = []

    def _load_tokens(self) -> dict[str, Identity]:
        path = self.config.tokens_file
        if path is None:
            return {}
        try:
            tokens = load_tokens(path)
        except ValidationError as exc:
            raise StartupError("invalid tokens file:\n  " + "\n  ".join(map(str, exc.problems))) from None
        shared = set(tokens) & set(self._bootstrap)
        if shared:
            raise StartupError(f"tokens file {path}: holds the token given by --token-file or --proxy-token-file; "
                               "give each credential its own token")
        return tokens

    async def start(self) -> None:
        """Fetch every JWKS URL now and keep refreshing them in the background."""
        remote = [issuer for issuer in self._issuers.values() if issuer.config.jwks_url is not None]
        # Serve with keys from the start; an issuer that does not answer (each fetch is
        # bounded) is retried on its first token and on schedule.
        await asyncio.gather(*(issuer.refresh(force=True) for issuer in remote))
        loop = asyncio.get_running_loop()
        self._refreshers.extend(loop.create_task(issuer.run()) for issuer in remote)

    async def close(self) -> None:
        """Stop the background refreshes."""
        for task in self._refreshers:
            task.cancel()
        for task in self._refreshers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._refreshers.clear()

    def reload(self) -> None:
        """Re-read the tokens file and the JWKS files; raises ``StartupError`` and keeps the old ones on error."""
        tokens = self._load_tokens()
        for issuer in self._issuers.values():
            if issuer.config.jwks_file is not None:
                try:
                    issuer.load_file()
                except (OSError, ValueError) as exc:
                    raise StartupError(f"issuer {issuer.config.issuer}: cannot load its keys: {exc}") from None
        self._tokens = tokens

    @property
    def token_count(self) -> int:
        """Opaque tokens known (tokens file and bootstrap)."""
        return len(self._tokens) + len(self._bootstrap)

    async def authenticate(self, authorization: str | None) -> Identity:
        """The caller of a request with this ``Authorization`` value; raises ``Unauthorized``."""
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (turnout: --token-file, "
                               "or the token in TURNOUT_TOKEN)", invalid_token=False)
        digest = token_digest(token)
        identity = self._bootstrap.get(digest) or self._tokens.get(digest)
        if identity is None:
            if token.count(".") != 2:
                raise Unauthorized("unknown token: no tokens-file entry has its SHA-256", invalid_token=True)
            identity = await self._verify_jwt(token)
        return self._with_members(identity)

    async def _verify_jwt(self, token: str) -> Identity:
        # Unverified reads only pick the issuer and its key; Issuer.verify (PyJWT) checks everything.
        header = _peek_header(token)
        if header is None:
            raise Unauthorized("malformed token: neither a known token nor a JWT", invalid_token=True)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Unauthorized("unsigned token (alg none) refused", invalid_token=True)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("the token's kid is not a string", invalid_token=True)
        # The usual case: one issuer holds the key, so PyJWT parses and verifies the token once
        # (its parsing costs several times the RSA verification itself).
        holders = [issuer for issuer in self._issuers.values() if issuer.holds(kid)]
        if len(holders) == 1:
            return await holders[0].verify(token, header)
        # An unknown key (maybe rotated in) or one several issuers share: the iss claim says whose.
        try:
            claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("malformed token: neither a known token nor a JWT", invalid_token=True) from None
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            known = ", ".join(sorted(self._issuers)) or "none"
            raise Unauthorized(f"the token's issuer {iss!r} is not trusted here (configured issuers: {known})",
                               invalid_token=True)
        return await issuer.verify(token, header)

    def _with_members(self, identity: Identity) -> Identity:
        extra = {group for group, patterns in self.config.members.items()
                 if group not in identity.groups and any(fnmatch.fnmatchcase(identity.name, p) for p in patterns)}
        if not extra:
            return identity
        return Identity(identity.name, identity.groups | extra, identity.via, identity.node_ids)


# A JOSE header names an algorithm and a key; a few hundred bytes. Anything longer is no JWT of ours.
_MAX_HEADER_CHARS = 4096


def _peek_header(token: str) -> dict[str, Any] | None:
    """The JWT header, decoded without any check (PyJWT's get_unverified_header decodes the whole
    token): only to choose the key; None when it is not base64url JSON."""
    segment = token.partition(".")[0]
    if len(segment) > _MAX_HEADER_CHARS:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None
