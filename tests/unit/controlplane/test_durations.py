"""Unit tests for controlplane.durations."""

from __future__ import annotations

import pytest

from controlplane.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d", 86400), ("1d2h3m4s", 93784),
    ("90", 90), ("1.5", 1.5), (" 2H ", 7200), ("0h5m", 300),
])
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2x", "30m1h", "1h1h", "-5", "1.5h", "0", "0s", "2 h", "inf", "nan"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.4, "0s"), (45, "45s"), (90, "1m30s"), (3600, "1h"), (5400, "1h30m"), (93784, "1d2h3m4s"),
])
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_round_trip() -> None:
    for seconds in (1, 59, 61, 3599, 3601, 86399, 90061):
        assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["1" * 5000, "1" * 5000 + "d", "9" * 400 + "d", "1." + "5" * 5000])
def test_parse_refuses_more_digits_than_any_duration_has(text: str) -> None:
    # 5,000 digits are more than int() converts (a ValueError about sys.set_int_max_str_digits);
    # 400 days' digits made float() overflow (an OverflowError, which escaped).
    with pytest.raises(ValueError, match="longer than any duration"):
        parse_duration(text)
