"""Tests for filters.baggage: the W3C Baggage grammar, its limits, and the routing-key fast path.

Spec: https://www.w3.org/TR/baggage/ (the grammar is quoted in the module docstring).
Agreement with, and differences from, OpenTelemetry's propagator are in test_baggage_otel.py,
which reuses the grammar strategies defined here.
"""

from __future__ import annotations

import signal
import string
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from filters.baggage import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    BaggageMember,
    MemberExtractor,
    baggage_values,
    decode_value,
    join_lines,
    parse_baggage,
    parse_member,
)

# --------------------------------------------------------------------------- grammar alphabet

#: RFC 7230 section 3.2.6 tchar: the characters of a key (and of a property key).
TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
#: W3C Baggage baggage-octet: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E.
OCTET = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\')
#: What a serializer may leave unencoded: every baggage-octet except "%" itself.
SAFE = OCTET.replace("%", "")

assert len(TCHAR) == 77
assert len(OCTET) == 90

ROUTING_KEYS = ("turnout-session", "sd-routing-key", "session")  # "session" is inside the others
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(text: str, safe: str = SAFE) -> str:
    """Percent-encode decoded text into a baggage value (RFC 3986 percent-encoding of UTF-8)."""
    return quote(text, safe=safe)


def first_present(
    keys: tuple[str, ...],
    header: str,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[str, str] | None:
    """What MemberExtractor.extract must return, computed from the full parser."""
    values = baggage_values(header, max_members, max_bytes)
    for key in keys:
        if key in values:
            return key, values[key]
    return None


# --------------------------------------------------------------------------- strategies

ows = st.sampled_from(["", " ", "\t", "  ", " \t", "\t "])
tokens = st.text(TCHAR, min_size=1, max_size=10)
#: Decoded values: any Unicode text but lone surrogates (which UTF-8 cannot encode).
texts = st.text(max_size=12)
raw_values = st.text(OCTET, max_size=12)


@st.composite
def members(
    draw: st.DrawFn,
    keys: st.SearchStrategy[str] = tokens,
    values: st.SearchStrategy[str] = texts,
    safe: str = SAFE,
    max_properties: int = 3,
) -> tuple[str, BaggageMember]:
    """One list-member serialized from the grammar, with OWS everywhere the grammar allows it,
    and the member it must parse back to."""
    key = draw(keys)
    value = draw(values)
    props = draw(st.lists(st.tuples(tokens, st.none() | values), max_size=max_properties))
    text = f"{draw(ows)}{key}{draw(ows)}={draw(ows)}{encode(value, safe)}"
    for pkey, pvalue in props:
        text += f"{draw(ows)};{draw(ows)}{pkey}{draw(ows)}"
        if pvalue is not None:
            text += f"={draw(ows)}{encode(pvalue, safe)}"
    text += draw(ows)
    return text, BaggageMember(key, value, tuple(props))


@st.composite
def headers(
    draw: st.DrawFn,
    member: st.SearchStrategy[tuple[str, BaggageMember]] | None = None,
    max_members: int = 8,
    junk: st.SearchStrategy[str] | None = None,
    empties: bool = True,
) -> tuple[str, list[BaggageMember]]:
    """A baggage-string of grammar members, with empty list elements (``,,`` / ``, ,``)
    sprinkled in unless ``empties`` is false, and optionally invalid elements (``junk``);
    plus the valid members in order."""
    items = draw(st.lists(member if member is not None else members(), max_size=max_members))
    some = st.lists(ows, max_size=1 if empties else 0)
    pieces: list[str] = []
    expected: list[BaggageMember] = []
    for text, parsed in items:
        pieces.extend(draw(some))  # an empty element, sometimes
        if junk is not None:
            pieces.extend(draw(st.lists(junk, max_size=1)))
        pieces.append(text)
        expected.append(parsed)
    pieces.extend(draw(some))
    return ",".join(pieces), expected


#: Anything at all: control characters, non-ASCII, lone surrogates.
any_text = st.text(st.characters(exclude_categories=()), max_size=200)
#: Dense in the characters the parser splits on.
delimiter_soup = st.lists(
    st.sampled_from([*',;= \t%"\\\x00\r\n\x7f', "a", "é", "\ud800", "%C3", "k="]), max_size=300
).map("".join)
#: Large inputs, built by repetition so that generating them stays cheap.
huge = st.tuples(any_text | delimiter_soup, st.integers(1, 400)).map(lambda t: t[0] * t[1])
hostile = any_text | delimiter_soup | huge

#: Pieces that look like, contain, or are contained in the routing keys.
FRAGMENTS = [
    *ROUTING_KEYS,
    "xturnout-session",
    "turnout-sessionx",
    "turnout-",
    "-session",
    "sd-routing-",
    "=",
    "==",
    ",",
    ";",
    " ",
    "\t",
    "1",
    "v%20",
    "%FF",
    "a",
    "b=",
    '"',
    "é",
    "\x00",
    "+",
]
fragment_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)

