"""Human durations: ``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``, or plain seconds."""

from __future__ import annotations

import math
import re

_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# Units in decreasing order, each at most once: "1h30m" but not "30m1h" or "1h1h".
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_SECONDS_RE = re.compile(r"\d+(?:\.\d+)?")
# The longest duration text read: "1000000d23h59m59s" is 17 characters, plain seconds with
# a fraction a few more; anything longer is a mistake, or digits meant to overflow.
_MAX_CHARS = 32


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ``ValueError`` with the accepted forms."""
    text = text.strip().lower()
    if len(text) > _MAX_CHARS:  # bounded before int() and float(): 4,301 digits are a ValueError
        raise ValueError(f"{text[:_MAX_CHARS]!r}...: longer than any duration ({_MAX_CHARS} characters at most)")
    if _SECONDS_RE.fullmatch(text):
        seconds = float(text)
    else:
        match = _DURATION_RE.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 2h, 1h30m, 1d or plain seconds")
        seconds = float(sum(int(n) * _UNIT_S[unit] for n, unit in zip(match.groups(), "dhms", strict=True) if n))
    if not 0 < seconds < math.inf:
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form, to the second: ``1h30m``, ``2d3h``, ``45s``."""
    total = max(0, round(seconds))
    if total == 0:
        return "0s"
    parts = []
    for unit, size in _UNIT_S.items():
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
