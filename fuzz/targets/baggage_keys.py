"""Routing-key extraction (filters/baggage.py, filters/keys.py, filters/sources.py) on
arbitrary heads: nothing may raise (hostile input is documented never to), and answers
that must agree do:

* ``MemberExtractor.extract`` (the fast path) gives what the full parse
  (``baggage_values``) gives for the first configured key present, within the same limits;
* a limited parse is a prefix of the unlimited one, never past ``max_members``;
* ``KeyExtractor.extract`` finds the same key, from the same place, on a head built from
  header lines (``RequestHead.from_pairs``) and on the data plane's head of fields as
  received (``raw`` bytes, or ``joined_fields`` when a name repeats); twice in a row; and
  ``explain`` reports it as the first source that holds a key.

The input (latin-1, as the data plane decodes heads) is a request target on its first
line, then ``name: value`` lines; a line without a colon is a ``baggage`` line.
"""

from __future__ import annotations

import re

from filters.baggage import MemberExtractor, baggage_values, parse_baggage
from filters.head import RequestHead, joined_fields
from filters.keys import DEFAULT_SOURCES, KeyConfig, KeyExtractor
from filters.sources import FoundKey, KeySource

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ALIASES = ("turnout-session", "sd-routing-key", "mirrord-session")
CONFIGS = (
    KeyConfig(),
    KeyConfig((KeySource("baggage", _ALIASES), KeySource("tracestate", ("turnout", "t2")),
               KeySource("ot-baggage", ("turnout-session",)), KeySource("uberctx", ("turnout-session",)),
               KeySource("header", ("x-turnout-session",)), KeySource("query", ("turnout-session", "k")),
               KeySource("cookie", ("turnout-session", "k")))),
    KeyConfig((KeySource("baggage", ("k", *_ALIASES)), *DEFAULT_SOURCES[1:]), baggage_max_members=3,
              baggage_max_bytes=40),
)


def _head_parts(text: str) -> tuple[str, list[tuple[str, str]]]:
    lines = text.split("\n")
    pairs = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        pairs.append((name.strip(), value.strip(" \t")) if colon else ("baggage", line))
    return lines[0], pairs


def _check_members(header: str, keys: tuple[str, ...], max_members: int, max_bytes: int) -> None:
    unlimited = parse_baggage(header, 1 << 30, 1 << 30)
    limited = parse_baggage(header, max_members, max_bytes)
    assert len(limited) <= max_members, f"{len(limited)} members past the limit of {max_members}"
    assert limited == unlimited[:len(limited)], "a limited parse that is not a prefix of the full one"
    for member in unlimited:
        assert _TOKEN.fullmatch(member.key), f"member key {member.key!r} is no token"
    values = baggage_values(header, max_members, max_bytes)
    expected = next(((key, values[key]) for key in keys if key in values), None)
    found = MemberExtractor(keys, max_members, max_bytes).extract(header)
    assert found == expected, f"fast path {found!r}, full parse {expected!r} for keys {keys!r}"


def _same(a: FoundKey | None, b: FoundKey | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.value, a.source, a.name) == (b.value, b.source, b.name)


def fuzz_one(data: bytes) -> None:
    """Extract keys from the head ``data`` describes, every way, and compare."""
    target, pairs = _head_parts(data.decode("latin-1"))
    by_lines = RequestHead.from_pairs("GET", target, pairs)
    fields = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]
    names = [name for name, _ in fields]
    if len(set(names)) == len(names):
        as_received = RequestHead("GET", target, raw=dict(fields))
    else:
        as_received = RequestHead("GET", target, joined_fields(fields))
    baggage = by_lines.header("baggage")
    assert baggage == as_received.header("baggage")
    if baggage is not None:
        # The members a full parse sees first, as keys too: the fast path must find any key.
        keys = (*_ALIASES, *(m.key for m in parse_baggage(baggage, 4, 1 << 30)))
        for max_members, max_bytes in ((64, 8192), (3, 40), (1, 1 << 20)):
            _check_members(baggage, keys, max_members, max_bytes)
        assert by_lines.baggage() == baggage_values(baggage)
    for config in CONFIGS:
        extractor = KeyExtractor(config)
        found = extractor.extract(by_lines)
        assert found is None or (isinstance(found.value, str) and found.value), f"empty key {found!r}"
        assert _same(found, extractor.extract(by_lines)), "a second extraction differs"
        other = extractor.extract(as_received)
        assert _same(found, other), f"from header lines {found!r}, from fields as received {other!r}"
        report = extractor.explain(by_lines)
        first = next((entry["found"] for entry in report if entry["found"] is not None), None)
        expected = None if found is None else {"where": found.where, "value": found.value}
        assert first == expected, f"explain {first!r}, extract {expected!r}"


def seeds() -> list[bytes]:
    """Heads carrying keys in every source, and baggage near its limits."""
    heads = [
        "/\nbaggage: turnout-session=abc123",
        "/\nbaggage: user=1, turnout-session=a%2Fb%20c;prop=1;flag\nbaggage: sd-routing-key=s1",
        "/?turnout-session=q1&k=v\ncookie: turnout-session=\"c1\"; k=2\nx-turnout-session: h1",
        "/\ntracestate: vendor=1,turnout=t1\not-baggage-turnout-session: o%201\nuberctx-turnout-session: u1",
        "/\nbaggage: turnout-session=, sd-routing-key=s2, turnout-session=last",
        "/\nbaggage: " + ",".join(f"m{i}=v{i}" for i in range(70)) + ",turnout-session=late",
        "/\nbaggage: k=1;turnout-session=2, xturnout-session=3,turnout-session =4",
        "/\nbaggage: " + "turnout-session" * 20 + "=x,turnout-session=y",
        "/p?a=1\nBaggage: K=1\nbaggage: k=2\ncookie: k=%zz",
    ]
    return [head.encode("latin-1") for head in heads]
