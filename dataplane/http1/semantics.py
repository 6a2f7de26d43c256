"""turnout's validation layer over both codecs: framing, Host, methods, hop-by-hop, upgrades.

``read_request`` and ``read_response`` are the one way a checked head (``scan.check_head``,
which also drops the whitespace after field values) becomes a ``Request`` or a
``Response``: the runtime's codec parses, and ``plan_request`` / ``plan_response`` decide how the body is
framed, whether the connection stays open, and the header fields to forward (rebuilt from
parsed fields, never the raw head). Anything a second parser could read differently is
refused (RFC 9112 section 6.3).

The two codecs do not refuse the same bytes for the same reasons. So when a codec refuses a
head, turnout reads the head itself (it is known to be well formed byte by byte) and applies
the same rules: whichever codec runs, a head is refused with the same status and cause, and
one both codecs accept is forwarded as the same bytes. ``fuzz/targets/http1_differential.py``
checks that.
"""

from __future__ import annotations

import re

from dataplane.errors import HttpError
from dataplane.http1.codec import HeadCodec, RequestHead1, ResponseHead1
from dataplane.http1.scan import TOKEN
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, Request, Response, field_lines

# Removed before forwarding in either direction (RFC 9110 section 7.6.1, and what Envoy
# strips): they describe one hop, not the message.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
                        b"upgrade"})
# A Connection header may not nominate these: removing them would change framing or routing.
_PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# Connection tokens that are options, not names of fields present in the message.
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b"upgrade"})
# Rewritten by the proxy from the plan (framing) or added back only when it applies.
_REFRAMED = frozenset({b"content-length", b"expect"})
_NOT_FORWARDED = HOP_BY_HOP | _REFRAMED
_FRAMING_OR_HOP = HOP_BY_HOP | {b"content-length"}
# Request fields that send a head through the field-by-field classification.
_RARE_IN_REQUESTS = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
# Methods forwarded (RFC 9110 section 9, PATCH, WebDAV and the other registered methods llhttp
# reads); any other token, lower-case spellings included (methods are case-sensitive), is 501.
METHODS = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"REPORT",
    b"MKCALENDAR", b"ACL", b"BIND", b"REBIND", b"UNBIND", b"MKACTIVITY", b"CHECKOUT", b"MERGE",
    b"PURGE", b"LINK", b"UNLINK", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"SOURCE", b"QUERY",
})
_FIELD_NAME = re.compile(TOKEN)
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: (.*))?", re.S)
# host [":" port], host being a reg-name, IPv4 or [IPv6] (RFC 3986 section 3.2.2).
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")

def _tokens(value: bytes) -> list[bytes]:
    single = _SINGLE_TOKENS.get(value)
    if single is not None:
        return [single]
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