#: Keys and values chosen to collide with the routing keys as substrings.
confusable_keys = (
    st.sampled_from([*ROUTING_KEYS, "xturnout-session", "turnout-sessionx", "turnout-session-", "a"]) | tokens
)
confusable_values = st.sampled_from(["", "1", *ROUTING_KEYS, "turnout-session=2", "x,turnout-session=3"]) | texts
confusable_members = members(keys=confusable_keys, values=confusable_values, max_properties=2)
#: Elements that are not list-members, some mentioning a routing key.
junk = st.sampled_from(
    ["turnout-session", "turnout-session=a b", 'turnout-session="x"', "turnout-session=v;", "=v", "k=é", "\x00"]
)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail, instead of hanging the suite, when the body loops forever (turnout runs on Linux)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# =========================================================================== 1. grammar


@pytest.mark.parametrize(
    "header",
    ["k=v", "k = v", "k\t=\tv", " k=v ", "\tk \t=  v\t", "k =v", "k= v"],
)
def test_ows_around_equals_is_not_part_of_key_or_value(header):
    assert parse_baggage(header) == [BaggageMember("k", "v")]


@pytest.mark.parametrize("header", ["a=1,b=2", "a=1 , b=2", "a=1\t,\tb=2", " a = 1 \t,\t b = 2 "])
def test_ows_around_comma(header):
    assert baggage_values(header) == {"a": "1", "b": "2"}


@pytest.mark.parametrize("header", ["k=v;p;q=x", "k=v ; p ; q = x", "k=v\t;\tp\t;\tq\t=\tx\t", "k = v;p ;q= x "])
def test_ows_around_semicolon_and_in_properties(header):
    assert parse_member(header) == BaggageMember("k", "v", (("p", None), ("q", "x")))


def test_spec_example_header():
    """The example in the spec's "Header Content" section: three members, two with properties."""
    header = "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue"
    assert parse_baggage(header) == [
        BaggageMember("key1", "value1", (("property1", None), ("property2", None))),
        BaggageMember("key2", "value2"),
        BaggageMember("key3", "value3", (("propertyKey", "propertyValue"),)),
    ]


@pytest.mark.parametrize(
    ("text", "member"),
    [
        ("k=", BaggageMember("k", "")),
        ("k= \t", BaggageMember("k", "")),
        ("k=;p", BaggageMember("k", "", (("p", None),))),
        ("k = ; p = ", BaggageMember("k", "", (("p", ""),))),
    ],
)
def test_empty_values(text, member):
    assert parse_member(text) == member


@pytest.mark.parametrize(
    ("text", "member"),
    [
        ("k=v;p1;p2=x", BaggageMember("k", "v", (("p1", None), ("p2", "x")))),
        ("k=v;p", BaggageMember("k", "v", (("p", None),))),
        ("k=v;p=", BaggageMember("k", "v", (("p", ""),))),
        ("k=v;p=a=b", BaggageMember("k", "v", (("p", "a=b"),))),
        ("k=v;p=%20x%C3%A9", BaggageMember("k", "v", (("p", " xé"),))),  # property values are decoded too
        ("k=v;p=1;p=2", BaggageMember("k", "v", (("p", "1"), ("p", "2")))),  # kept in order, repeats kept
        ("k=v;p%41", BaggageMember("k", "v", (("p%41", None),))),  # property keys are tokens: not decoded
    ],
)
def test_properties(text, member):
    assert parse_member(text) == member


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("k=a=b", "a=b"),
        ("k===", "=="),
        ("k=a=b;p=c=d", "a=b"),
        ("k=!#$&'()*+-./:<>?@[]^_`{|}~", "!#$&'()*+-./:<>?@[]^_`{|}~"),
    ],
)
def test_values_may_contain_equals_signs_and_any_baggage_octet(text, value):
    member = parse_member(text)
    assert member is not None
    assert member.value == value


