"""One port for HTTP/1.1 and HTTP/2: the first bytes decide, or TLS ALPN does.

Cleartext (``preface_kind`` decides): a connection starting with the HTTP/2 client preface
is handed to ``H2Connection``, and so is one whose first line ends without a "/" (no
HTTP/1 request can: it is an invalid preface, answered with GOAWAY PROTOCOL_ERROR);
anything else goes to ``H1Server``. TLS listeners (``server_tls``): ALPN ``h2`` picks
``H2Connection``, anything else ``H1Server``.
The chosen protocol then owns the transport as if it had accepted it, and is given the
bytes read so far. The cost is one protocol switch per connection; requests never pass
through here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from dataplane.http1.server import H1Server
from dataplane.http2.engine import PREFACE, PREFACE_HTTP1, PREFACE_PARTIAL, preface_kind
from dataplane.http2.server import H2Connection

if TYPE_CHECKING:
    from ssl import SSLContext

    from dataplane.config import Listener
    from dataplane.connections import Connections
    from dataplane.router import Router

class Sniffer(asyncio.Protocol):
    """Reads just enough of a new connection to tell HTTP/2 from HTTP/1.1."""

    def __init__(self, router: Router, connections: Connections, listener: Listener) -> None:
        self.router = router
        self.connections = connections
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()  # what was read before the first bytes could decide
        self._lead = 0  # how many of them are CR or LF (empty lines before a request line)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        limits = self.router.runtime.limits
        if len(self.connections.open) >= limits.max_connections_per_worker:
            # Over the cap: H1Server answers 503 at once, without waiting for a byte.
            self._hand_over(H1Server(self.router, self.connections, self.listener), b"")
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            # A TLS listener: the handshake is done and ALPN has chosen.
            self._hand_over(self._protocol(ssl_object.selected_alpn_protocol() == "h2"), b"")
            return
        # A client that never speaks is closed as Downstream would close it.
        self._timer = self.router.loop.call_later(limits.header_read_timeout_s, self._timed_out)

    def data_received(self, data: bytes) -> None:
        held = len(self._buf)
        max_line = self.router.runtime.limits.max_request_line_bytes
        if self._lead == held:  # nothing but empty lines so far: they may go on
            lead = 0
            while lead < len(data) and (data[lead] == 13 or data[lead] == 10):
                lead += 1
            self._lead += lead
        # Past the preface's length, bytes held were undecided because their first line had
        # neither an end nor a "/": only new bytes can change that, so a first line arriving
        # a byte at a time is examined once, not once a read.
        after = self._lead - held if self._lead > held else 0
        if (held > len(PREFACE) and held + len(data) <= max_line and data.find(b"\n", after) == -1
                and data.find(b"/", after) == -1):
            self._buf += data
            return
        buf = bytes(self._buf) + data if held else data
        kind = preface_kind(buf, max_line)
        if kind == PREFACE_PARTIAL:
            self._buf = bytearray(buf)  # could still be the preface, or a request line: wait for more
            return
        self._buf = bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # An invalid preface goes to HTTP/2 too: its engine answers GOAWAY PROTOCOL_ERROR.
        self._hand_over(self._protocol(kind != PREFACE_HTTP1), buf)

    def _protocol(self, http2: bool) -> H1Server | H2Connection:
        if http2:
            return H2Connection(self.router, self.connections, self.listener)
        return H1Server(self.router, self.connections, self.listener)

    def _hand_over(self, protocol: H1Server | H2Connection, buf: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)  # type: ignore[arg-type]  # an asyncio protocol by its methods
        protocol.connection_made(transport)
        if buf and not transport.is_closing():
            protocol.data_received(buf)

    def eof_received(self) -> bool | None:
        self._stop()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()

    def _timed_out(self) -> None:
        self._timer = None
        self.router.metrics.downstream_error("header_timeout")
        if self.transport is not None:
            self.transport.close()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


def server_tls(listener: Listener) -> SSLContext | None:
    """The TLS context a listener is served with, or None for cleartext."""
    return None if listener.tls is None else listener.tls.server_context