# Connection values nearly every message carries, as they are spelled in practice.
_SINGLE_TOKENS = {v: v.lower() for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")}


def _bad(reason: str, cause: str = "bad_request") -> HttpError:
    return HttpError(400, reason, cause)


def read_request(codec: HeadCodec, head: bytes) -> Request:
    """A request head as ``scan.check_head`` returned it, parsed by ``codec`` and validated;
    raises ``HttpError`` (400, 405, 417, 501) when refused."""
    try:
        parsed = codec.parse_request(head)
    except HttpError as refused:
        raise _request_refusal(head, refused) from None
    return plan_request(parsed)


def read_response(codec: HeadCodec, head: bytes, request_method: bytes) -> Response:
    """A response head as ``scan.check_head`` returned it, parsed by ``codec`` and validated;
    raises ``HttpError`` (502) when refused."""
    try:
        parsed = codec.parse_response(head)
    except HttpError as refused:
        raise _response_refusal(head, request_method, refused) from None
    return plan_response(parsed, request_method)


def _request_refusal(head: bytes, refused: HttpError) -> HttpError:
    """What to answer a request head the codec refused: turnout's own rules applied to its
    own reading of the head name the problem when they find one, whichever codec refused."""
    first = head.find(b"\r\n")
    parts = head[:first].split(b" ")
    fields = _own_fields(head, first)
    if len(parts) == 3 and fields is not None:
        try:
            plan_request(RequestHead1(parts[0], parts[1], parts[2][5:], fields))
        except HttpError as exc:
            return exc
    return HttpError(400, refused.reason, "bad_request")


def _response_refusal(head: bytes, request_method: bytes, refused: HttpError) -> HttpError:
    """``_request_refusal`` for a response head."""
    first = head.find(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(head, 0, first)
    fields = _own_fields(head, first)
    if status_line is not None and fields is not None:
        version, status, reason = status_line.groups()
        try:
            plan_response(ResponseHead1(int(status), reason or b"", version, fields), request_method)
        except HttpError as exc:
            return exc
    return HttpError(502, refused.reason, "upstream_bad_head")


def _own_fields(head: bytes, first: int) -> list[tuple[bytes, bytes]] | None:
    """The field lines of a checked head as both codecs report them (names lower-cased,
    values without surrounding whitespace), or None for a line that is not a field."""
    fields: list[tuple[bytes, bytes]] = []
    start = first + 2
    end = len(head) - 4
    if end <= start:
        return fields  # no field lines (and mypyc's bytes slice refuses start > end)
    for line in head[start:end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            return None
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def plan_request(head: RequestHead1) -> Request:
    """Validate a request head; raises ``HttpError`` (400, 405, 417, 501) when refused."""
    method = head.method
    version = head.version
    target = head.target
    if method not in METHODS:
        if method == b"CONNECT":
            raise HttpError(405, "CONNECT is not supported", "method_not_allowed")
        raise HttpError(501, "method not implemented: " + method.decode("latin-1"), "method_not_implemented")
    absolute_authority = None
    if 35 in target:  # "#" (an int goes straight to memchr; a one-byte string is tried as an int first)
        raise _bad("fragment in request target", "bad_target")
    if target[:1] != b"/":
        if target == b"*" and method == b"OPTIONS":
            pass
        else:
            absolute_authority, target = _absolute_form(target)
    headers = head.headers
    fields = dict(headers)
    codings: list[bytes] = []
    upgrade = expect = None
    if len(fields) == len(headers) and fields.keys().isdisjoint(_RARE_IN_REQUESTS):
        # The common case, no name repeated and no upgrade or chunked body: a few lookups
        # instead of comparing every name.
        host = fields.get(b"host")
        hosts = [] if host is None else [host]
        length = fields.get(b"content-length")
        lengths = [] if length is None else [length]
        tokens = fields.get(b"connection")
        connection = [] if tokens is None else _tokens(tokens)
    else:
        hosts = []
        lengths = []
        connection = []
        for name, value in headers:
            if name == b"host":
                hosts.append(value)
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
            elif name == b"connection":
                connection.extend(_tokens(value))
            elif name == b"upgrade":
                upgrade = value
            elif name == b"expect":
                if expect is not None:
                    raise _bad("repeated Expect header")
                expect = value
    if len(hosts) > 1:
        raise _bad("more than one Host header", "bad_host")
    if hosts and _AUTHORITY.fullmatch(hosts[0]) is None:
        raise _bad("invalid Host header", "bad_host")
    if version == b"1.1" and not hosts:
        raise _bad("missing Host header", "bad_host")  # RFC 9112 section 3.2, absolute-form too
    if absolute_authority is not None:
        authority = absolute_authority  # RFC 9112 section 3.2.2: the target's authority wins
    elif hosts:
        authority = hosts[0]
    elif version == b"1.1":
        raise _bad("missing Host header", "bad_host")
    else:
        authority = b""
    if version == b"1.1" and not authority:
        raise _bad("empty Host header", "bad_host")
    for token in connection:
        if token in _PROTECTED:
            raise _bad("Connection header names " + token.decode("latin-1"), "bad_connection")
    body, content_length = _request_framing(lengths, codings, version) if lengths or codings else (BODY_NONE, 0)
    expect_continue = False
    if expect is not None:
        if expect.strip(b" \t").lower() != b"100-continue":
            raise HttpError(417, "only 'Expect: 100-continue' is supported", "expectation_failed")
        expect_continue = version == b"1.1"
    websocket = (
        upgrade is not None
        and version == b"1.1"
        and method == b"GET"
        and b"upgrade" in connection
        and b"websocket" in _tokens(upgrade)
    )
    keep_alive = b"close" not in connection if version == b"1.1" else b"keep-alive" in connection
    drop = _NOT_FORWARDED.union(connection) if connection else _NOT_FORWARDED
    forwarded_fields = None
    if absolute_authority is None:
        # Host, when present, already is the authority.
        if fields.keys().isdisjoint(drop):
            forward = headers
            if len(fields) == len(headers):
                forwarded_fields = fields
        else:
            forward = [f for f in headers if f[0] not in drop]
    else:
        forward = [(name, authority if name == b"host" else value) for name, value in headers if name not in drop]
    if absolute_authority is not None and not hosts:
        forward.append((b"host", absolute_authority))
    if websocket:
        forward.append((b"connection", b"upgrade"))
        forward.append((b"upgrade", upgrade))  # type: ignore[arg-type]
    if expect_continue:
        forward.append((b"expect", b"100-continue"))
    return Request(method, target, version, authority, forward, body, content_length, keep_alive,
                   expect_continue, websocket, forwarded_fields)


def _absolute_form(target: bytes) -> tuple[bytes, bytes]:
    lowered = target[:8].lower()
    if lowered.startswith(b"http://"):
        rest = target[7:]
    elif lowered.startswith(b"https://"):
        rest = target[8:]
    else:
        raise _bad("request target must be a path or an http(s) URI", "bad_target")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(x for x in (slash, query, len(rest)) if x != -1)
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority or _AUTHORITY.fullmatch(authority) is None or not authority:
        raise _bad("invalid authority in request target", "bad_target")
    if b"#" in path:
        raise _bad("fragment in request target", "bad_target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority.lower(), path


def _request_framing(lengths: list[bytes], codings: list[bytes], version: bytes) -> tuple[int, int]:
    if codings:
        if lengths:
            raise _bad("both Content-Length and Transfer-Encoding", "bad_framing")
        if version != b"1.1":
            raise _bad("Transfer-Encoding in an HTTP/1.0 request", "bad_framing")
        if len(codings) > 1:
            raise _bad("more than one Transfer-Encoding header", "bad_framing")
        coding = codings[0]
        if coding.lower() != b"chunked":
            tokens = _tokens(coding)
            # RFC 9112 section 6.3: chunked not last (or twice) leaves the length unknowable,
            # 400; codings before it turnout would have to undo, 501. A list with an empty
            # element is 400 too: parsers disagree on it (", chunked": llhttp reads chunked,
            # h11 refuses it).
            if (tokens[-1:] == [b"chunked"] and tokens.count(b"chunked") == 1
                    and len(tokens) == coding.count(b",") + 1):
                raise HttpError(501, "unsupported transfer coding", "unsupported_coding")
            raise _bad("Transfer-Encoding must be exactly 'chunked'", "bad_framing")
        return BODY_CHUNKED, -1
    if lengths:
        if len(lengths) > 1:
            raise _bad("more than one Content-Length header", "bad_framing")
        if not (lengths[0].isdigit() and len(lengths[0]) <= 18):  # ASCII digits only, at most 18
            raise _bad("invalid Content-Length", "bad_framing")
        n = int(lengths[0])
        return (BODY_LENGTH, n) if n else (BODY_NONE, 0)
    return BODY_NONE, 0


def plan_response(head: ResponseHead1, request_method: bytes) -> Response:
    """Validate an upstream response head; raises ``HttpError`` (502) when refused."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade = b""
    headers = head.headers
    lines = []
    dropped = False
    # One pass: classify, and format the HTTP/1.1 lines (concatenation beats a join per field).
    for name, value in headers:
        if name in _FRAMING_OR_HOP:
            if name == b"content-length":
                lengths.append(value)  # forwarded: the body is passed on as it came
            else:
                if name == b"transfer-encoding":
                    codings.append(value)
                elif name == b"connection":
                    connection.extend(_tokens(value))
                elif name == b"upgrade":
                    upgrade = value
                dropped = True
                continue
        lines.append(name + b": " + value + b"\r\n")
    fields = [f for f in headers if f[0] not in HOP_BY_HOP] if dropped else headers
    status = head.status
    if status == 101 and (b"websocket" not in _tokens(upgrade) or b"upgrade" not in connection):
        # A 101 names the new protocol in Upgrade, and Upgrade in Connection (RFC 9110
        # sections 7.8 and 15.2.2); turnout asks for no protocol but WebSocket.
        raise HttpError(502, "upstream switched protocols without Upgrade: websocket and Connection: upgrade",
                        "upstream_bad_head")
    if codings and lengths:
        raise HttpError(502, "upstream sent both Content-Length and Transfer-Encoding", "upstream_bad_framing")
    if len(lengths) > 1:
        raise HttpError(502, "upstream sent more than one Content-Length", "upstream_bad_framing")
    if len(codings) > 1 or (codings and codings[0].lower() != b"chunked"):
        raise HttpError(502, "upstream sent an unsupported Transfer-Encoding", "upstream_bad_framing")
    if lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 18):
        raise HttpError(502, "upstream sent an invalid Content-Length", "upstream_bad_framing")
    keep_alive = b"close" not in connection if head.version == b"1.1" else b"keep-alive" in connection
    content_length = int(lengths[0]) if lengths else -1
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        body = BODY_NONE
    elif codings:
        body = BODY_CHUNKED
    elif lengths:
        body = BODY_LENGTH if content_length else BODY_NONE
    else:
        body = BODY_UNTIL_CLOSE
        keep_alive = False
    if connection and not _CONNECTION_OPTIONS.issuperset(connection):
        # Fields the Connection header names are removed too (rare: a second pass).
        drop = HOP_BY_HOP.union(connection)
        fields = [f for f in headers if f[0] not in drop]
        return Response(status, head.reason, fields, body, content_length, field_lines(fields), keep_alive)
    return Response(status, head.reason, fields, body, content_length, b"".join(lines), keep_alive)