BAD_MEMBERS = [
    "k y=1",  # space inside the key
    "k(=1",  # "(" is not a tchar
    "k/=1",
    "k@=1",
    "k:=1",
    "k[=1",
    '"k"=1',
    "é=1",  # non-ASCII key
    "=1",  # empty key
    "k",  # missing "="
    "k 1",
    "k=a b",  # space inside the value
    'k="v"',  # DQUOTE is not a baggage-octet
    "k=a\\b",  # nor is backslash
    "k=é",  # non-ASCII must be percent-encoded
    "k=\x00",
    "k=\x7f",
    "k=v\r",
    "k=v\n",
    "k\x0b=v",  # VT is not OWS
    "k=v;",  # trailing ";": an empty property
    "k=v;=x",  # property without a key
    "k=v;;p",
    "k=v; ;p",
    "k=v;p q",
    "k=v;p=a b",
    'k=v;p="x"',
    "k=v;é",
    "k=v;p=é",
    "k=v;p=x=\\",
]


@pytest.mark.parametrize("bad", BAD_MEMBERS)
def test_invalid_member_is_skipped_alone(bad):
    assert parse_member(bad) is None
    assert baggage_values(f"a=1,{bad},b=2") == {"a": "1", "b": "2"}
    assert baggage_values(f"{bad}, a=1") == {"a": "1"}


@pytest.mark.parametrize(
    "header",
    ["a=1,,b=2", "a=1, ,b=2", "a=1,\t,b=2", ",a=1,b=2", "a=1,b=2,", " , ,a=1,,,b=2,, ", ",,,a=1,b=2"],
)
def test_empty_list_elements_are_ignored(header):
    assert parse_baggage(header) == [BaggageMember("a", "1"), BaggageMember("b", "2")]


@pytest.mark.parametrize("header", ["", " ", ",", ",,,", " \t, \t"])
def test_header_without_members(header):
    assert parse_baggage(header) == []
    assert baggage_values(header) == {}


def test_several_header_lines_form_one_list_in_order():
    assert parse_baggage(["a=1", "b=2"]) == [BaggageMember("a", "1"), BaggageMember("b", "2")]
    assert baggage_values(("k=1", "k=2")) == {"k": "2"}  # the later line's member wins
    assert baggage_values(iter(["a=1, b=2", "", "c=3"])) == {"a": "1", "b": "2", "c": "3"}
    assert parse_baggage([]) == []


def test_join_lines():
    assert join_lines(["a=1", "b=2;p"]) == "a=1,b=2;p"
    assert join_lines("a=1,b=2") == "a=1,b=2"
    assert join_lines([]) == ""


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("%20", " "),
        ("a%20b", "a b"),
        ("%C3%A9", "é"),  # UTF-8, two octets
        ("%E2%82%AC", "€"),
        ("%F0%9F%98%80", "😀"),
        ("%FF", "\ufffd"),  # not UTF-8: the replacement character, as the spec requires
        ("%C3", "\ufffd"),  # truncated sequence
        ("%C3x", "\ufffdx"),
        ("%ED%A0%80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate is not UTF-8 either
        ("%zz", "%zz"),  # not a percent-encoding: left as is
        ("%", "%"),
        ("%2", "%2"),
        ("100%25", "100%"),
        ("a+b", "a+b"),  # "+" is a baggage-octet, not an encoded space
        ("%2B", "+"),
        ("%2C%3B%22%5C", ',;"\\'),
        ("plain", "plain"),
    ],
)
def test_percent_decoding(raw, decoded):
    assert decode_value(raw) == decoded
    assert baggage_values(f"k={raw}") == {"k": decoded}


