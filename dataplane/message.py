"""The protocol-neutral request and response the router works on.

Both servers produce a ``Request`` (the HTTP/1.1 one from ``http1.semantics.plan_request``,
the HTTP/2 one from a validated HEADERS frame) and both clients produce a ``Response``
(the HTTP/1.1 one from ``http1.semantics.plan_response``, the HTTP/2 one from a response
HEADERS frame). Field names are lower case, hop-by-hop fields are already gone, and every
value has been checked for CR, LF and NUL, so the other protocol can carry them as they are.
"""

from __future__ import annotations

from typing import Final

Fields = list[tuple[bytes, bytes]]
NO_FIELDS: Final[Fields] = []  # shared and never changed: passed only to be read

# How a request's body is framed: none, a known length, or streamed to its end (HTTP/1.1
# chunked, HTTP/2 DATA without content-length). Responses from an HTTP/1.1 upstream may
# also end when the connection does.
BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2  # streamed: chunked on HTTP/1.1, DATA frames on HTTP/2
BODY_UNTIL_CLOSE: Final = 3


class Request:
    """One request, as the router sees it whichever protocol carried it."""

    __slots__ = ("method", "target", "version", "authority", "fields", "body", "content_length", "keep_alive",
                 "expect_continue", "websocket", "by_name", "http2", "grpc", "grpc_timeout")

    def __init__(self, method: bytes, target: bytes, version: bytes, authority: bytes, fields: Fields, body: int,
                 content_length: int, keep_alive: bool, expect_continue: bool, websocket: bool,
                 by_name: dict[bytes, bytes] | None = None) -> None:
        self.method = method
        self.target = target  # origin-form: path and query
        self.version = version  # b"1.1", b"1.0" or b"2"
        self.authority = authority  # Host, :authority or the absolute-form authority
        # Forwardable fields in arrival order. HTTP/1.1: Host included; HTTP/2: no host
        # (``authority`` carries it) and cookie crumbs apart, as RFC 9113 §8.2.3 sends them.
        self.fields = fields
        self.body = body  # BODY_NONE, BODY_LENGTH or BODY_CHUNKED
        self.content_length = content_length  # -1: not known in advance
        self.keep_alive = keep_alive  # HTTP/1.x: the client's connection stays open after this one
        self.expect_continue = expect_continue
        self.websocket = websocket  # an HTTP/1.1 WebSocket upgrade
        # ``fields`` by name when no name repeats and they are as parsed, else None.
        self.by_name = by_name
        self.http2 = False  # arrived over HTTP/2
        self.grpc = False  # content-type application/grpc*: HTTP/2 end to end
        self.grpc_timeout = b""  # the grpc-timeout field, when given


class Response:
    """A response head, as the router passes it from an upstream to the client."""

    __slots__ = ("status", "reason", "fields", "block", "content_length", "body", "keep_alive")

    def __init__(self, status: int, reason: bytes, fields: Fields, body: int, content_length: int,
                 block: bytes | None = None, keep_alive: bool = True) -> None:
        self.status = status
        self.reason = reason  # HTTP/1.1's reason phrase; empty when HTTP/2 (or turnout) made it
        self.fields = fields  # forwardable fields, content-length included when the upstream gave one
        # BODY_NONE (nothing can follow: HEAD, 204, 304, or the head ended the stream),
        # BODY_LENGTH, BODY_CHUNKED (streamed) or BODY_UNTIL_CLOSE (an HTTP/1.1 upstream's)
        self.body = body
        self.content_length = content_length  # -1: not known in advance
        # ``fields`` as HTTP/1.1 field lines when an HTTP/1.1 upstream sent them: passed on
        # to an HTTP/1.1 client as they are, without building them again.
        self.block = block
        self.keep_alive = keep_alive  # the upstream connection may carry another request


def field_lines(fields: Fields) -> bytes:
    """``name: value`` CRLF for every field, as one buffer (joined in C)."""
    if not fields:
        return b""
    return b"\r\n".join(map(b": ".join, fields)) + b"\r\n"
