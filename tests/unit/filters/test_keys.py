"""Unit tests for filters.keys: where a routing key is found, and the key configuration."""

from __future__ import annotations

from typing import Any

import pytest

from filters.errors import Problem, ValidationError
from filters.head import RequestHead
from filters.keys import DEFAULT_SOURCES, KeyConfig, KeyExtractor, parse_key_config
from filters.sources import SOURCE_KINDS, FoundKey, KeySource

ALIASES = KeySource("baggage", ("turnout-session", "sd-routing-key", "mirrord-session"))


def head(*pairs: tuple[str, str], target: str = "/") -> RequestHead:
    return RequestHead.from_pairs("GET", target, pairs)


def extract(h: RequestHead, *sources: KeySource) -> FoundKey | None:
    config = KeyConfig(sources=sources) if sources else KeyConfig()
    return KeyExtractor(config).extract(h)


def found(h: RequestHead, *sources: KeySource) -> tuple[str, str, str]:
    key = extract(h, *sources)
    assert key is not None
    return key.value, key.source.kind, key.name


def refused(spec: Any, field_path: str = "routing") -> list[Problem]:
    with pytest.raises(ValidationError) as info:
        parse_key_config(spec, field_path)
    assert info.value.problems
    return info.value.problems


def fields(problems: list[Problem]) -> list[str]:
    return [p.field for p in problems]


# --------------------------------------------------------------------------- sources


def test_default_baggage_member() -> None:
    assert found(head(("baggage", "user=1, turnout-session=abc123"))) == ("abc123", "baggage", "turnout-session")


def test_baggage_value_is_percent_decoded() -> None:
    assert found(head(("baggage", "turnout-session=a%2Fb%20c")))[0] == "a/b c"


def test_baggage_across_header_lines() -> None:
    assert found(head(("baggage", "a=1"), ("Baggage", "turnout-session=k2")))[0] == "k2"


def test_no_key_anywhere() -> None:
    assert extract(head(("baggage", "user=1"), ("x-turnout-session", "k"))) is None
    assert extract(head()) is None


@pytest.mark.parametrize("name", ["turnout-session", "sd-routing-key", "mirrord-session"])
def test_baggage_aliases(name: str) -> None:
    assert found(head(("baggage", "other=1," + name + "=k-" + name)), ALIASES) == ("k-" + name, "baggage", name)


def test_aliases_are_not_read_unless_configured() -> None:
    assert extract(head(("baggage", "sd-routing-key=k"))) is None


def test_first_configured_baggage_name_wins_not_first_in_header() -> None:
    h = head(("baggage", "mirrord-session=m, sd-routing-key=s, turnout-session=t"))
    assert found(h, ALIASES) == ("t", "baggage", "turnout-session")
    reordered = KeySource("baggage", ("mirrord-session", "turnout-session"))
    assert found(h, reordered) == ("m", "baggage", "mirrord-session")


def test_empty_baggage_member_falls_through_to_a_later_name() -> None:
    h = head(("baggage", "turnout-session=, sd-routing-key=s1"))
    assert found(h, ALIASES) == ("s1", "baggage", "sd-routing-key")


def test_baggage_limits_from_the_config() -> None:
    h = head(("baggage", "a=1,b=2,turnout-session=k"))
    assert extract(h) is not None
    limited = KeyExtractor(KeyConfig(baggage_max_members=2))
    assert limited.extract(head(("baggage", "a=1,b=2,turnout-session=k"))) is None
    assert limited.extract(head(("baggage", "a=1,turnout-session=k"))) is not None


def test_tracestate_member() -> None:
    h = head(("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
             ("tracestate", "rojo=00f067aa0ba902b7, turnout=k-ts"))
    assert found(h) == ("k-ts", "tracestate", "turnout")
    assert extract(head(("tracestate", "turnoutx=k, xturnout=k"))) is None


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("ot-baggage-turnout-session", "ot-baggage"),
        ("OT-Baggage-Turnout-Session", "ot-baggage"),
        ("uberctx-turnout-session", "uberctx"),
        ("Uberctx-Turnout-Session", "uberctx"),
    ],
)
def test_legacy_headers(header: str, kind: str) -> None:
    assert found(head((header, "k1"))) == ("k1", kind, "turnout-session")


@pytest.mark.parametrize("prefix", ["ot-baggage-", "uberctx-"])
def test_legacy_headers_are_percent_decoded(prefix: str) -> None:
    assert found(head((prefix + "turnout-session", "a%2Fb%20c")))[0] == "a/b c"
    assert found(head((prefix + "turnout-session", "  k2 \t")))[0] == "k2"


