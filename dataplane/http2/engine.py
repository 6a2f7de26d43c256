"""turnout's HTTP/2 protocol engine (RFC 9113): framing, stream states and flow control.

One ``H2Engine`` per connection, either side, sans I/O like h2: ``receive_data`` turns
bytes into events, the ``send_*`` methods queue frames that ``data_to_send`` hands over.
It is compiled with the per-request path (mypyc) and does the work h2 did there at a
fraction of the cost; h2 stays the reference it is tested against
(tests/unit/dataplane/test_h2_engine.py runs it against h2 peers both ways, and on
arbitrary frames). Header blocks are coded by turnout's HPACK (``hpack.py``).

What it does not do, because turnout's connection classes do it (``server.py``,
``upstream.py``): count concurrent streams (the server refuses the excess with
REFUSED_STREAM itself), validate request heads (a malformed request is a stream error
decided with the routing), and the abuse accounting (resets, pings, settings floods;
see docs/hardening.md). What it checks itself: frame sizes and layout, stream-state rules, both directions' flow-control
windows, SETTINGS values, the CONTINUATION sequence and its size, header-block coding,
and, on the client side, response heads and their content-length (stream errors).

Errors: a connection error queues a GOAWAY naming it and raises ``ProtocolError`` (the
caller writes what is queued and closes); a stream error resets the stream and reports a
``StreamReset`` as if the peer had reset it, so the connection goes on. Streams leave the
table as soon as both directions are closed or reset: the table holds open streams only.
What is remembered of closed streams is bounded: the last ``_RECENT_RESETS`` streams we
reset (the peer may still be sending on those, RFC 9113 §5.1) and two stream ids.

``preface_kind`` tells, from a cleartext connection's first bytes, HTTP/2 prior knowledge
from HTTP/1.1 and both from an invalid connection preface, for the port that takes both.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from hpack.exceptions import HPACKError, OversizedHeaderListError

from dataplane.http2.hpack import Decoder, Encoder

Headers = list[tuple[bytes, bytes]]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_WINDOW: Final = 2**31 - 1
_DEFAULT_WINDOW: Final = 65535
_DEFAULT_FRAME_SIZE: Final = 16384
_MAX_FRAME_SIZE: Final = 2**24 - 1
MAX_STREAM_ID: Final = 2**31 - 1
# A content-length of more digits is no body anyone will carry (10**18 bytes is an exabyte),
# and int() refuses more than 4,300 digits outright.
MAX_LENGTH_DIGITS: Final = 18
# At most this many frames (HEADERS and its CONTINUATIONs) carry one header block, as h2
# allowed: the size limit alone would let empty CONTINUATION frames pile up without end.
_CONTINUATION_BACKLOG: Final = 64
# The streams we reset that are remembered (a ring). Until the peer reads our RST_STREAM it
# may go on sending on the stream, and those frames are dropped (RFC 9113 §5.1, §6.4);
# DATA or HEADERS on any other closed stream is an error. A peer keeping to the concurrency
# limit it was given has at most that many streams whose reset it has not read yet (they
# still count as open to it): 128 is h2_max_concurrent_streams' default. Once an id leaves
# the ring, every closed stream up to it counts as possibly reset by us
# (``H2Engine._resets_forgotten``): a ring too short for the peer costs strictness, never a
# connection that a late frame would otherwise tear down.
_RECENT_RESETS: Final = 128

# Frame types (RFC 9113 §6) and flags.
_DATA: Final = 0
_HEADERS: Final = 1
_PRIORITY: Final = 2
_RST_STREAM: Final = 3
_SETTINGS: Final = 4
_PUSH_PROMISE: Final = 5
_PING: Final = 6
_GOAWAY: Final = 7
_WINDOW_UPDATE: Final = 8
_CONTINUATION: Final = 9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20

# SETTINGS identifiers.
_HEADER_TABLE_SIZE: Final = 1
_ENABLE_PUSH: Final = 2
_MAX_CONCURRENT_STREAMS: Final = 3
_INITIAL_WINDOW_SIZE: Final = 4
_MAX_FRAME_SIZE_ID: Final = 5
_MAX_HEADER_LIST_SIZE: Final = 6

# The encoder's dynamic table never grows past this, whatever the peer allows (RFC 7541 §4.2
# lets the encoder use less): a peer's huge HEADER_TABLE_SIZE costs it nothing in memory.
_ENCODER_TABLE_CAP: Final = 4096
# Connection-specific fields make a request or response malformed (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                         b"upgrade"})

# RFC 9110 token, lower case only (RFC 9113 §8.2.1: upper case makes a message malformed).
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Names that passed _NAME: a peer repeats a few, and a set lookup costs a fraction of the
# match. Bounded: past this many, new names are matched every time.
_KNOWN_NAMES: Final[set[bytes]] = set()
_KNOWN_NAMES_MAX: Final = 512
_FRAME_HEAD: Final = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_U32: Final = struct.Struct(">L")
_GOAWAY_HEAD: Final = struct.Struct(">LL")

# What ``preface_kind`` finds at the start of a cleartext connection.
PREFACE_PARTIAL: Final = 0  # too few bytes to tell: wait for more
PREFACE_HTTP2: Final = 1  # the HTTP/2 client preface (prior knowledge, RFC 9113 §3.3)
PREFACE_HTTP1: Final = 2  # an HTTP/1.x request (well-formed or not: HTTP/1.1 answers it)
PREFACE_INVALID: Final = 3  # neither: an invalid HTTP/2 connection preface (RFC 9113 §3.4)


class ErrorCodes:
    """HTTP/2 error codes (RFC 9113 §7)."""

    NO_ERROR: Final = 0x0
    PROTOCOL_ERROR: Final = 0x1
    INTERNAL_ERROR: Final = 0x2
    FLOW_CONTROL_ERROR: Final = 0x3
    SETTINGS_TIMEOUT: Final = 0x4
    STREAM_CLOSED: Final = 0x5
    FRAME_SIZE_ERROR: Final = 0x6
    REFUSED_STREAM: Final = 0x7
    CANCEL: Final = 0x8
    COMPRESSION_ERROR: Final = 0x9
    CONNECT_ERROR: Final = 0xA
    ENHANCE_YOUR_CALM: Final = 0xB
    INADEQUATE_SECURITY: Final = 0xC
    HTTP_1_1_REQUIRED: Final = 0xD


class ProtocolError(Exception):
    """A connection error (the GOAWAY is queued), or a send the connection's state forbids."""

    def __init__(self, message: str, error_code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


class StreamClosedError(ProtocolError):
    """Sending on a stream that is closed (or was never opened) in that direction."""


# ---------------------------------------------------------------------- events


class Event:
    """Something ``receive_data`` found, for the connection's owner to act on."""


class RequestReceived(Event):
    """A new stream's request head (server side)."""

    def __init__(self, stream_id: int, headers: Headers, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class ResponseReceived(Event):
    """A stream's final response head (client side; ``stream_ended``: trailers-only)."""

    def __init__(self, stream_id: int, headers: Headers, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class InformationalResponseReceived(Event):
    """A 1xx response head (client side)."""

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class TrailersReceived(Event):
    """Trailers: the stream's last HEADERS, which ends it."""

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived(Event):
    """Body bytes. ``flow_controlled_length`` (padding included) is what ``acknowledge``
    must be told once they were taken; the connection's window was opened again already."""

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.stream_ended = stream_ended


class StreamReset(Event):
    """The stream is gone: reset by the peer, or by the engine for a stream error."""

    def __init__(self, stream_id: int, error_code: int, remote_reset: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote_reset = remote_reset


class WindowUpdated(Event):
    """The peer gave more window: on ``stream_id``, or on the connection when it is 0."""

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class RemoteSettingsChanged(Event):
    """The peer's SETTINGS were applied (and acknowledged)."""


class SettingsAcknowledged(Event):
    """The peer acknowledged our SETTINGS."""


class PingReceived(Event):
    """A PING, already answered."""


class PingAckReceived(Event):
    """The answer to our PING."""


class PriorityUpdated(Event):
    """A PRIORITY frame (turnout does not prioritise: only counted)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class ConnectionTerminated(Event):
    """A GOAWAY: no new streams; those above ``last_stream_id`` were not processed."""

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


# ---------------------------------------------------------------------- the engine


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    """One open stream's state: which directions are open and both windows."""

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window  # what we may still send (may go negative, §6.9.2)
        self.recv_window = recv_window  # what the peer may still send
        self.recv_unacked = 0  # taken but not yet given back to the peer
        self.send_closed = False
        self.recv_closed = False
        self.head_received = False  # the (final) head arrived: the next HEADERS are trailers
        self.expected_length = -1  # client side: the response's content-length (-1: none to check)
        self.received_length = 0
        self.head_request = False  # client side: a HEAD request, whose response has no body


class H2Engine:
    """One HTTP/2 connection's protocol state, either side."""

    def __init__(self, client_side: bool, *, max_concurrent_streams: int = 0, initial_window_size: int = 65535,
                 connection_window_size: int = 65535, max_header_list_size: int = 65536) -> None:
        self.client_side = client_side
        self.closed = False  # a final GOAWAY was sent (or a connection error): nothing more goes out
        self.goaway_received = False  # no new outbound streams
        self.streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        self._inbuf = bytearray()  # the start of a frame not complete yet
        self._need = 0  # the length _inbuf must reach before parsing is worth it
        self._preface_pending = not client_side
        self._next_stream_id = 1  # client side
        self._highest_inbound = 0  # server side: the highest stream id the peer opened
        # Server side: the peer opened every odd id from this one to _highest_inbound (it
        # skipped none). HEADERS on one of those that is not open is on a closed stream; below
        # it the id may never have been opened, and HEADERS on it is an unexpected id (§5.1.1).
        self._inbound_run_start = 1
        # The streams we reset lately (see _RECENT_RESETS): a ring, 0 for an empty slot.
        self._recent_resets = [0] * _RECENT_RESETS
        self._recent_resets_next = 0
        self._resets_forgotten = 0  # the highest id that left the ring
        # Settings we sent (applied to inbound windows once acknowledged).
        self._max_concurrent_streams = max_concurrent_streams  # 0: not announced
        self._local_initial_window = initial_window_size
        self._recv_initial_window = _DEFAULT_WINDOW  # in force until our SETTINGS are acknowledged
        self._max_header_list_size = max_header_list_size
        self._connection_window_size = connection_window_size
        # The connection's windows. Ours is opened again by half of it at a time as DATA
        # arrives, so it never drops below half (> the 16384-byte largest frame we accept):
        # only what was received and not yet given back is tracked.
        self._conn_recv_max = _DEFAULT_WINDOW
        self._conn_recv_unacked = 0
        self._conn_send_window = _DEFAULT_WINDOW
        # The peer's settings.
        self.remote_max_concurrent_streams = MAX_STREAM_ID
        self._send_initial_window = _DEFAULT_WINDOW
        self.max_outbound_frame_size = _DEFAULT_FRAME_SIZE
        # Header blocks.
        self._encoder = Encoder()
        self._decoder = Decoder(max_header_list_size)
        # A header block is at most about as long as the list it codes (every field costs
        # 32 bytes in the list, a few in a literal); beyond this it is a CONTINUATION flood.
        self._max_block = max_header_list_size + 1024
        self._cont_stream = 0  # a HEADERS without END_HEADERS: CONTINUATION on it must follow
        self._cont_end_stream = False
        self._cont_block: list[bytes] = []
        self._cont_size = 0

    # ------------------------------------------------------------------ output

    def initiate_connection(self) -> None:
        """The connection preface: (client) the magic, then our SETTINGS and connection window."""
        settings: list[bytes] = []
        if self.client_side:
            self._out.append(PREFACE)
            settings.append(struct.pack(">HL", _ENABLE_PUSH, 0))
        elif self._max_concurrent_streams:
            settings.append(struct.pack(">HL", _MAX_CONCURRENT_STREAMS, self._max_concurrent_streams))
        if self._local_initial_window != _DEFAULT_WINDOW:
            settings.append(struct.pack(">HL", _INITIAL_WINDOW_SIZE, self._local_initial_window))
        settings.append(struct.pack(">HL", _MAX_HEADER_LIST_SIZE, self._max_header_list_size))
        self._frame(_SETTINGS, 0, 0, b"".join(settings))
        extra = self._connection_window_size - _DEFAULT_WINDOW
        if extra > 0:
            self._conn_recv_max += extra
            self._frame(_WINDOW_UPDATE, 0, 0, _U32.pack(extra))

    def data_to_send(self) -> bytes:
        """Every frame queued since the last call."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        self._out.append(_FRAME_HEAD.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id))
        if length:
            self._out.append(payload)

    # ------------------------------------------------------------------ sending

    def get_next_available_stream_id(self) -> int:
        """The id the next stream we open gets (client side)."""
        if self._next_stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted")
        return self._next_stream_id

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """A head (a new stream's request on the client side) or trailers (with ``end_stream``)."""
        if self.closed:
            raise ProtocolError("connection closed")
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id != self._next_stream_id or stream_id > MAX_STREAM_ID:
                raise StreamClosedError("no open stream " + str(stream_id))
            if self.goaway_received:
                raise ProtocolError("the peer sent GOAWAY: no new streams")
            stream = _Stream(stream_id, self._send_initial_window, self._recv_initial_window)
            for name, value in headers:
                if name == b":method":
                    stream.head_request = value == b"HEAD"
                    break
            self.streams[stream_id] = stream
            self._next_stream_id = stream_id + 2
        elif stream.send_closed:
            raise StreamClosedError("stream " + str(stream_id) + " is closed for sending")
        block = self._encoder.encode(headers)
        flags = _END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._frame(_HEADERS, flags | _END_HEADERS, stream_id, block)
        else:
            self._frame(_HEADERS, flags, stream_id, block[:limit])
            pos = limit
            while pos < len(block):
                chunk = block[pos:pos + limit]
                pos += limit
                self._frame(_CONTINUATION, _END_HEADERS if pos >= len(block) else 0, stream_id, chunk)
        if end_stream:
            self._send_closed(stream)

    def sendable(self, stream_id: int) -> int:
        """How many bytes one DATA frame on ``stream_id`` may carry now; -1 when the stream
        cannot send any more (closed, reset, or the connection is)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.send_closed or self.closed:
            return -1
        window = min(stream.send_window, self._conn_send_window, self.max_outbound_frame_size)
        return window if window > 0 else 0

    def local_flow_control_window(self, stream_id: int) -> int:
        """What the peer lets us send on ``stream_id`` now (stream and connection windows)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.send_closed:
            raise StreamClosedError("no open stream " + str(stream_id))
        return min(stream.send_window, self._conn_send_window)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """One DATA frame; ``data`` must fit ``sendable(stream_id)``."""
        if self.closed:
            raise ProtocolError("connection closed")
        stream = self.streams.get(stream_id)
        if stream is None or stream.send_closed:
            raise StreamClosedError("no open stream " + str(stream_id))
        size = len(data)
        if size:
            if size > stream.send_window or size > self._conn_send_window or size > self.max_outbound_frame_size:
                raise ProtocolError("DATA larger than the window or the frame size allows",
                                    ErrorCodes.FLOW_CONTROL_ERROR)
            stream.send_window -= size
            self._conn_send_window -= size
        self._frame(_DATA, _END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            self._send_closed(stream)

    def end_stream(self, stream_id: int) -> None:
        """End our side of the stream with an empty DATA frame."""
        self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """RST_STREAM, and the stream leaves the table (nothing is sent for one that is gone
        already); what the peer sent on it before reading the reset is dropped when it comes."""
        stream = self.streams.pop(stream_id, None)
        if stream is None or self.closed:
            return
        self._frame(_RST_STREAM, 0, stream_id, _U32.pack(error_code))
        self._remember_reset(stream_id)

    def ping(self, opaque_data: bytes) -> None:
        """A PING carrying 8 bytes; the answer is reported as ``PingAckReceived``."""
        if len(opaque_data) != 8:
            raise ValueError("PING carries exactly 8 bytes")
        if not self.closed:  # nothing goes out after the final GOAWAY
            self._frame(_PING, 0, 0, opaque_data)

    def goaway(self, last_stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """A GOAWAY that leaves the connection usable (the first step of a graceful drain)."""
        if not self.closed:
            self._frame(_GOAWAY, 0, 0, _GOAWAY_HEAD.pack(last_stream_id, error_code))

    def close_connection(self, error_code: int = ErrorCodes.NO_ERROR, last_stream_id: int | None = None) -> None:
        """The final GOAWAY; nothing is sent after it."""
        if self.closed:
            return
        last = self._highest_inbound if last_stream_id is None else last_stream_id
        self._frame(_GOAWAY, 0, 0, _GOAWAY_HEAD.pack(last, error_code))
        self.closed = True

    # ------------------------------------------------------------------ flow control

    def acknowledge(self, stream_id: int, flow_len: int) -> bool:
        """``flow_len`` bytes received on ``stream_id`` were taken: the peer may send more
        (a WINDOW_UPDATE goes once half the stream's window was taken). Returns whether
        a frame was queued."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.recv_closed or flow_len <= 0 or self.closed:
            return False
        unacked = stream.recv_unacked + flow_len
        maximum = self._recv_initial_window
        if unacked >= maximum >> 1 or (stream.recv_window <= 0 and unacked > min(1024, maximum >> 2)):
            increment = min(unacked, maximum - stream.recv_window)
            stream.recv_unacked = unacked - increment
            if increment > 0:
                stream.recv_window += increment
                self._frame(_WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))
                return True
            return False
        stream.recv_unacked = unacked
        return False

    def _connection_received(self, flow_len: int) -> None:
        # The connection's window opens again as DATA arrives (the stream windows bound what
        # the proxy holds): one WINDOW_UPDATE per half window.
        unacked = self._conn_recv_unacked + flow_len
        if unacked >= self._conn_recv_max >> 1:
            self._conn_recv_unacked = 0
            if not self.closed:
                self._frame(_WINDOW_UPDATE, 0, 0, _U32.pack(unacked))
        else:
            self._conn_recv_unacked = unacked

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for the frames in ``data`` (a partial frame is kept for the next call);
        raises ``ProtocolError`` on a connection error, with the GOAWAY queued."""
        if self.closed:
            return []
        if self._inbuf:  # appended to, and parsed once the frame is complete: a trickle is linear
            self._inbuf += data
            if len(self._inbuf) < self._need:
                return []
            buf = bytes(self._inbuf)
            self._inbuf = bytearray()
        else:
            buf = data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        try:
            if self._preface_pending:
                if end < 24:
                    if PREFACE[:end] != buf:
                        raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                    self._inbuf = bytearray(buf)
                    self._need = 24
                    return events
                if buf[:24] != PREFACE:
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                self._preface_pending = False
                pos = 24
            while end - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if length > _DEFAULT_FRAME_SIZE:
                    raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                stop = pos + 9 + length
                if stop > end:
                    self._need = stop - pos
                    break
                ftype = buf[pos + 3]
                flags = buf[pos + 4]
                stream_id = ((buf[pos + 5] & 0x7F) << 24) | (buf[pos + 6] << 16) | (buf[pos + 7] << 8) | buf[pos + 8]
                payload = buf[pos + 9:stop]
                pos = stop
                self._receive_frame(ftype, flags, stream_id, payload, events)
        except _ConnectionError as exc:
            self.close_connection(exc.code)
            raise ProtocolError(str(exc), exc.code) from None
        if pos < end:
            if end - pos < 9:
                self._need = 9
            self._inbuf = bytearray(buf[pos:])
        return events

    def _receive_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._cont_stream:
            if ftype != _CONTINUATION or stream_id != self._cont_stream:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "expected CONTINUATION")
            self._cont_size += len(payload)
            if self._cont_size > self._max_block:
                raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large")
            self._cont_block.append(payload)
            if len(self._cont_block) > _CONTINUATION_BACKLOG:  # a flood of small (even empty) frames
                raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
            if flags & _END_HEADERS:
                block = b"".join(self._cont_block)
                self._cont_block = []
                self._cont_stream = 0
                self._cont_size = 0
                self._headers(stream_id, block, self._cont_end_stream, events)
            return
        if ftype == _DATA:
            self._receive_data(flags, stream_id, payload, events)
        elif ftype == _HEADERS:
            self._receive_headers(flags, stream_id, payload, events)
        elif ftype == _WINDOW_UPDATE:
            self._receive_window_update(stream_id, payload, events)
        elif ftype == _RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
            if stream_id == 0 or self._idle(stream_id):
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on stream 0 or an idle stream")
            if self.streams.pop(stream_id, None) is not None:
                events.append(StreamReset(stream_id, _U32.unpack(payload)[0], True))
        elif ftype == _SETTINGS:
            self._receive_settings(flags, stream_id, payload, events)
        elif ftype == _PING:
            if len(payload) != 8:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "PING must be 8 bytes")
            if stream_id:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
            if flags & _ACK:
                events.append(PingAckReceived())
            else:
                self._frame(_PING, _ACK, 0, payload)
                events.append(PingReceived())
        elif ftype == _PRIORITY:
            if len(payload) != 5:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "PRIORITY must be 5 bytes")
            if stream_id == 0:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
            # RFC 7540 §5.3.1 made this a stream error; like h2, turnout makes it a connection
            # error (§5.4: any stream error may be): the stream may be idle, where no
            # RST_STREAM may be sent, and no working peer sends it.
            if _stream_dependency(payload, 0) == stream_id:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "a stream depending on itself")
            events.append(PriorityUpdated(stream_id))
        elif ftype == _GOAWAY:
            if stream_id:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            last, code = _GOAWAY_HEAD.unpack_from(payload)
            self.goaway_received = True
            events.append(ConnectionTerminated(code, last & MAX_STREAM_ID, payload[8:]))
        elif ftype == _CONTINUATION:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        elif ftype == _PUSH_PROMISE:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE is not enabled")
        # Frames of unknown types are ignored (RFC 9113 §4.1).

    def _idle(self, stream_id: int) -> bool:
        """Whether ``stream_id`` was never opened (frames other than HEADERS/PRIORITY on it are
        a connection error); a stream that is not in the table and not idle is closed."""
        if self.client_side:
            return stream_id >= self._next_stream_id or not stream_id & 1
        return stream_id > self._highest_inbound or not stream_id & 1

    def _reset_by_us(self, stream_id: int) -> bool:
        """Whether ``stream_id`` (closed) may be a stream we reset: frames the peer sent before
        it read our RST_STREAM are dropped (RFC 9113 §5.1), not taken for errors."""
        if stream_id <= self._resets_forgotten:
            return True  # it may have left the ring
        for reset in self._recent_resets:
            if reset == stream_id:
                return True
        return False

    def _remember_reset(self, stream_id: int) -> None:
        pos = self._recent_resets_next
        self._resets_forgotten = max(self._resets_forgotten, self._recent_resets[pos])
        self._recent_resets[pos] = stream_id
        self._recent_resets_next = (pos + 1) % _RECENT_RESETS

    def _strip_padding(self, flags: int, payload: bytes) -> tuple[int, int]:
        """Where the content of a padded frame starts and ends."""
        if not flags & _PADDED:
            return 0, len(payload)
        if not payload:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "padded frame without a pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "padding longer than the frame")
        return 1, len(payload) - pad

    def _receive_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        flow_len = len(payload)
        start, stop = self._strip_padding(flags, payload)
        self._connection_received(flow_len)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "DATA on an idle stream")
            if self._reset_by_us(stream_id):
                return  # sent before the peer read our RST_STREAM: dropped (counted above)
            # Not a stream we reset: the peer ended or reset it itself (or skipped its id), so
            # it knows the stream is closed. §6.1 asks for a stream error, but the stream is
            # gone: one RST_STREAM per such frame would be output a peer drives at will, so
            # it is a connection error, as §5.1 allows on a closed stream.
            raise _ConnectionError(ErrorCodes.STREAM_CLOSED, "DATA on a closed stream")
        if stream.recv_closed or not stream.head_received:
            self._stream_error(stream, ErrorCodes.STREAM_CLOSED if stream.recv_closed else ErrorCodes.PROTOCOL_ERROR,
                               events)
            return
        stream.recv_window -= flow_len
        if stream.recv_window < 0:
            self._stream_error(stream, ErrorCodes.FLOW_CONTROL_ERROR, events)
            return
        data = payload if start == 0 and stop == flow_len else payload[start:stop]
        ended = bool(flags & _END_STREAM)
        if stream.expected_length >= 0:
            stream.received_length += len(data)
            if stream.received_length > stream.expected_length or (
                    ended and stream.received_length != stream.expected_length):
                self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
                return
        events.append(DataReceived(stream_id, data, flow_len, ended))
        if ended:
            self._recv_closed(stream)

    def _receive_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = self._strip_padding(flags, payload)
        if flags & _PRIORITY_FLAG:
            start += 5
            if start > stop:
                if start <= len(payload):  # the fields fit: the padding is what is too long (§6.2)
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "padding longer than the frame")
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _stream_dependency(payload, start - 5) == stream_id:  # as for PRIORITY (below)
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "a stream depending on itself")
        block = payload[start:stop]
        if flags & _END_HEADERS:
            self._headers(stream_id, block, bool(flags & _END_STREAM), events)
            return
        if len(block) > self._max_block:
            raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large")
        self._cont_stream = stream_id
        self._cont_end_stream = bool(flags & _END_STREAM)
        self._cont_block = [block]
        self._cont_size = len(block)

    def _headers(self, stream_id: int, block: bytes, end_stream: bool, events: list[Event]) -> None:
        # Decoded first, whatever becomes of it: the decoder's table must follow the peer's.
        try:
            headers: Headers = self._decoder.decode(block)  # type: ignore[assignment]
        except OversizedHeaderListError:
            raise _ConnectionError(ErrorCodes.ENHANCE_YOUR_CALM, "header list too large") from None
        except HPACKError:
            raise _ConnectionError(ErrorCodes.COMPRESSION_ERROR, "invalid header block") from None
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self._idle(stream_id):
                if self._reset_by_us(stream_id):
                    return  # sent before the peer read our RST_STREAM: dropped (the block was decoded)
                if stream_id < self._inbound_run_start:  # below an id the peer skipped to
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "HEADERS on a stream id lower than one opened")
                raise _ConnectionError(ErrorCodes.STREAM_CLOSED, "HEADERS on a closed stream")
            if self.client_side or not stream_id & 1:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "HEADERS opening a stream the peer may not open")
            if stream_id > self._highest_inbound + 2:
                self._inbound_run_start = stream_id  # the ids in between were skipped
            self._highest_inbound = stream_id
            stream = _Stream(stream_id, self._send_initial_window, self._recv_initial_window)
            stream.head_received = True
            self.streams[stream_id] = stream
            events.append(RequestReceived(stream_id, headers, end_stream))
            if end_stream:
                stream.recv_closed = True
            return
        if stream.recv_closed:
            self._stream_error(stream, ErrorCodes.STREAM_CLOSED, events)
            return
        if stream.head_received:  # trailers: they end the stream, and carry no pseudo-fields
            if not end_stream or any(header[0][:1] == b":" for header in headers):
                self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
                return
            if stream.expected_length >= 0 and stream.received_length != stream.expected_length:
                self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
                return
            events.append(TrailersReceived(stream_id, headers))
            self._recv_closed(stream)
            return
        # Client side: a response head.
        status = _response_status(headers)
        if status < 0 or (status < 200 and end_stream) or status == 101:
            self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
            return
        if status < 200:
            events.append(InformationalResponseReceived(stream_id, headers))
            return
        stream.head_received = True
        length = _content_length(headers)
        # A response to HEAD, a 204 or a 304 has no body whatever its content-length says.
        stream.expected_length = -1 if length >= 0 and (stream.head_request or status in (204, 304)) else length
        if stream.expected_length == -2 or (end_stream and stream.expected_length > 0):
            self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
            return
        events.append(ResponseReceived(stream_id, headers, end_stream))
        if end_stream:
            self._recv_closed(stream)

    def _receive_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = _U32.unpack(payload)[0] & _MAX_WINDOW
        if stream_id == 0:
            if not increment:
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._conn_send_window += increment
            if self._conn_send_window > _MAX_WINDOW:
                raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowUpdated(0, increment))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._idle(stream_id):
                raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._stream_error(stream, ErrorCodes.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > _MAX_WINDOW:
            self._stream_error(stream, ErrorCodes.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id, increment))

    def _receive_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            delta = self._local_initial_window - self._recv_initial_window
            if delta:
                self._recv_initial_window = self._local_initial_window
                for stream in self.streams.values():
                    stream.recv_window += delta
            events.append(SettingsAcknowledged())
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        for offset in range(0, len(payload), 6):
            ident = (payload[offset] << 8) | payload[offset + 1]
            value = _U32.unpack_from(payload, offset + 2)[0]
            if ident == _HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, _ENCODER_TABLE_CAP)
            elif ident == _ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            elif ident == _MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif ident == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._send_initial_window
                self._send_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise _ConnectionError(ErrorCodes.FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif ident == _MAX_FRAME_SIZE_ID:
                if value < _DEFAULT_FRAME_SIZE or value > _MAX_FRAME_SIZE:
                    raise _ConnectionError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.max_outbound_frame_size = value
            # SETTINGS_MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored (§6.5.2).
        self._frame(_SETTINGS, _ACK, 0, b"")
        events.append(RemoteSettingsChanged())

    # ------------------------------------------------------------------ stream states

    def _send_closed(self, stream: _Stream) -> None:
        stream.send_closed = True
        if stream.recv_closed:
            del self.streams[stream.stream_id]

    def _recv_closed(self, stream: _Stream) -> None:
        stream.recv_closed = True
        if stream.send_closed:
            del self.streams[stream.stream_id]

    def _stream_error(self, stream: _Stream, code: int, events: list[Event]) -> None:
        """RST_STREAM for a stream error, reported as a reset so the owner cleans up."""
        del self.streams[stream.stream_id]
        self._frame(_RST_STREAM, 0, stream.stream_id, _U32.pack(code))
        self._remember_reset(stream.stream_id)
        events.append(StreamReset(stream.stream_id, code, False))


def _stream_dependency(payload: bytes, pos: int) -> int:
    """The stream a PRIORITY frame, or a HEADERS frame's priority fields, at ``pos`` depend on."""
    return ((payload[pos] & 0x7F) << 24) | (payload[pos + 1] << 16) | (payload[pos + 2] << 8) | payload[pos + 3]


def _response_status(headers: Headers) -> int:
    """A response head's status if the head is well-formed (RFC 9113 §8.3.2, §8.2), else -1."""
    status = -1
    regular = False
    for header in headers:
        name = header[0]
        value = header[1]
        if not name:
            return -1
        if name[0] == 58:  # ":"
            if name != b":status" or status != -1 or regular or len(value) != 3 or not value.isdigit():
                return -1
            status = int(value)
            continue
        regular = True
        if name in CONNECTION_SPECIFIC or not valid_name(name):
            return -1
        if not valid_value(value):
            return -1
    return status


def valid_name(name: bytes) -> bool:
    """Whether a field name is a lower-case token (RFC 9110 §5.1, RFC 9113 §8.2.1)."""
    if name in _KNOWN_NAMES:
        return True
    if _NAME.fullmatch(name) is None:
        return False
    if len(_KNOWN_NAMES) < _KNOWN_NAMES_MAX:
        _KNOWN_NAMES.add(name)
    return True


def valid_value(value: bytes) -> bool:
    """Whether a field value is allowed (RFC 9113 §8.2.1): no NUL, CR or LF, no space or tab
    at either end."""
    # Ints, not one-byte strings: bytes.__contains__ takes an int straight to memchr, and
    # tries (and fails, raising inside) to read a bytes argument as an int first.
    if 13 in value or 10 in value or 0 in value:
        return False
    return not value or (value[0] != 32 and value[0] != 9 and value[-1] != 32 and value[-1] != 9)


def preface_kind(data: bytes, max_line: int) -> int:
    """What a cleartext connection that starts with ``data`` speaks, for a port that takes
    both HTTP/1.1 and HTTP/2 with prior knowledge: ``PREFACE_HTTP2``, ``PREFACE_HTTP1``,
    ``PREFACE_INVALID`` (hand it to HTTP/2 too: the engine answers GOAWAY PROTOCOL_ERROR,
    RFC 9113 §3.4) or ``PREFACE_PARTIAL`` (read more). ``max_line``: the longest HTTP/1.1
    request line; a line longer than that is HTTP/1.1's to refuse.

    An HTTP/1.x request line always holds a "/": in its version ("HTTP/1.1") or, without
    one, in its target ("GET /"). A first line that ends without one is no HTTP/1 request,
    however malformed: it is taken for an invalid preface (h2spec http2/3.5 #2 sends
    "INVALID CONNECTION PREFACE"). Anything with a "/" on its first line, a near preface
    included, is left to HTTP/1.1, which refuses what it cannot parse with a 400."""
    if data.startswith(PREFACE):
        return PREFACE_HTTP2
    if PREFACE.startswith(data):
        return PREFACE_PARTIAL
    start = 0
    end = len(data)
    while start < end and (data[start] == 13 or data[start] == 10):
        start += 1  # empty lines before a request line are allowed (RFC 9112 §2.2)
    line_end = data.find(b"\n", start)
    slash = data.find(b"/", start, end if line_end < 0 else line_end)
    if slash >= 0:
        return PREFACE_HTTP1
    if line_end >= 0:
        return PREFACE_INVALID
    return PREFACE_PARTIAL if end <= max_line else PREFACE_HTTP1


def _content_length(headers: Headers) -> int:
    """The content-length a head declares: -1 for none, -2 for an invalid or conflicting one."""
    length = -1
    for header in headers:
        if header[0] == b"content-length":
            value = header[1]
            # Bounded before int(), which refuses more than 4,300 digits with a ValueError.
            if len(value) > MAX_LENGTH_DIGITS or not value.isdigit() or (length != -1 and int(value) != length):
                return -2
            length = int(value)
    return length
