"""Where a routing key may be found (``KeySource``) and a key found there (``FoundKey``).

Kept apart from ``keys.py`` (which reads requests) so that ``RequestHead`` can carry the key
a decision found without the two modules importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE_KINDS = ("baggage", "tracestate", "ot-baggage", "uberctx", "header", "query", "cookie")
# Sources a browser or link carries; the data plane copies such a key into the
# forwarded baggage so the service propagates it to the next hop.
PROPAGATE_KINDS = frozenset({"query", "cookie", "header"})


@dataclass(frozen=True, slots=True)
class KeySource:
    """One place a routing key may be found: a kind and the names looked up there."""

    kind: str
    names: tuple[str, ...]

    @property
    def propagate(self) -> bool:
        """Whether a key found here should be copied into the forwarded baggage."""
        return self.kind in PROPAGATE_KINDS

    def describe(self, name: str) -> str:
        """Human form of where a key was found, e.g. ``baggage member turnout-session``."""
        if self.kind == "baggage":
            return "baggage member " + name
        if self.kind == "tracestate":
            return "tracestate member " + name
        if self.kind in ("ot-baggage", "uberctx"):
            return "header " + self.kind + "-" + name
        if self.kind == "header":
            return "header " + name
        if self.kind == "query":
            return "query parameter " + name
        return "cookie " + name


class FoundKey:
    """A routing key and where it came from (a plain slotted class: made per request)."""

    __slots__ = ("value", "source", "name")

    def __init__(self, value: str, source: KeySource, name: str) -> None:
        self.value = value
        self.source = source
        self.name = name

    def __repr__(self) -> str:
        return f"FoundKey({self.value!r}, {self.where})"

    @property
    def where(self) -> str:
        """Human form of the place it was found."""
        return self.source.describe(self.name)
