"""Credential plumbing: bearer tokens from files and headers, the generated local admin token,
and TLS from certificate files. Who a token belongs to is ``controlplane.authn``'s business.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

from controlplane.errors import StartupError

# RFC 6750 b64token: what can follow "Bearer " in a header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def read_token(path: str, flag: str) -> str:
    """The token in the file at ``path`` with surrounding whitespace removed; ``flag`` names its option."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"{flag} {path}: cannot read the token: {exc}") from None
    if not token:
        raise StartupError(f"{flag} {path}: the file is empty; put a random token in it, e.g. "
                           "`openssl rand -hex 32 > FILE`")
    if not _TOKEN_RE.fullmatch(token):
        raise StartupError(f"{flag} {path}: a token is one word of letters, digits and -._~+/ (it travels in an "
                           "'Authorization: Bearer' header)")
    return token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110 section 11.1).
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def local_token_path(port: int) -> Path:
    """Where a control plane started without ``--auth`` writes its generated admin token, and
    where the ``turnout`` CLI on the same machine looks for it (by the API's port)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "turnout" / f"control-plane-{port}.token"


def write_local_token(path: Path, token: str) -> None:
    """Write a generated token readable by this user only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file may have had other permissions
        f.write(token + "\n")


def api_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context for the HTTP API (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"--tls-cert {cert_file} / --tls-key {key_file}: cannot load: {exc}") from None
    return context
