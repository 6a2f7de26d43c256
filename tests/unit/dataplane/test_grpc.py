"""``grpc-timeout`` values: at most 8 digits and a unit (gRPC over HTTP/2, "Requests")."""

from __future__ import annotations

import pytest

from dataplane.http2.grpc import parse_grpc_timeout


@pytest.mark.parametrize(("value", "seconds"), [
    (b"1S", 1.0), (b"2H", 7200.0), (b"3M", 180.0), (b"250m", 0.25), (b"5u", 5e-6), (b"7n", 7e-9),
    (b"99999999S", 99999999.0), (b"00000001m", 1e-3),
])
def test_valid_timeouts(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    b"", b"S", b"1", b"1s", b"1x", b"-1S", b"+1S", b"1.5S", b" 1S", b"123456789S", b"1" * 4301 + b"S",
    "\u0661S".encode(),
], ids=["empty", "unit-only", "no-unit", "lower-s", "unknown-unit", "minus", "plus", "decimal", "space",
        "9-digits", "4301-digits", "arabic-digit"])
def test_invalid_timeouts_are_none_never_an_exception(value: bytes) -> None:
    # 4,301 digits are more than int() converts: the length is checked first.
    assert parse_grpc_timeout(value) is None
