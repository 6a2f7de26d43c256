"""gRPC over HTTP/2: the parts a proxy needs — ``grpc-timeout`` and trailers-only replies.

A trailers-only reply is one HEADERS frame with END_STREAM (gRPC over HTTP/2, "Responses"):
``:status 200``, ``content-type: application/grpc``, ``grpc-status``, ``grpc-message``.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

GRPC_DEADLINE_EXCEEDED = b"4"
GRPC_UNAVAILABLE = b"14"
# grpc-timeout units (gRPC over HTTP/2, "Requests"): hours down to nanoseconds.
_UNITS: Final = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (at most 8 digits and a unit), None if invalid."""
    if len(value) < 2 or len(value) > 9:
        return None
    digits = value[:-1]
    unit = _UNITS.get(value[-1])
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def trailers_only(code: bytes, message: str, error: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a trailers-only reply (``:status 200`` goes before them) carrying
    ``grpc-status`` ``code``.

    ``grpc-message`` is percent-encoded as the spec requires; ``x-turnout-error`` carries the
    same machine-readable cause as HTTP/1.1 replies.
    """
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", code),
        (b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]").encode("ascii")),
        (b"x-turnout-error", error),
    ]
