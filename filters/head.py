"""The request head a routing decision sees, the same for HTTP/1.1 and HTTP/2."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from filters.baggage import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, baggage_values

if TYPE_CHECKING:
    from filters.sources import FoundKey


class RequestHead:
    """Method, request target and headers of one request.

    ``headers`` maps a lower-case name to the value of every line with that name joined
    with ``", "`` (``"; "`` for ``cookie``, as HTTP/2 joins cookie crumbs). Values are
    ``str``; the data plane decodes header bytes as latin-1 so nothing is lost.
    ``target`` is the origin-form target: path plus an optional ``?query``.
    ``found_key`` is set by ``Snapshot.decide``: the routing key it found, if any.

    The data plane gives the fields as received instead (``raw``: lower-case byte names to
    byte values, no name repeated; ``host``: the authority when it is not among them):
    a decision reads a handful of headers, so ``header`` decodes only those, and
    ``headers`` is built only when something needs them all.
    """

    __slots__ = ("method", "target", "_headers", "_raw", "_host", "found_key", "_baggage", "_block")

    def __init__(self, method: str, target: str, headers: Mapping[str, str] | None = None, *,
                 raw: dict[bytes, bytes] | None = None, host: str | None = None) -> None:
        self.method = method
        self.target = target
        self._headers = headers
        self._raw = raw
        self._host = host
        self.found_key: FoundKey | None = None
        self._baggage: dict[str, str] | None = None
        self._block: str | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """Every header by lower-case name (built on first use from ``raw``)."""
        headers = self._headers
        if headers is None:
            raw = self._raw
            decoded = joined_fields([], raw) if raw else {}
            if self._host is not None and "host" not in decoded:
                decoded["host"] = self._host
            headers = self._headers = decoded
        return headers

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case), or None; decodes only this one."""
        headers = self._headers
        if headers is not None:
            return headers.get(name)
        raw = self._raw
        value = raw.get(name.encode("latin-1")) if raw is not None else None
        if value is None:
            return self._host if name == "host" else None
        return value.decode("latin-1")

    @classmethod
    def from_pairs(
        cls, method: str, target: str, pairs: Iterable[tuple[str, str]]
    ) -> RequestHead:
        """Build a head from header lines in arrival order, combining repeated names."""
        headers: dict[str, str] = {}
        for raw_name, value in pairs:
            name = raw_name.lower()
            prev = headers.get(name)
            if prev is None:
                headers[name] = value
            else:
                headers[name] = prev + ("; " if name == "cookie" else ", ") + value
        return cls(method, target, headers)

    @property
    def path(self) -> str:
        """The target without its query string."""
        target = self.target
        q = target.find("?")
        return target if q == -1 else target[:q]

    @property
    def query(self) -> str | None:
        """The raw query string after ``?``, or ``None`` when there is none."""
        target = self.target
        q = target.find("?")
        return None if q == -1 else target[q + 1 :]

    def header_block(self) -> str:
        """Every header as a ``name: value`` line, joined with ``\\n`` (built once, cached).

        mirrord-style header filters search this block; values never contain a newline
        (the data plane refuses CR and LF in values), so a line is exactly one header.
        """
        if self._block is None:
            self._block = "\n".join([name + ": " + value for name, value in self.headers.items()])
        return self._block

    def baggage(
        self, max_members: int = DEFAULT_MAX_MEMBERS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> dict[str, str]:
        """All baggage members (decoded), parsed once per head and cached."""
        if self._baggage is None:
            header = self.header("baggage")
            self._baggage = baggage_values(header, max_members, max_bytes) if header else {}
        return self._baggage


def joined_fields(headers: list[tuple[bytes, bytes]], fields: dict[bytes, bytes] | None = None) -> dict[str, str]:
    """``RequestHead.headers`` from the fields as received (lower-case byte names, in order):
    latin-1 ``str`` names and values, repeated names joined as ``from_pairs`` joins them.
    ``fields``: the same fields by name, when no name repeats (then decoded in one go)."""
    if fields:
        # Names and values never contain LF (HTTP/1.1's scan.check_head, HTTP/2's field checks).
        names = b"\n".join(fields).decode("latin-1").split("\n")
        return dict(zip(names, b"\n".join(fields.values()).decode("latin-1").split("\n"), strict=True))
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        prev = out.get(name)
        if prev is None:
            out[name] = value
        else:
            out[name] = prev + ("; " if name == "cookie" else ", ") + value
    return out
