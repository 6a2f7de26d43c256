"""What the worker, the tracer and the access log need from a client connection and from a
finished request, whichever protocol carried it: HTTP/1.1 (``proxy.Downstream`` and
``proxy.Exchange``) or HTTP/2 (``http2.server.H2Connection`` and ``H2Stream``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dataplane.config import Listener
    from filters import Address, Decision


class ClientConnection(Protocol):
    """An open client connection, as the worker counts, drains and closes it."""

    @property
    def peer(self) -> bytes:
        """The client's address (``b"unix"`` for a Unix socket)."""

    @property
    def listener(self) -> Listener:
        """The listener it arrived on."""

    def drain(self) -> None:
        """Finish what is in flight, take nothing new, then close."""

    def close(self) -> None:
        """Close now."""


class RequestLine(Protocol):
    """Method, target and fields of a request."""

    @property
    def method(self) -> bytes:
        """The method."""

    @property
    def target(self) -> bytes:
        """The origin-form target (path and query)."""

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The fields, names lower case."""


class FinishedRequest(Protocol):
    """A request that is over: what metrics, the access log and the trace span record."""

    @property
    def conn(self) -> ClientConnection:
        """The client connection it came on."""

    @property
    def plan(self) -> RequestLine:
        """The request."""

    @property
    def started_at(self) -> float:
        """``WorkerState.clock()`` when it arrived."""

    @property
    def service(self) -> str:
        """The service it was routed for."""

    @property
    def route_kind(self) -> str:
        """``baseline``, ``sandbox`` or ``mirror``."""

    @property
    def decision(self) -> Decision:
        """The routing decision."""

    @property
    def destination(self) -> Address:
        """Where it was sent last (baseline after a fallback)."""

    @property
    def status(self) -> int:
        """The response status (499: the client went away first)."""

    @property
    def grpc_status(self) -> bytes:
        """The gRPC status of a gRPC call, else empty."""

    @property
    def bytes_out(self) -> int:
        """Response body bytes sent."""

    @property
    def fallback_used(self) -> bool:
        """Whether it fell back from the sandbox to baseline."""