def test_plain_header_is_not_decoded() -> None:
    source = KeySource("header", ("x-turnout-key",))
    assert found(head(("X-Turnout-Key", " a%2Fb ")), source) == ("a%2Fb", "header", "x-turnout-key")


def test_header_source_built_with_mixed_case_names() -> None:
    source = KeySource("header", ("X-Turnout-Key",))
    assert found(head(("x-turnout-key", "k")), source) == ("k", "header", "X-Turnout-Key")


@pytest.mark.parametrize(
    ("target", "value"),
    [
        ("/p?tk=k1", "k1"),
        ("/p?a=1&tk=k1&b=2", "k1"),
        ("/p?tk=a%2Fb", "a/b"),
        ("/p?tk=a+b", "a b"),
        ("/p?tk=a%2Bb", "a+b"),
        ("/p?tk=&tk=k2", "k2"),
    ],
)
def test_query_parameter(target: str, value: str) -> None:
    source = KeySource("query", ("tk",))
    assert found(head(target=target), source) == (value, "query", "tk")


@pytest.mark.parametrize("target", ["/p", "/p?", "/p?tk", "/p?tk=", "/p?xtk=1&tkx=2", "/tk=1"])
def test_query_parameter_absent(target: str) -> None:
    assert extract(head(target=target), KeySource("query", ("tk",))) is None


@pytest.mark.parametrize(
    ("pairs", "value"),
    [
        ((("cookie", "tk=k1"),), "k1"),
        ((("cookie", "a=1; tk=k1; b=2"),), "k1"),
        ((("cookie", 'tk="k1"'),), "k1"),
        ((("cookie", 'a=1; tk="a%2Fb"'),), "a/b"),
        ((("cookie", "a=1"), ("Cookie", "tk=k2")), "k2"),
        ((("cookie", "atk=x;tk=k3"),), "k3"),
    ],
)
def test_cookie(pairs: tuple[tuple[str, str], ...], value: str) -> None:
    source = KeySource("cookie", ("tk",))
    assert found(head(*pairs), source) == (value, "cookie", "tk")


def test_cookie_absent() -> None:
    source = KeySource("cookie", ("tk",))
    assert extract(head(("cookie", "atk=1; tkx=2; tk=")), source) is None
    assert extract(head(("cookie", 'tk=""')), source) is None


# --------------------------------------------------------------------------- order


def test_default_order_baggage_before_tracestate_before_legacy() -> None:
    everything = (
        ("baggage", "turnout-session=from-baggage"),
        ("tracestate", "turnout=from-tracestate"),
        ("ot-baggage-turnout-session", "from-ot"),
        ("uberctx-turnout-session", "from-uber"),
    )
    assert found(head(*everything))[0] == "from-baggage"
    assert found(head(*everything[1:]))[0] == "from-tracestate"
    assert found(head(*everything[2:]))[0] == "from-ot"
    assert found(head(*everything[3:]))[0] == "from-uber"


def test_configured_order_wins() -> None:
    sources = (KeySource("cookie", ("tk",)), KeySource("query", ("tk",)), KeySource("baggage", ("turnout-session",)))
    h = head(("baggage", "turnout-session=b"), ("cookie", "tk=c"), target="/?tk=q")
    assert found(h, *sources) == ("c", "cookie", "tk")
    assert found(h, *sources[1:]) == ("q", "query", "tk")
    assert found(h, *reversed(sources)) == ("b", "baggage", "turnout-session")


def test_empty_values_skip_to_the_next_source() -> None:
    h = head(
        ("baggage", "turnout-session="),
        ("tracestate", "turnout="),
        ("ot-baggage-turnout-session", " "),
        ("uberctx-turnout-session", "k-uber"),
    )
    assert found(h) == ("k-uber", "uberctx", "turnout-session")


def test_empty_header_value_skips_to_the_next_name() -> None:
    source = KeySource("header", ("x-a", "x-b"))
    assert found(head(("x-a", ""), ("x-b", "kb")), source) == ("kb", "header", "x-b")
    assert found(head(("x-a", "ka"), ("x-b", "kb")), source) == ("ka", "header", "x-a")


def test_first_configured_name_wins_within_list_sources() -> None:
    query = KeySource("query", ("a", "b"))
    assert found(head(target="/?b=2&a=1"), query) == ("1", "query", "a")
    assert found(head(target="/?b=2"), query) == ("2", "query", "b")
    cookie = KeySource("cookie", ("a", "b"))
    assert found(head(("cookie", "b=2; a=1")), cookie) == ("1", "cookie", "a")


# --------------------------------------------------------------------------- FoundKey and KeySource


