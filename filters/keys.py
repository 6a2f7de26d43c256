"""Routing-key sources: where in a request the session's key may travel.

Sources are tried in the configured order and the first one that yields a non-empty
value wins. The defaults read the W3C ``baggage`` member ``turnout-session``, then a
``turnout`` member of ``tracestate``, then the OpenTracing (``ot-baggage-*``) and Jaeger
(``uberctx-*``) forms. A plain header, a query parameter and a cookie are opt-in: they
are the forms a browser or a shared preview link can carry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

from filters.baggage import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, MemberExtractor, baggage_values
from filters.errors import Problem, ValidationError
from filters.head import RequestHead
from filters.sources import SOURCE_KINDS, FoundKey, KeySource

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_NAMES_PER_SOURCE = 16  # a handful of aliases; more is a configuration mistake


DEFAULT_SOURCES = (
    KeySource("baggage", ("turnout-session",)),
    KeySource("tracestate", ("turnout",)),
    KeySource("ot-baggage", ("turnout-session",)),
    KeySource("uberctx", ("turnout-session",)),
)


@dataclass(frozen=True)
class KeyConfig:
    """Which sources to read, in order, and the baggage limits to parse them with."""

    sources: tuple[KeySource, ...] = DEFAULT_SOURCES
    baggage_max_members: int = DEFAULT_MAX_MEMBERS
    baggage_max_bytes: int = DEFAULT_MAX_BYTES

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as accepted by ``parse_key_config``."""
        return {
            "key_sources": [{"from": s.kind, "names": list(s.names)} for s in self.sources],
            "baggage_max_members": self.baggage_max_members,
            "baggage_max_bytes": self.baggage_max_bytes,
        }


def parse_key_config(spec: Mapping[str, Any] | None, field_path: str = "routing") -> KeyConfig:
    """Validate the key part of a ``routing`` section.

    Accepts ``key_sources: [{from: KIND, names: [...]}, ...]``, or the shorthand
    ``baggage_keys: [...]`` which replaces the names of the default baggage source.
    Keys other than these are left for the caller to validate.
    """
    spec = spec or {}
    problems: list[Problem] = []
    sources = list(DEFAULT_SOURCES)
    if "key_sources" in spec and "baggage_keys" in spec:
        problems.append(Problem(field_path, "give key_sources or baggage_keys, not both"))
    elif "key_sources" in spec:
        sources = _parse_sources(spec["key_sources"], field_path + ".key_sources", problems)
    elif "baggage_keys" in spec:
        names = _parse_names(spec["baggage_keys"], field_path + ".baggage_keys", "baggage", problems)
        sources[0] = KeySource("baggage", names)
    members = _positive_int(spec, "baggage_max_members", DEFAULT_MAX_MEMBERS, field_path, problems)
    max_bytes = _positive_int(spec, "baggage_max_bytes", DEFAULT_MAX_BYTES, field_path, problems)
    if problems:
        raise ValidationError(problems)
    return KeyConfig(tuple(sources), members, max_bytes)


def _positive_int(
    spec: Mapping[str, Any], name: str, default: int, field_path: str, problems: list[Problem]
) -> int:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(Problem(f"{field_path}.{name}", "must be a positive integer"))
        return default
    return value


def _parse_sources(spec: Any, field_path: str, problems: list[Problem]) -> list[KeySource]:
    if not isinstance(spec, list) or not spec:
        problems.append(Problem(field_path, "must be a non-empty list of {from, names}"))
        return []
    sources = []
    for i, item in enumerate(spec):
        where = f"{field_path}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(Problem(where, "must be a mapping with 'from' and 'names'"))
            continue
        unknown = set(item) - {"from", "names"}
        if unknown:
            problems.append(Problem(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown)))))
        kind = item.get("from")
        if kind not in SOURCE_KINDS:
            problems.append(Problem(where + ".from", "must be one of " + ", ".join(SOURCE_KINDS)))
            continue
        names = _parse_names(item.get("names"), where + ".names", kind, problems)
        sources.append(KeySource(kind, names))
    return sources