def test_keys_are_tokens_and_not_percent_decoded():
    assert baggage_values("a%41=1,a+b=2") == {"a%41": "1", "a+b": "2"}


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("k=1,k=2", "2"),
        ("k=1,a=x,k=2,b=y", "2"),
        ("k=1,k=bad value", "1"),  # an invalid later duplicate does not override
        ('k=1,k=2,k="3"', "2"),
        ("k=1,k=2;", "1"),  # nor does one with a malformed property
        ("k=1,k=,", ""),  # an empty value is a valid value
        (" k = 1 , k=%32 ", "2"),
    ],
)
def test_duplicate_key_last_valid_member_wins(header, value):
    assert baggage_values(header)["k"] == value
    assert MemberExtractor(["k"]).extract(header) == ("k", value)


def test_duplicates_are_all_kept_by_parse_baggage_in_order():
    assert [m.value for m in parse_baggage("k=1,a=0,k=2")] == ["1", "0", "2"]


# =========================================================================== 2. limits


def numbered(n: int, start: int = 0) -> list[str]:
    return [f"k{i}={i}" for i in range(start, start + n)]


def test_default_limits_are_the_spec_minimums():
    assert DEFAULT_MAX_MEMBERS == 64
    assert DEFAULT_MAX_BYTES == 8192


def test_64_members_kept_and_the_65th_dropped():
    assert len(parse_baggage(",".join(numbered(64)))) == 64
    values = baggage_values(",".join(numbered(65)))
    assert len(values) == 64
    assert values["k63"] == "63"
    assert "k64" not in values
    assert len(parse_baggage(",".join(numbered(500)))) == 64


@pytest.mark.parametrize("limit", [0, 1, 3, 10])
def test_custom_max_members(limit):
    members = parse_baggage(",".join(numbered(12)), max_members=limit)
    assert [m.key for m in members] == [f"k{i}" for i in range(limit)]


def test_empty_elements_do_not_count_toward_the_member_limit():
    header = ",, ,".join(numbered(64)) + ", ,\t,"
    assert len(parse_baggage(header)) == 64
    assert len(parse_baggage(",,," + header + ",k64=64")) == 64  # and the 65th member is still dropped
    assert [m.key for m in parse_baggage("a=1,,,,b=2", max_members=2)] == ["a", "b"]


def test_invalid_members_count_toward_the_member_limit():
    """Every non-empty element takes a slot, valid or not: the limit bounds how much of the
    list is examined, so 64 invalid elements push a 65th, valid member out."""
    header = ",".join(["bad value"] * 64 + ["k=1"])
    assert baggage_values(header) == {}
    assert baggage_values(header, max_members=65) == {"k": "1"}


def test_member_ending_exactly_at_max_bytes_is_kept():
    header = "a=1," + "b=" + "x" * (DEFAULT_MAX_BYTES - 6)
    assert len(header) == DEFAULT_MAX_BYTES
    values = baggage_values(header)
    assert values["a"] == "1"
    assert values["b"] == "x" * (DEFAULT_MAX_BYTES - 6)


def test_member_straddling_max_bytes_is_dropped_whole_never_truncated():
    header = "a=1," + "b=" + "x" * (DEFAULT_MAX_BYTES - 5) + ",c=3"
    assert len(header.split(",")[1]) + 4 == DEFAULT_MAX_BYTES + 1  # ends one byte past the limit
    assert parse_baggage(header) == [BaggageMember("a", "1")]  # no "b" (whole or cut), and no "c" after it


def test_member_ending_past_max_bytes_is_dropped_even_when_only_its_properties_cross():
    value_part = "b=v;p=" + "x" * (DEFAULT_MAX_BYTES - 10)
    header = "a=1," + value_part
    assert len(header) == DEFAULT_MAX_BYTES
    assert [m.key for m in parse_baggage(header)] == ["a", "b"]
    assert [m.key for m in parse_baggage(header + "x")] == ["a"]


@pytest.mark.parametrize(("limit", "keys"), [(0, []), (2, []), (3, ["a"]), (7, ["a"]), (8, ["a", "b"])])
def test_custom_max_bytes(limit, keys):
    # "a=1, b=2" : the first member ends at byte 3, the second at byte 8.
    assert [m.key for m in parse_baggage("a=1, b=2", max_bytes=limit)] == keys


def test_byte_limit_applies_to_all_lines_combined():
    big = "x" * 5000
    assert baggage_values([f"a={big}", f"b={big}"]) == {"a": big}
    assert len(parse_baggage([",".join(numbered(40)), ",".join(numbered(40, start=40))])) == 64


