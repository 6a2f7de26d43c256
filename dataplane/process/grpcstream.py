"""A minimal gRPC client for one bidirectional stream, on turnout's own HTTP/2 engine.

The config channel needs one shape of call: a long-lived bidirectional stream to the control
plane. grpcio makes that call, but importing it costs the proxy process about 13.6 MB of
resident memory, and gRPC's wire format over HTTP/2 is small: a POST to
``/package.Service/Method`` with ``content-type: application/grpc`` and ``te: trailers``;
each message a 5-byte prefix (a compressed flag, then the length as 4 bytes big-endian) and
the serialized message; the server's verdict in trailers, ``grpc-status`` and a
percent-encoded ``grpc-message`` (or in a trailers-only response: one HEADERS with
END_STREAM). This module speaks that over ``dataplane.http2.engine.H2Engine`` in the client
role, one HTTP/2 connection per stream.

Bounds, all of them the caller's (``Endpoint``):

* **Message size.** A message whose prefix announces more than ``max_message_bytes`` fails
  the stream with RESOURCE_EXHAUSTED as soon as the prefix is read: nothing of it is
  buffered, and a message being assembled never holds more than the limit.
* **Flow control.** Received bytes are given back to the server (WINDOW_UPDATE) as they
  are assembled into messages, but not while a whole message waits for ``read()``: a
  server that pushes faster than the caller reads is held to one stream window.
  Outbound messages go out as the server's windows and the transport's write buffer allow;
  ``write()`` returns once its message was handed to the transport.
* **Liveness.** After ``keepalive_s`` without a frame from the server, a PING; when nothing
  arrives within ``keepalive_timeout_s`` after it, the stream fails with UNAVAILABLE.
* **Connecting** (TCP, TLS, the server's first SETTINGS) takes at most ``connect_timeout_s``.

TLS verifies the server against the context's roots with the name ``server_name`` (the
host by default), which is also what SNI and ``:authority`` carry, and insists on ALPN
``h2`` as gRPC does. Every failure is a ``GrpcError`` carrying a gRPC status code, whether
the server sent it or this client decided it (connection refused or lost: UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket
import ssl
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import unquote_to_bytes

from dataplane.http2.engine import (
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    H2Engine,
    Headers,
    ProtocolError,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
    valid_name,
    valid_value,
)

_PREFIX: Final = struct.Struct(">BL")  # compressed flag, message length
# What the server may send on the stream before the client took it (and on the connection,
# whose window the engine opens again as DATA arrives). A whole push of up to 32 MiB comes in
# 0.5 MiB round trips instead of gRPC's initial 64 KiB ones; at most one window is held
# unread behind a message the caller has not read yet.
_STREAM_WINDOW: Final = 1 << 20
_CONNECTION_WINDOW: Final = 1 << 20
_PING_DATA: Final = b"grpc-kpa"
_USER_AGENT: Final = b"turnout-grpcstream"
# Sent by the client itself: metadata may not set them.
_RESERVED: Final = frozenset({"te", "content-type", "user-agent", "grpc-accept-encoding", "grpc-encoding",
                              "grpc-timeout"})
# RFC 9113 §7, for messages.
_H2_ERRORS: Final = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
                     "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
                     "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")


class StatusCode(enum.IntEnum):
    """gRPC status codes (the values of ``grpc-status``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC over HTTP/2, "HTTP to gRPC Status Code Mapping": a response that is not 200 and
# carries no grpc-status; any other HTTP status is UNKNOWN.
_HTTP_STATUS: Final = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
                       404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
                       503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}
# gRPC over HTTP/2, "Errors": the status a stream reset by the server ends with; INTERNAL otherwise.
_RESET_STATUS: Final = {ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE, ErrorCodes.CANCEL: StatusCode.CANCELLED,
                        ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
                        ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED}