def _parse_names(spec: Any, field_path: str, kind: str, problems: list[Problem]) -> tuple[str, ...]:
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not spec or len(spec) > _MAX_NAMES_PER_SOURCE:
        problems.append(
            Problem(field_path, f"must be a list of 1 to {_MAX_NAMES_PER_SOURCE} names")
        )
        return ()
    names = []
    for i, name in enumerate(spec):
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
            problems.append(Problem(f"{field_path}[{i}]", "must be a non-empty HTTP token"))
            continue
        # Header-borne names are matched against lower-cased header names.
        names.append(name.lower() if kind in ("ot-baggage", "uberctx", "header") else name)
    return tuple(names)


Finder = Callable[[RequestHead], "tuple[str, str] | None"]


class KeyExtractor:
    """Compiled key sources: ``extract(head)`` returns the routing key, or ``None``."""

    __slots__ = ("config", "_finders")

    def __init__(self, config: KeyConfig) -> None:
        self.config = config
        self._finders: tuple[tuple[KeySource, Finder], ...] = tuple(
            (source, _make_finder(source, config)) for source in config.sources
        )

    def extract(self, head: RequestHead) -> FoundKey | None:
        """The first non-empty key in source order, with where it was found."""
        for source, finder in self._finders:
            found = finder(head)
            if found is not None:
                return FoundKey(found[1], source, found[0])
        return None

    def explain(self, head: RequestHead) -> list[dict[str, Any]]:
        """Every source in order, with what it held (for ``/explain``)."""
        report = []
        for source, finder in self._finders:
            found = finder(head)
            report.append(
                {
                    "source": source.kind,
                    "names": list(source.names),
                    "found": None
                    if found is None
                    else {"where": source.describe(found[0]), "value": found[1]},
                }
            )
        return report


def _make_finder(source: KeySource, config: KeyConfig) -> Finder:
    names = source.names
    if source.kind == "baggage":
        members = MemberExtractor(names, config.baggage_max_members, config.baggage_max_bytes)

        def find_baggage(head: RequestHead) -> tuple[str, str] | None:
            header = head.header("baggage")
            if not header:
                return None
            found = members.extract(header)
            if found is None or found[1]:
                return found
            # The first configured member present is empty: a later name may still hold
            # a key, as for every other source kind (rare, so the full parse is fine).
            values = baggage_values(header, config.baggage_max_members, config.baggage_max_bytes)
            for name in names:
                if values.get(name):
                    return name, values[name]
            return None

        return find_baggage
    if source.kind == "tracestate":
        return lambda head: _find_list_member(head.header("tracestate"), names, ",", "=", None)
    if source.kind == "cookie":
        return lambda head: _find_list_member(head.header("cookie"), names, ";", "=", unquote)
    if source.kind == "query":
        return lambda head: _find_list_member(head.query, names, "&", "=", unquote_plus)
    prefix = "" if source.kind == "header" else source.kind + "-"
    decode = None if source.kind == "header" else unquote
    # Head header names are lower case; a KeySource built directly may not be.
    header_names = tuple((name, prefix + name.lower()) for name in names)

    def find_header(head: RequestHead) -> tuple[str, str] | None:
        for name, header_name in header_names:
            value = head.header(header_name)
            if value:
                value = value.strip(" \t")
                if decode is not None and "%" in value:
                    value = decode(value)
                if value:
                    return name, value
        return None

    return find_header


def _find_list_member(
    text: str | None,
    names: Sequence[str],
    separator: str,
    assign: str,
    decode: Callable[[str], str] | None,
) -> tuple[str, str] | None:
    """First ``name=value`` element of a separated list, for the first name present."""
    if not text:
        return None
    for name in names:
        if name not in text:
            continue
        for element in text.split(separator):
            k, eq, v = element.partition(assign)
            if eq and k.strip(" \t") == name:
                v = v.strip(" \t")
                if separator == ";" and len(v) >= 2 and v[0] == '"' and v[-1] == '"':  # cookie-value DQUOTEs
                    v = v[1:-1]
                if decode is not None and ("%" in v or "+" in v):
                    v = decode(v)
                if v:
                    return name, v
    return None