@pytest.mark.parametrize(
    ("source", "pairs", "target", "where"),
    [
        (KeySource("baggage", ("sd-routing-key",)), (("baggage", "sd-routing-key=k"),), "/",
         "baggage member sd-routing-key"),
        (KeySource("tracestate", ("turnout",)), (("tracestate", "turnout=k"),), "/", "tracestate member turnout"),
        (KeySource("ot-baggage", ("turnout-session",)), (("ot-baggage-turnout-session", "k"),), "/",
         "header ot-baggage-turnout-session"),
        (KeySource("uberctx", ("turnout-session",)), (("uberctx-turnout-session", "k"),), "/",
         "header uberctx-turnout-session"),
        (KeySource("header", ("x-key",)), (("x-key", "k"),), "/", "header x-key"),
        (KeySource("query", ("tk",)), (), "/?tk=k", "query parameter tk"),
        (KeySource("cookie", ("tk",)), (("cookie", "tk=k"),), "/", "cookie tk"),
    ],
)
def test_found_key_where(source: KeySource, pairs: tuple[tuple[str, str], ...], target: str, where: str) -> None:
    key = extract(head(*pairs, target=target), source)
    assert key is not None
    assert key.value == "k"
    assert key.source is source
    assert key.where == where
    assert where in repr(key)
    assert "'k'" in repr(key)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_propagate(kind: str) -> None:
    assert KeySource(kind, ("x",)).propagate is (kind in ("query", "cookie", "header"))


def test_default_sources_do_not_propagate() -> None:
    assert not any(s.propagate for s in DEFAULT_SOURCES)
    assert [s.kind for s in DEFAULT_SOURCES] == ["baggage", "tracestate", "ot-baggage", "uberctx"]


# --------------------------------------------------------------------------- explain


def test_explain_reports_every_source() -> None:
    sources = (
        ALIASES,
        KeySource("tracestate", ("turnout",)),
        KeySource("query", ("tk",)),
        KeySource("cookie", ("tk",)),
    )
    extractor = KeyExtractor(KeyConfig(sources=sources))
    h = head(("baggage", "sd-routing-key=b1"), ("cookie", "tk=c1"), target="/?x=1")
    assert extractor.explain(h) == [
        {
            "source": "baggage",
            "names": ["turnout-session", "sd-routing-key", "mirrord-session"],
            "found": {"where": "baggage member sd-routing-key", "value": "b1"},
        },
        {"source": "tracestate", "names": ["turnout"], "found": None},
        {"source": "query", "names": ["tk"], "found": None},
        {"source": "cookie", "names": ["tk"], "found": {"where": "cookie tk", "value": "c1"}},
    ]
    key = extractor.extract(h)
    assert key is not None
    assert key.value == "b1"


def test_explain_with_nothing_found() -> None:
    report = KeyExtractor(KeyConfig()).explain(head())
    assert [r["source"] for r in report] == ["baggage", "tracestate", "ot-baggage", "uberctx"]
    assert all(r["found"] is None for r in report)


# --------------------------------------------------------------------------- parse_key_config


def test_parse_key_config_defaults() -> None:
    assert parse_key_config(None) == KeyConfig()
    assert parse_key_config({}) == KeyConfig()
    assert parse_key_config({"listen": "ignored by this parser"}) == KeyConfig()


def test_baggage_keys_shorthand() -> None:
    config = parse_key_config({"baggage_keys": ["sd-routing-key", "turnout-session"]})
    assert config.sources[0] == KeySource("baggage", ("sd-routing-key", "turnout-session"))
    assert config.sources[1:] == DEFAULT_SOURCES[1:]
    assert parse_key_config({"baggage_keys": "mirrord-session"}).sources[0] == KeySource(
        "baggage", ("mirrord-session",)
    )
    # Baggage keys keep their case; baggage is case-sensitive.
    assert parse_key_config({"baggage_keys": ["Session"]}).sources[0].names == ("Session",)


def test_baggage_keys_shorthand_is_used_for_extraction() -> None:
    extractor = KeyExtractor(parse_key_config({"baggage_keys": ["sd-routing-key"]}))
    assert extractor.extract(head(("baggage", "turnout-session=t"))) is None
    key = extractor.extract(head(("baggage", "sd-routing-key=s")))
    assert key is not None
    assert key.value == "s"


