"""Credentials: bearer tokens for the API and the push stream, and TLS from certificate files.

The API token lets a caller create and delete sessions; the proxy token lets a proxy open
the push stream. Without ``--proxy-token-file`` one token serves both; with it, each
token works only where it belongs, so a token handed to proxies cannot change sessions.
Tokens are compared with ``hmac.compare_digest`` so the time taken says nothing about how
much of a guess was right.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from controlplane.errors import StartupError

# How long a refused stream waits for the caller's first message (see _deny); a client that
# sends nothing is refused after this anyway.
_DENY_READ_TIMEOUT_S = 2.0
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


def token_matches(presented: str | None, expected: str) -> bool:
    """Whether ``presented`` is ``expected``, in time independent of where they differ."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


@dataclass(frozen=True)
class Credentials:
    """The tokens in force; None means that side is open (``--allow-unauthenticated``)."""

    api_token: str | None
    proxy_token: str | None

    @classmethod
    def load(cls, token_file: str | None, proxy_token_file: str | None, allow_unauthenticated: bool) -> Credentials:
        """Read the token files; refuse to run open unless ``allow_unauthenticated``."""
        if token_file is None and not allow_unauthenticated:
            raise StartupError("--token-file is required: without it anyone who can reach the control plane could "
                               "change routing (--allow-unauthenticated runs it open, for local experiments only)")
        api_token = read_token(token_file, "--token-file") if token_file is not None else None
        proxy_token = read_token(proxy_token_file, "--proxy-token-file") if proxy_token_file is not None else api_token
        if proxy_token_file is not None and api_token is not None and token_matches(proxy_token, api_token):
            raise StartupError("--proxy-token-file holds the same token as --token-file; give proxies their own")
        return cls(api_token, proxy_token)


def _deny(message: str, request_streaming: bool) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        if request_streaming:
            # Take the caller's first message before answering: a grpc.aio client whose write is
            # still in flight when the status lands reports INTERNAL instead of the status
            # (grpc/grpc#36066), and a proxy must be told its credentials are wrong. The message
            # is discarded unread.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.read(), _DENY_READ_TIMEOUT_S)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every RPC without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    A refused call never reaches the servicer: it gets a handler of the same shape that
    only aborts, so a proxy without credentials receives nothing.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass the call on when its token is right, else answer UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        if self._token is None or handler is None:
            return handler
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value
                break
        presented = bearer_token(authorization if isinstance(authorization, str) else None)
        if token_matches(presented, self._token):
            return handler
        deny = _deny("missing bearer token: send 'authorization: Bearer <proxy token>' metadata" if presented is None
                     else "wrong bearer token", handler.request_streaming)
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def api_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context for the HTTP API (TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"--tls-cert {cert_file} / --tls-key {key_file}: cannot load: {exc}") from None
    return context


def grpc_server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials for the gRPC push server from the same files."""
    try:
        cert = Path(cert_file).read_bytes()
        key = Path(key_file).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the TLS certificate or key: {exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])