class GrpcError(Exception):
    """A stream that ended without OK: the server's status, or one this client decided
    (cannot connect, connection lost, keepalive unanswered, a message over the limit)."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Endpoint:
    """Where a stream goes, how, and the bounds it keeps."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None  # None: cleartext HTTP/2 (prior knowledge)
    server_name: str | None = None  # TLS name to verify and send (SNI), and the :authority; None: host
    connect_timeout_s: float = 20.0  # TCP, TLS and the server's SETTINGS; 20 s is gRPC's own minimum
    keepalive_s: float = 30.0  # PING after this long without a frame from the server
    keepalive_timeout_s: float = 10.0  # the stream fails when the PING is not answered within this
    max_message_bytes: int = 4 * 1024 * 1024  # a longer message fails the stream (RESOURCE_EXHAUSTED)

    def address(self) -> str:
        """``host:port`` (``[v6]:port``), for messages and the default ``:authority``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client TLS context for gRPC: the server verified against ``ca_file`` (PEM; only those
    roots, as grpcio's ``root_certificates``) or the system's roots, ALPN ``h2``.

    Raises ``OSError`` naming the file when it cannot be read or holds no certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:  # read, but not PEM certificates
        raise OSError(errno.EINVAL, f"no CA certificate in it ({exc.reason})", ca_file) from None
    context.set_alpn_protocols(["h2"])
    return context


async def open_stream(endpoint: Endpoint, path: str, metadata: Sequence[tuple[str, str]] = ()) -> GrpcStream:
    """Connect to ``endpoint`` and start the call ``path`` (``/package.Service/Method``) with
    ``metadata`` (lower-case ASCII names and values, e.g. ``authorization``).

    Raises ``GrpcError``: UNAVAILABLE when no HTTP/2 connection comes up within the connect
    timeout, INTERNAL for metadata that cannot be sent."""
    headers = _request_headers(endpoint, path, metadata)
    loop = asyncio.get_running_loop()
    stream = GrpcStream(endpoint, loop)
    server_hostname = (endpoint.server_name or endpoint.host) if endpoint.tls is not None else None
    try:
        async with asyncio.timeout(endpoint.connect_timeout_s):
            await loop.create_connection(lambda: stream, endpoint.host, endpoint.port, ssl=endpoint.tls,
                                         server_hostname=server_hostname)
            await stream._connected
            stream._start(headers)
    except TimeoutError:
        stream.close()
        raise GrpcError(StatusCode.UNAVAILABLE, f"no HTTP/2 connection to {endpoint.address()} within "
                                                f"{endpoint.connect_timeout_s:g} s") from None
    except OSError as exc:  # refused, unreachable, unknown name, TLS (ssl.SSLError is an OSError)
        stream.close()
        raise GrpcError(StatusCode.UNAVAILABLE, f"cannot connect to {endpoint.address()}: "
                                                f"{_connect_error(exc)}") from None
    except BaseException:
        stream.close()
        raise
    return stream


class GrpcStream(asyncio.Protocol):
    """One gRPC call with messages both ways, on its own HTTP/2 connection.

    Made by ``open_stream``; ``write`` and ``read`` messages (serialized protobuf), ``close``
    when done. ``read`` returns None once the server ended the call with OK and every
    message before was read; any other end raises ``GrpcError``, after the messages that
    arrived before it."""

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._h2 = H2Engine(True, initial_window_size=_STREAM_WINDOW, connection_window_size=_CONNECTION_WINDOW)
        self._transport: asyncio.Transport | None = None
        self._closed = False  # the connection is closed or closing: nothing more goes out
        # Resolved by the server's first SETTINGS: the connection speaks HTTP/2.
        self._connected: asyncio.Future[None] = loop.create_future()
        self._stream_id = 0  # 0 until the request head went out
        self._over = False  # the call ended: the server's status came, or it failed
        self._error: GrpcError | None = None  # how it ended, when not with OK
        self._http_status = 0
        # Inbound: whole messages not read yet, then the one being assembled.
        self._messages: deque[bytes] = deque()
        self._prefix = bytearray()
        self._body = bytearray()
        self._body_length = -1  # -1: reading a prefix
        self._held = 0  # received bytes not given back to the server while a message waits
        self._readable = asyncio.Event()
        # Outbound: framed messages, as the windows let them go.
        self._out: deque[memoryview] = deque()
        self._write_paused = False
        self._writable = asyncio.Event()
        # Liveness.
        self._last_frame_at = loop.time()
        self._ping_sent_at = 0.0  # a keepalive PING is unanswered since then (0: none)
        self._keepalive: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ the caller's API

    async def write(self, message: bytes) -> None:
        """Send one message; returns once it was handed to the transport. Raises the stream's
        ``GrpcError`` if it failed; after the server ended the call with OK the message is
        dropped (``read`` reports the end)."""
        if self._error is not None:
            raise self._raised()
        if self._over:
            return
        self._out.append(memoryview(_PREFIX.pack(0, len(message)) + message))
        self._pump()
        while self._out and not self._over:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            raise self._raised()

    async def read(self) -> bytes | None:
        """The next message, or None when the server ended the call with OK; raises
        ``GrpcError`` when it ended otherwise."""
        while not self._messages:
            if self._over:
                if self._error is not None:
                    raise self._raised()
                return None
            self._readable.clear()
            await self._readable.wait()
        message = self._messages.popleft()
        if not self._messages and self._held:
            # The caller caught up: what arrived meanwhile may be followed by more.
            self._h2.acknowledge(self._stream_id, self._held)
            self._held = 0
            self._flush()
        return message

    def close(self) -> None:
        """End the call (RST_STREAM CANCEL if it is still open) and close the connection;
        a ``read`` or ``write`` waiting meanwhile raises CANCELLED."""
        self._finish(GrpcError(StatusCode.CANCELLED, "the stream was closed by this side"))
        self._close_connection(abort=False)

    # ------------------------------------------------------------------ set-up

    def _start(self, headers: Headers) -> None:
        """Send the request head on the connection's first stream."""
        if self._error is not None:  # the connection failed since its SETTINGS came
            raise self._raised()
        try:
            self._stream_id = self._h2.get_next_available_stream_id()
            self._h2.send_headers(self._stream_id, headers)
        except ProtocolError as exc:  # a GOAWAY came first
            self._fail(GrpcError(StatusCode.UNAVAILABLE, f"{self._endpoint.address()} refused the stream: {exc}"))
            raise self._raised() from None
        self._flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Check ALPN, send the preface and our SETTINGS, and start the keepalive timer."""
        self._transport = tr = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = tr.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames, answered at once
        tls = tr.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() != "h2":
            tr.close()  # first: not a frame of HTTP/2 goes to a server that did not agree to it
            self._fail(GrpcError(StatusCode.UNAVAILABLE, f"{self._endpoint.address()} did not agree to HTTP/2 "
                                                         "over TLS (ALPN h2)"))
            return
        self._h2.initiate_connection()
        self._flush()
        self._arm_keepalive(self._endpoint.keepalive_s)

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: a call still open fails with UNAVAILABLE."""
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        reason = "the server closed the connection" if exc is None else f"connection lost: {exc}"
        self._fail(GrpcError(StatusCode.UNAVAILABLE, reason))

    # ------------------------------------------------------------------ inbound

    def data_received(self, data: bytes) -> None:
        """Frames from the server."""
        if self._closed:
            return
        self._last_frame_at = self._loop.time()
        self._ping_sent_at = 0.0  # any frame proves the server alive, a PING ACK included
        if not self._connected.done() and data.startswith(b"HTTP/1."):
            self._fail(GrpcError(StatusCode.UNAVAILABLE, f"{self._endpoint.address()} answered in HTTP/1.1, "
                                                         "not HTTP/2"))
            return
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:  # the engine queued a GOAWAY naming it
            self._fail(GrpcError(StatusCode.UNAVAILABLE if not self._connected.done() else StatusCode.INTERNAL,
                                 f"HTTP/2 protocol error from {self._endpoint.address()}: {exc}"))
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._on_data(event.data, event.flow_controlled_length)
                if event.stream_ended and not self._over:
                    self._fail(GrpcError(StatusCode.INTERNAL, "the server ended the stream without a status"))
            elif isinstance(event, ResponseReceived):
                self._on_head(event.headers, event.stream_ended)
            elif isinstance(event, TrailersReceived):
                self._on_status(event.headers)
            elif isinstance(event, WindowUpdated):
                self._pump()
            elif isinstance(event, RemoteSettingsChanged):
                if not self._connected.done():
                    self._connected.set_result(None)
                self._pump()  # a new initial window may let queued data go
            elif isinstance(event, StreamReset):
                self._on_reset(event.error_code, event.remote_reset)
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway(event)
        self._flush()  # nothing once the connection is closing: an ended call ignores later events

    def _on_head(self, headers: Headers, ended: bool) -> None:
        content_type = b""
        for name, value in headers:
            if name == b":status":
                self._http_status = int(value)  # the engine checked it is 3 digits
            elif name == b"content-type":
                content_type = value
        if ended:  # trailers-only: the status is in the head
            self._on_status(headers)
        elif self._http_status != 200:
            self._on_status(headers)  # grpc-status if any, else the HTTP status mapped
            self._close_connection(abort=False)  # nothing of gRPC follows
        elif not content_type.startswith(b"application/grpc"):
            self._fail(GrpcError(StatusCode.UNKNOWN, "the response is not gRPC (content-type "
                                                     f"{content_type.decode('latin-1') or 'missing'})"))

    def _on_data(self, data: bytes, flow_len: int) -> None:
        if self._over:
            return
        limit = self._endpoint.max_message_bytes
        pos = 0
        end = len(data)
        while pos < end:
            if self._body_length < 0:
                take = min(5 - len(self._prefix), end - pos)
                self._prefix += data[pos:pos + take]
                pos += take
                if len(self._prefix) < 5:
                    break
                compressed, length = _PREFIX.unpack(self._prefix)
                self._prefix.clear()
                if compressed:  # no grpc-accept-encoding but identity was sent: nothing may be compressed
                    self._fail(GrpcError(StatusCode.INTERNAL, "a compressed message, but no compression was agreed"))
                    return
                if length > limit:
                    self._fail(GrpcError(StatusCode.RESOURCE_EXHAUSTED, f"received a message of {length} bytes, over "
                                                                        f"the limit of {limit} bytes"))
                    return
                self._body_length = length
            take = min(self._body_length - len(self._body), end - pos)
            if take == self._body_length:  # the whole message in this frame: one copy
                self._messages.append(data[pos:pos + take])
            else:
                self._body += data[pos:pos + take]
                if len(self._body) < self._body_length:
                    pos += take
                    break
                self._messages.append(bytes(self._body))
                self._body = bytearray()
            pos += take
            self._body_length = -1
        if self._messages:
            self._held += flow_len
            self._readable.set()
        elif flow_len:
            self._h2.acknowledge(self._stream_id, flow_len)

    def _on_status(self, headers: Headers) -> None:
        status = None
        message = b""
        for name, value in headers:
            if name == b"grpc-status":
                status = value
            elif name == b"grpc-message":
                message = value
        text = unquote_to_bytes(message).decode("utf-8", "replace")  # percent-encoded UTF-8, leniently
        if status is None:
            if self._http_status != 200:
                code = _HTTP_STATUS.get(self._http_status, StatusCode.UNKNOWN)
                self._finish(GrpcError(code, f"HTTP status {self._http_status} without grpc-status"))
            else:
                self._finish(GrpcError(StatusCode.UNKNOWN, "the server ended the stream without grpc-status"))
            return
        try:
            code = StatusCode(int(status)) if status.isdigit() else StatusCode.UNKNOWN
        except ValueError:  # outside 0-16
            code = StatusCode.UNKNOWN
        if code != StatusCode.OK:
            self._finish(GrpcError(code, text))
        elif self._body_length >= 0 or self._prefix:
            self._finish(GrpcError(StatusCode.INTERNAL, "the stream ended in the middle of a message"))
        else:
            self._finish(None)

    def _on_reset(self, error_code: int, remote: bool) -> None:
        name = _H2_ERRORS[error_code] if error_code < len(_H2_ERRORS) else hex(error_code)
        if remote:
            self._finish(GrpcError(_RESET_STATUS.get(error_code, StatusCode.INTERNAL),
                                   f"the server reset the stream ({name})"))
        else:  # the engine reset it: the server broke HTTP/2 on it
            self._finish(GrpcError(StatusCode.INTERNAL, f"HTTP/2 stream error from the server ({name})"))

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        # A graceful GOAWAY that covers the stream lets it finish; anything else ends it.
        if event.error_code == ErrorCodes.NO_ERROR and event.last_stream_id >= self._stream_id:
            return
        code = event.error_code
        name = _H2_ERRORS[code] if code < len(_H2_ERRORS) else hex(code)
        debug = event.additional_data.decode("utf-8", "replace")
        self._fail(GrpcError(StatusCode.UNAVAILABLE, f"the server closed the connection (GOAWAY {name}"
                                                     + (f": {debug})" if debug else ")")))

    # ------------------------------------------------------------------ outbound

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold outbound data."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained: send what waits."""
        self._write_paused = False
        self._pump()

    def _pump(self) -> None:
        """Send queued messages as far as the windows and the write buffer allow."""
        if not self._stream_id or self._over:
            return
        h2 = self._h2
        out = self._out
        while out and not self._write_paused:
            size = h2.sendable(self._stream_id)
            if size <= 0:
                break  # until the server gives window (a closed stream is reported as its reset)
            view = out[0]
            if len(view) > size:
                h2.send_data(self._stream_id, bytes(view[:size]))
                out[0] = view[size:]
            else:
                h2.send_data(self._stream_id, bytes(view))
                out.popleft()
        self._flush()
        if not out:
            self._writable.set()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # ------------------------------------------------------------------ liveness

    def _arm_keepalive(self, delay: float) -> None:
        self._keepalive = self._loop.call_later(delay, self._check_liveness)

    def _check_liveness(self) -> None:
        if self._closed:
            return
        endpoint = self._endpoint
        now = self._loop.time()
        if self._ping_sent_at:
            waited = now - self._ping_sent_at
            if waited >= endpoint.keepalive_timeout_s:
                self._fail(GrpcError(StatusCode.UNAVAILABLE, "no answer to a keepalive PING within "
                                                             f"{endpoint.keepalive_timeout_s:g} s"), abort=True)
                return
            self._arm_keepalive(endpoint.keepalive_timeout_s - waited)
            return
        quiet = now - self._last_frame_at
        if quiet < endpoint.keepalive_s:
            self._arm_keepalive(endpoint.keepalive_s - quiet)
            return
        self._ping_sent_at = now
        self._h2.ping(_PING_DATA)
        self._flush()
        self._arm_keepalive(endpoint.keepalive_timeout_s)

    # ------------------------------------------------------------------ ending

    def _finish(self, error: GrpcError | None) -> None:
        """The call is over (``error`` None: with OK); the first end counts."""
        if self._over:
            return
        self._over = True
        self._error = error
        self._out.clear()
        self._readable.set()
        self._writable.set()

    def _fail(self, error: GrpcError, abort: bool = False) -> None:
        """End the call with ``error`` and close the connection (``abort``: without flushing,
        for a peer that no longer reads)."""
        self._finish(error)
        if not self._connected.done():
            self._connected.set_exception(error)
            self._connected.exception()  # retrieved: the open_stream that awaits it raises it
        self._close_connection(abort)

    def _close_connection(self, abort: bool) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._closed:
            return
        self._closed = True
        if self._stream_id in self._h2.streams:
            self._h2.reset_stream(self._stream_id, ErrorCodes.CANCEL)
        self._h2.close_connection(ErrorCodes.NO_ERROR)
        self._flush()
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _raised(self) -> GrpcError:
        """A fresh exception for each raise (one instance would pile up tracebacks)."""
        assert self._error is not None
        return GrpcError(self._error.code, self._error.message)