# =========================================================================== MemberExtractor


def test_extractor_finds_a_member():
    extractor = MemberExtractor(ROUTING_KEYS)
    assert extractor.keys == ROUTING_KEYS
    assert extractor.extract("userId=42,turnout-session=abc123") == ("turnout-session", "abc123")
    assert extractor.extract("turnout-session=%C3%A9t%C3%A9") == ("turnout-session", "été")
    assert extractor.extract("userId=42") is None
    assert extractor.extract("") is None


def test_extractor_key_priority_is_configuration_order_not_header_order():
    header = "session=3, sd-routing-key=2, turnout-session=1"
    assert MemberExtractor(ROUTING_KEYS).extract(header) == ("turnout-session", "1")
    assert MemberExtractor(("session", "turnout-session")).extract(header) == ("session", "3")
    assert MemberExtractor(ROUTING_KEYS).extract("sd-routing-key=2,session=3") == ("sd-routing-key", "2")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("xturnout-session=1", None),
        ("a=turnout-session=2", None),
        ("a=b;turnout-session=3", None),
        ("a=b; turnout-session=3", None),
        ("turnout-sessionx=4", None),
        ("turnout-session", None),
        ("turnout-session;p=1", None),
        ("turnout-session =5", "5"),
        (" \tturnout-session\t= 6 ", "6"),
        ("a=1, turnout-session=7;p=turnout-session", "7"),
        ("turnout-session=8,xturnout-session=9,turnout-sessionx=10,a=turnout-session=11", "8"),
        ("turnout-session=1,turnout-session=bad value", "1"),
        ("turnout-session=1,turnout-session=2;", "1"),
        ("turnout-session=turnout-session", "turnout-session"),
    ],
)
def test_extractor_matches_whole_keys_only(header, expected):
    extractor = MemberExtractor(["turnout-session"])
    assert extractor.extract(header) == (None if expected is None else ("turnout-session", expected))
    assert extractor.extract(header) == first_present(("turnout-session",), header)


def test_extractor_respects_the_member_limit():
    extractor = MemberExtractor(["turnout-session"])
    assert extractor.extract(",".join([*numbered(63), "turnout-session=s"])) == ("turnout-session", "s")
    assert extractor.extract(",".join([*numbered(64), "turnout-session=s"])) is None
    # The later duplicate is the 66th member: the first one, within the limit, is the answer.
    header = ",".join(["turnout-session=first", *numbered(64), "turnout-session=late"])
    assert extractor.extract(header) == ("turnout-session", "first")
    assert MemberExtractor(["turnout-session"], max_members=66).extract(header) == ("turnout-session", "late")


def test_extractor_respects_the_byte_limit():
    extractor = MemberExtractor(["turnout-session"])
    pad = "pad=" + "x" * DEFAULT_MAX_BYTES
    assert extractor.extract(f"turnout-session=first,{pad},turnout-session=late") == ("turnout-session", "first")
    assert extractor.extract(f"{pad},turnout-session=late") is None
    assert MemberExtractor(["k"], max_bytes=3).extract("k=1,k=2") == ("k", "1")


def test_extractor_with_an_empty_key_returns_instead_of_looping():
    """Regression: the backwards search for "" never ended (rfind("", 0, -1) wraps around)."""
    with time_limit(2):
        assert MemberExtractor([""]).extract("ab") is None
        assert MemberExtractor([""]).extract("=1,a=2") is None
        assert MemberExtractor(["", "a"]).extract("ab,a=1") == ("a", "1")


# =========================================================================== 3. properties


@PROPS
@given(hostile, st.lists(hostile, max_size=3), st.integers(-2, 70), st.integers(-2, 10_000))
@example("\x00,;=" * 3000, [], 64, 8192)
@example("k=" + "%" * 9000, ["\ud800=1"], 64, 8192)
def test_hostile_input_never_raises(text, lines, max_members, max_bytes):
    parsed = parse_baggage(text, max_members, max_bytes)
    assert len(parsed) <= max(max_members, 0)
    assert all(isinstance(m.key, str) and isinstance(m.value, str) for m in parsed)
    values = baggage_values(lines, max_members, max_bytes)
    assert all(isinstance(v, str) for v in values.values())
    member = parse_member(text)
    assert member is None or (member.key != "" and set(member.key) <= set(TCHAR))
    assert isinstance(decode_value(text), str)
    found = MemberExtractor(ROUTING_KEYS, max_members, max_bytes).extract(text)
    assert found is None or found[0] in ROUTING_KEYS