def test_full_key_sources() -> None:
    config = parse_key_config(
        {
            "key_sources": [
                {"from": "cookie", "names": ["TK"]},
                {"from": "header", "names": ["X-Turnout-Key"]},
                {"from": "ot-baggage", "names": "Turnout-Session"},
                {"from": "baggage", "names": ["sd-routing-key"]},
            ],
            "baggage_max_members": 10,
            "baggage_max_bytes": 1024,
        }
    )
    assert config.sources == (
        KeySource("cookie", ("TK",)),
        KeySource("header", ("x-turnout-key",)),  # header names are lower-cased
        KeySource("ot-baggage", ("turnout-session",)),
        KeySource("baggage", ("sd-routing-key",)),
    )
    assert (config.baggage_max_members, config.baggage_max_bytes) == (10, 1024)
    key = KeyExtractor(config).extract(head(("X-TURNOUT-KEY", "k"), ("baggage", "sd-routing-key=b")))
    assert key is not None
    assert (key.value, key.where) == ("k", "header x-turnout-key")


def test_key_config_to_dict_round_trips() -> None:
    config = parse_key_config(
        {"key_sources": [{"from": "query", "names": ["tk", "session"]}, {"from": "tracestate", "names": ["t"]}],
         "baggage_max_bytes": 4096}
    )
    assert parse_key_config(config.to_dict()) == config
    assert parse_key_config(KeyConfig().to_dict()) == KeyConfig()


def test_key_sources_and_baggage_keys_together_are_refused() -> None:
    problems = refused({"key_sources": [{"from": "baggage", "names": ["a"]}], "baggage_keys": ["b"]})
    assert fields(problems) == ["routing"]
    assert "not both" in problems[0].reason


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"key_sources": []}, "routing.key_sources"),
        ({"key_sources": {"from": "baggage"}}, "routing.key_sources"),
        ({"key_sources": ["baggage"]}, "routing.key_sources[0]"),
        ({"key_sources": [{"from": "grpc-metadata", "names": ["k"]}]}, "routing.key_sources[0].from"),
        ({"key_sources": [{"names": ["k"]}]}, "routing.key_sources[0].from"),
        ({"key_sources": [{"from": "query", "names": ["tk"]}, {"from": "body", "names": ["k"]}]},
         "routing.key_sources[1].from"),
        ({"key_sources": [{"from": "query", "names": ["tk"], "decode": True}]}, "routing.key_sources[0]"),
        ({"key_sources": [{"from": "query"}]}, "routing.key_sources[0].names"),
        ({"key_sources": [{"from": "query", "names": []}]}, "routing.key_sources[0].names"),
        ({"key_sources": [{"from": "query", "names": [f"n{i}" for i in range(17)]}]}, "routing.key_sources[0].names"),
        ({"key_sources": [{"from": "query", "names": ["ok", ""]}]}, "routing.key_sources[0].names[1]"),
        ({"key_sources": [{"from": "header", "names": ["x key"]}]}, "routing.key_sources[0].names[0]"),
        ({"key_sources": [{"from": "cookie", "names": ["a=b"]}]}, "routing.key_sources[0].names[0]"),
        ({"key_sources": [{"from": "cookie", "names": [5]}]}, "routing.key_sources[0].names[0]"),
        ({"baggage_keys": []}, "routing.baggage_keys"),
        ({"baggage_keys": ["ok", "no,pe"]}, "routing.baggage_keys[1]"),
        ({"baggage_keys": 5}, "routing.baggage_keys"),
        ({"baggage_max_members": 0}, "routing.baggage_max_members"),
        ({"baggage_max_members": True}, "routing.baggage_max_members"),
        ({"baggage_max_members": "64"}, "routing.baggage_max_members"),
        ({"baggage_max_bytes": -1}, "routing.baggage_max_bytes"),
        ({"baggage_max_bytes": 8192.0}, "routing.baggage_max_bytes"),
    ],
)
def test_key_config_problems(spec: dict[str, Any], field: str) -> None:
    assert fields(refused(spec)) == [field]


def test_sixteen_names_are_allowed() -> None:
    config = parse_key_config({"key_sources": [{"from": "query", "names": [f"n{i}" for i in range(16)]}]})
    assert len(config.sources[0].names) == 16


def test_every_key_config_problem_is_reported() -> None:
    spec = {
        "key_sources": [
            {"from": "query", "names": ["tk"], "extra": 1},
            {"from": "nowhere", "names": ["k"]},
            {"from": "cookie", "names": ["", "ok", "b d"]},
        ],
        "baggage_max_members": 0,
        "baggage_max_bytes": "big",
    }
    problems = refused(spec, "proxy.routing")
    assert fields(problems) == [
        "proxy.routing.key_sources[0]",
        "proxy.routing.key_sources[1].from",
        "proxy.routing.key_sources[2].names[0]",
        "proxy.routing.key_sources[2].names[2]",
        "proxy.routing.baggage_max_members",
        "proxy.routing.baggage_max_bytes",
    ]
    assert "unknown field(s): extra" in problems[0].reason
