"""The one upstream interface, over HTTP/1.1 and HTTP/2 client connections alike.

The router (and mirroring) send a request through an ``UpstreamStream`` and hear back
through ``UpstreamListener`` callbacks; which protocol carries it is the client's
business (``http1/client.py``, ``http2/client.py``). A ``Carrier`` is a connection that
has room for one more request, reserved for whoever was handed it.

Flow control is one rule in both directions: bytes handed on carry a ``flow_len``, and
whoever took them says so once they are on their way (``on_request_taken``,
``acknowledge``). An HTTP/2 side turns that into WINDOW_UPDATEs, an HTTP/1.1 side into
pausing and resuming reads at its watermarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from mypy_extensions import mypyc_attr

from dataplane.errors import HttpError
from dataplane.message import NO_FIELDS

if TYPE_CHECKING:
    from dataplane.message import Fields, Request, Response

# How far a request got before it failed: what decides whether it may be sent again.
NOT_CONNECTED: Final = 0  # no connection: refused, timed out, ejected, or the wrong protocol
REFUSED: Final = 1  # connected, and refused unprocessed: REFUSED_STREAM, above a GOAWAY's last stream
STALE: Final = 2  # sent on a reused keep-alive connection that closed before any response byte
SENT: Final = 3  # the upstream may have processed it
STARTED: Final = 4  # the response had started


class UpstreamError(HttpError):
    """Why an upstream request failed, and how far it got (``NOT_CONNECTED`` … ``STARTED``)."""

    def __init__(self, status: int, reason: str, cause: str, phase: int) -> None:
        super().__init__(status, reason, cause)
        self.phase = phase


# Test doubles subclass this class and UpstreamStream (a listener, a stream that record what they
# are told): allowed in the compiled build too, at the cost of a shadow vtable, not of native calls.
@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamListener:
    """What an upstream connection reports to whoever sent the request (an exchange, a
    mirrored copy). Every method does nothing unless overridden."""

    def on_request_taken(self, flow_len: int) -> None:
        """Request bytes handed over earlier are on their way: the client may send more."""

    def on_informational(self, status: int) -> None:
        """A 1xx response other than 101 arrived."""

    def on_response_head(self, head: Response) -> None:
        """The final response head arrived."""

    def on_response_data(self, data: bytes, flow_len: int) -> None:
        """Response body bytes; ``acknowledge`` them once they were passed on."""

    def on_response_end(self, trailers: Fields) -> None:
        """The response is complete (``trailers`` may be empty)."""

    def on_response(self, head: Response, body: bytes) -> None:
        """A whole response at once: its head, its entire body and its end, no trailers
        (nothing of it needs acknowledging: the connection is not reading any more)."""
        self.on_response_head(head)
        if body:
            self.on_response_data(body, 0)
        self.on_response_end(NO_FIELDS)

    def on_upstream_error(self, error: UpstreamError) -> None:
        """The request failed; ``error.phase`` says how far it got."""


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamStream:
    """One request on an upstream connection, from its head to the end of its response."""

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Request body bytes; ``on_request_taken(flow_len)`` once they are on their way."""
        raise NotImplementedError

    def send_end(self, trailers: Fields) -> None:
        """The request is complete (trailers travel only where the framing can carry them)."""
        raise NotImplementedError

    def acknowledge(self, flow_len: int) -> None:
        """The client took ``flow_len`` response bytes: let the upstream send more."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Give the request up: its connection is closed or its stream reset; no more callbacks."""
        raise NotImplementedError

    def finish(self) -> None:
        """Response and request are both complete: the connection may carry another request."""
        raise NotImplementedError


class Carrier(Protocol):
    """A connection with room for one more request, reserved for its holder (an HTTP/1.1
    connection is its own only stream; an HTTP/2 connection opens a new one)."""

    def open_stream(self, listener: UpstreamListener, request: Request, fields: Fields, extra: Fields,
                    extra_lines: bytes, length: int) -> UpstreamStream:
        """Send a request head: ``fields`` as forwarded, then the proxy's own ``extra``
        (``extra_lines``: the same as HTTP/1.1 field lines, made once per client connection in
        the usual case); ``length`` is the body's size (0: none) or -1 when it is streamed to
        its end.
        Raises ``UpstreamError`` (``REFUSED``) when the connection can no longer carry it."""

    def release(self) -> None:
        """Give the reservation back unused."""

    @property
    def key(self) -> tuple[str, int]:
        """The destination it is connected to."""