@PROPS
@given(hostile, st.lists(st.text(max_size=4), max_size=3))
def test_extractor_never_raises_or_hangs_for_any_configured_keys(header, keys):
    with time_limit(5):
        found = MemberExtractor(keys).extract(header)
    assert found == first_present(tuple(keys), header)


@PROPS
@given(any_text | delimiter_soup | fragment_soup)
@example("turnout-session=1,turnout-session=2")
@example("xturnout-session=1,a=turnout-session=2,a=b;turnout-session=3,turnout-sessionx=4")
@example(" turnout-session =\t1 ;p, session = 2")
def test_extractor_agrees_with_full_parser_on_arbitrary_text(header):
    assert MemberExtractor(ROUTING_KEYS).extract(header) == first_present(ROUTING_KEYS, header)
    assert MemberExtractor(ROUTING_KEYS[::-1]).extract(header) == first_present(ROUTING_KEYS[::-1], header)


@PROPS
@given(
    headers(member=confusable_members, max_members=10, junk=junk),
    st.permutations(ROUTING_KEYS),
    st.integers(-2, 2),
    st.integers(-40, 3),
)
def test_extractor_agrees_with_full_parser_on_grammar_headers_near_small_limits(case, keys, member_delta, byte_delta):
    """Limits drawn around the header's own size (its element count and its length), where
    the fast path must hand over to the full parser."""
    header, _ = case
    keys = tuple(keys)
    max_members = max(0, header.count(",") + member_delta)
    max_bytes = max(0, len(header) + byte_delta)
    assert MemberExtractor(keys, max_members, max_bytes).extract(header) == first_present(
        keys, header, max_members, max_bytes
    )


@PROPS
@given(
    headers(member=confusable_members, max_members=4, junk=junk, empties=False)
    | headers(member=confusable_members, max_members=4, junk=junk),
    members(keys=st.sampled_from(ROUTING_KEYS), values=confusable_values, max_properties=1),
    st.integers(-3, 3),
    st.none() | st.integers(-12, 12),
    st.booleans(),
)
def test_extractor_agrees_with_full_parser_near_the_default_limits(case, last, comma_delta, byte_delta, pad_first):
    """A routing member last, after filler members that bring the list to 64 +/- 3 commas and,
    unless ``byte_delta`` is None, a padding member that brings it to 8192 +/- 12 bytes: the
    routing member falls on either side of a limit, where the fast path must hand over."""
    header = ",".join([case[0], last[0]])
    filler = numbered(max(0, 62 - header.count(",") + comma_delta))
    pad = "pad="
    if byte_delta is not None:
        pad += "x" * max(0, DEFAULT_MAX_BYTES + byte_delta - len(",".join([*filler, pad, header])))
    header = ",".join([pad, *filler, header] if pad_first else [*filler, pad, header])
    assert MemberExtractor(ROUTING_KEYS).extract(header) == first_present(ROUTING_KEYS, header)


@PROPS
@given(headers())
def test_round_trip_of_grammar_members(case):
    header, expected = case
    assert len(header) <= DEFAULT_MAX_BYTES
    assert parse_baggage(header) == expected
    last = {m.key: m.value for m in expected}
    assert baggage_values(header) == last
    assert baggage_values(header.split(",")) == last  # the same list split over several lines


@PROPS
@given(members(values=raw_values.map(decode_value)))
def test_round_trip_of_one_member(case):
    text, expected = case
    assert parse_member(text) == expected
    # A member is one list element: its text never holds a "," that would split it.
    assert "," not in text


@PROPS
@given(raw_values)
def test_raw_values_decode_like_the_serializer_encodes(raw):
    """Any baggage-octet string is a valid value; decoding then re-encoding and decoding again
    is stable (percent-decoding is idempotent on what it produces)."""
    decoded = decode_value(raw)
    assert parse_member(f"k={raw}") == BaggageMember("k", decoded)
    assert decode_value(encode(decoded)) == decoded