def _request_headers(endpoint: Endpoint, path: str, metadata: Sequence[tuple[str, str]]) -> Headers:
    """The request head of a gRPC call (gRPC over HTTP/2, "Requests")."""
    authority = endpoint.server_name or endpoint.address()
    try:
        authority_bytes = authority.encode("idna")
    except UnicodeError:
        raise GrpcError(StatusCode.UNAVAILABLE, f"{authority!r} is not a valid host name") from None
    headers: Headers = [
        (b":method", b"POST"), (b":scheme", b"https" if endpoint.tls is not None else b"http"),
        (b":path", path.encode("ascii")), (b":authority", authority_bytes),
        (b"te", b"trailers"), (b"content-type", b"application/grpc"),
        (b"grpc-accept-encoding", b"identity"), (b"user-agent", _USER_AGENT),
    ]
    for name, value in metadata:
        try:
            key, text = name.encode("ascii"), value.encode("ascii")
        except UnicodeEncodeError:
            raise GrpcError(StatusCode.INTERNAL, f"metadata {name!r}: only ASCII can be sent") from None
        if not valid_name(key) or name in _RESERVED or name.startswith("grpc-"):
            raise GrpcError(StatusCode.INTERNAL, f"metadata {name!r}: not a lower-case name a call may set")
        if not valid_value(text):
            raise GrpcError(StatusCode.INTERNAL, f"metadata {name!r}: the value holds CR, LF or NUL, or "
                                                 "starts or ends with white space")
        headers.append((key, text))
    return headers


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return exc.strerror or str(exc) or type(exc).__name__
