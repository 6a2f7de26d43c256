"""W3C Baggage (https://www.w3.org/TR/baggage/): a full parser and a routing-key fast path.

Grammar (W3C Baggage, section 3.3.1), with OWS = *( SP / HTAB )::

    baggage-string = list-member 0*179( OWS "," OWS list-member )
    list-member    = key OWS "=" OWS value *( OWS ";" OWS property )
    property       = key OWS "=" OWS value / key OWS
    key            = token                       ; RFC 7230 section 3.2.6
    value          = *baggage-octet              ; percent-encoded UTF-8

Rules this module keeps, and why:

* Several ``baggage`` header lines are one list joined with ``,`` (RFC 7230 section 3.2.2).
  Empty list elements (``a=1,,b=2``) are ignored, as RFC 7230 section 7 asks of recipients.
* A member that does not match the grammar, including one with a malformed property,
  is skipped on its own; the rest of the header still counts.
* Limits: the spec asks a platform to propagate at least 64 members and 8,192 bytes and
  never a part of a member. Members past ``max_members`` or ending past ``max_bytes``
  are dropped whole. Lengths are counted in characters of the latin-1 decoded header,
  which is its byte length.
* A key that appears twice resolves to its *last* valid member, as OpenTelemetry's
  propagators do; a service that re-serializes baggage with OpenTelemetry therefore
  forwards the same value turnout routed on.
* Hostile input never raises: every function here accepts any ``str``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

# W3C Baggage section 3.3.1 "Limits": at least 64 list-members and 8,192 bytes.
DEFAULT_MAX_MEMBERS = 64
DEFAULT_MAX_BYTES = 8192

_OWS = " \t"
# Occurrences of a key that are not its member (inside values, other keys, properties)
# before the fast path hands over to the linear full parse: each miss costs a scan, and a
# hostile header can repeat the key hundreds of times.
_MAX_FALSE_HITS = 8
_GIVE_UP = "\x00give-up"  # never a decoded value: NUL is not a baggage-octet
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_OCTETS = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_MEMBER_RE = re.compile(
    rf"[ \t]*({_TOKEN})[ \t]*=[ \t]*({_OCTETS})[ \t]*(;.*)?", re.DOTALL
)
_PROPERTY_RE = re.compile(rf"[ \t]*({_TOKEN})[ \t]*(?:=[ \t]*({_OCTETS})[ \t]*)?")
_TOKEN_RE = re.compile(_TOKEN)
_OCTETS_RE = re.compile(_OCTETS)


@dataclass(frozen=True, slots=True)
class BaggageMember:
    """One parsed list-member: key, percent-decoded value and its properties."""

    key: str
    value: str
    properties: tuple[tuple[str, str | None], ...] = ()


def decode_value(raw: str) -> str:
    """Percent-decode a baggage value; invalid UTF-8 becomes U+FFFD, as the spec asks."""
    return unquote(raw, errors="replace") if "%" in raw else raw


def _match_member(text: str) -> re.Match[str] | None:
    """The grammar match of one list-member, properties included; ``None`` if invalid."""
    m = _MEMBER_RE.fullmatch(text)
    if m is None:
        return None
    prop_text = m.group(3)
    if prop_text:
        for part in prop_text[1:].split(";"):
            if _PROPERTY_RE.fullmatch(part) is None:
                return None
    return m


def parse_member(text: str) -> BaggageMember | None:
    """Parse one list-member; ``None`` when it does not match the grammar."""
    m = _match_member(text)
    if m is None:
        return None
    key, raw_value, prop_text = m.groups()
    properties: tuple[tuple[str, str | None], ...] = ()
    if prop_text:
        props = []
        for part in prop_text[1:].split(";"):
            pm = _PROPERTY_RE.fullmatch(part)
            assert pm is not None  # checked by _match_member
            pkey, pval = pm.groups()
            props.append((pkey, None if pval is None else decode_value(pval)))
        properties = tuple(props)
    return BaggageMember(key, decode_value(raw_value), properties)


def join_lines(lines: str | Iterable[str]) -> str:
    """Combine several ``baggage`` header lines into one list, in order."""
    return lines if isinstance(lines, str) else ",".join(lines)


def parse_baggage(
    lines: str | Iterable[str],
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[BaggageMember]:
    """Parse baggage header line(s) into valid members, in order, within the limits."""
    header = join_lines(lines)
    members: list[BaggageMember] = []
    counted = 0
    offset = 0
    for piece in header.split(","):
        end = offset + len(piece)
        offset = end + 1
        if not piece.strip(_OWS):
            continue
        if counted >= max_members or end > max_bytes:
            break
        counted += 1
        member = parse_member(piece)
        if member is not None:
            members.append(member)
    return members


def baggage_values(
    lines: str | Iterable[str],
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, str]:
    """Key to decoded value; a repeated key keeps its last valid member."""
    return {m.key: m.value for m in parse_baggage(lines, max_members, max_bytes)}


class MemberExtractor:
    """Finds configured members in a baggage header without parsing the rest of it.

    ``extract`` returns the same answer as ``baggage_values`` would for the first
    configured key that is present, at a fraction of the cost: a substring search for
    each configured key, then the full grammar check on that one member only.
    """

    __slots__ = ("_keys", "_max_members", "_max_bytes", "_token_keys")

    def __init__(
        self,
        keys: Sequence[str],
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._keys = tuple(keys)
        self._max_members = max_members
        self._max_bytes = max_bytes
        # Keys a member can have at all; for these a bare "key=value" member is read
        # without the full member grammar.
        self._token_keys = frozenset(k for k in self._keys if _TOKEN_RE.fullmatch(k))

    @property
    def keys(self) -> tuple[str, ...]:
        """The member keys looked for, in priority order."""
        return self._keys

    def extract(self, header: str) -> tuple[str, str] | None:
        """``(key, decoded value)`` of the first configured key present, else ``None``."""
        if len(header) <= self._max_bytes and header.count(",") < self._max_members:
            for key in self._keys:
                if key not in header:  # the common case for aliases: one C-level scan
                    continue
                value = self._last_value(header, key, key in self._token_keys)
                if value is _GIVE_UP:
                    break
                if value is not None:
                    return key, value
            else:
                return None
        # Past the limits (which members count depends on the whole list), or a header
        # built to make the substring search slow: the full parse is linear.
        values = baggage_values(header, self._max_members, self._max_bytes)
        for key in self._keys:
            if key in values:
                return key, values[key]
        return None

    @staticmethod
    def _last_value(header: str, key: str, token: bool = False) -> str | None:
        if not key:
            # No member has an empty key (a token is 1+ characters), and the backwards
            # search below would never end: rfind("", 0, -1) finds the last position again.
            return None
        # Search from the end: the last valid member with this key wins.
        klen = len(key)
        pos = header.rfind(key)
        misses = 0
        while pos != -1:
            start = header.rfind(",", 0, pos) + 1
            if start == pos or not header[start:pos].strip(_OWS):
                end = header.find(",", pos)
                if token and start == pos and header[pos + klen : pos + klen + 1] == "=":
                    # The usual member, "key=value" with nothing around: the grammar below
                    # matches it exactly when the value is only baggage-octets.
                    raw = header[pos + klen + 1 :] if end == -1 else header[pos + klen + 1 : end]
                    if _OCTETS_RE.fullmatch(raw) is not None:
                        return unquote(raw, errors="replace") if "%" in raw else raw
                m = _match_member(header[start:] if end == -1 else header[start:end])
                # The token must be exactly the key: "keyx=" or "key;" is another member.
                if m is not None and m.group(1) == key:
                    raw = m.group(2)
                    return unquote(raw, errors="replace") if "%" in raw else raw
            misses += 1
            if misses > _MAX_FALSE_HITS:
                return _GIVE_UP
            pos = header.rfind(key, 0, pos + klen - 1)
        return None
