"""Micro-benchmarks of the routing decision and what feeds it (``make bench``).

Not tests of speed: every benchmark first checks that its workload does what its name says
(the right key found, the right session chosen), then times it. Targets ride along in
``extra_info`` and ``python -m bench.micro.report`` compares medians with them.

Run pinned to one core, e.g. ``taskset -c 1 .venv/bin/pytest bench/micro -q --benchmark-only``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro.workloads import (
    BAGGAGE,
    BAGGAGE_KEY,
    BAGGAGE_NO_KEY,
    BASE_PAIRS,
    FILTER_HIT,
    FILTER_MIXES,
    FILTER_ROUTES,
    KEYED_EXTRA,
    KEYED_METHOD,
    KEYED_TARGET,
    MAX_SESSIONS,
    NOW,
    ROTATING_HEADS,
    SERVICE,
    SESSION_COUNTS,
    TARGET_COMPILE_100K_S,
    TARGET_DECIDE_FILTERS_S,
    TARGET_DECIDE_KEYED_S,
    TARGET_KEY_EXTRACT_S,
    baggage_with_key,
    cycler,
    filter_head,
    head,
    keyed_session_specs,
    rotating_keyed_heads,
    session_key,
)
from filters import (
    BASELINE,
    KeyConfig,
    KeyExtractor,
    MemberExtractor,
    RequestHead,
    Session,
    Snapshot,
    compile_snapshot,
    parse_key_config,
    parse_sessions,
)

T = TypeVar("T")

# Sub-microsecond to microsecond calls: rounds of >= 100 µs so that the timer's own cost
# is spread over many iterations; a short warm-up fills caches and RE2's lazy DFAs.
FAST = {"min_time": 0.0001, "max_time": 1.0, "min_rounds": 20, "warmup": True, "warmup_iterations": 10_000}


def _target(benchmark: BenchmarkFixture, seconds: float | None, **info: object) -> None:
    benchmark.extra_info["target_s"] = seconds
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------- 1. key extraction


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_member_extract(benchmark: BenchmarkFixture) -> None:
    """``MemberExtractor.extract`` on a 5-member OTel-style baggage header, key 4th."""
    extractor = MemberExtractor(("turnout-session",))
    assert extractor.extract(BAGGAGE) == ("turnout-session", BAGGAGE_KEY)
    _target(benchmark, TARGET_KEY_EXTRACT_S)
    benchmark(extractor.extract, BAGGAGE)


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_member_extract_third_alias(benchmark: BenchmarkFixture) -> None:
    """Three configured names (sd-routing-key, mirrord-session first); the third is present."""
    extractor = MemberExtractor(("sd-routing-key", "mirrord-session", "turnout-session"))
    assert extractor.extract(BAGGAGE) == ("turnout-session", BAGGAGE_KEY)
    _target(benchmark, TARGET_KEY_EXTRACT_S)
    benchmark(extractor.extract, BAGGAGE)


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_key_extract_head(benchmark: BenchmarkFixture) -> None:
    """``KeyExtractor.extract`` (default sources) on a 13-line head; found in baggage."""
    extractor = KeyExtractor(KeyConfig())
    h = head()
    found = extractor.extract(h)
    assert found is not None and found.value == BAGGAGE_KEY and found.name == "turnout-session"
    _target(benchmark, TARGET_KEY_EXTRACT_S)
    benchmark(extractor.extract, h)


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_key_extract_head_absent(benchmark: BenchmarkFixture) -> None:
    """No key anywhere: every default source (baggage, tracestate, ot-baggage, uberctx) looks."""
    extractor = KeyExtractor(KeyConfig())
    h = head(BAGGAGE_NO_KEY)
    assert extractor.extract(h) is None
    _target(benchmark, TARGET_KEY_EXTRACT_S)
    benchmark(extractor.extract, h)


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_key_extract_head_aliases(benchmark: BenchmarkFixture) -> None:
    """``baggage_keys: [sd-routing-key, mirrord-session, turnout-session]``, third present."""
    extractor = KeyExtractor(parse_key_config({"baggage_keys": ["sd-routing-key", "mirrord-session",
                                                                "turnout-session"]}))
    h = head()
    found = extractor.extract(h)
    assert found is not None and found.value == BAGGAGE_KEY
    _target(benchmark, TARGET_KEY_EXTRACT_S)
    benchmark(extractor.extract, h)


@pytest.mark.benchmark(group="1 key extraction", **FAST)
def test_head_from_pairs(benchmark: BenchmarkFixture) -> None:
    """Reference, no target: building the 13-line head ``decide`` reads (the codec's cost)."""
    pairs = [*BASE_PAIRS, *KEYED_EXTRA, ("baggage", BAGGAGE)]
    assert len(RequestHead.from_pairs(KEYED_METHOD, KEYED_TARGET, pairs).headers) == len(pairs)
    _target(benchmark, None)
    benchmark(RequestHead.from_pairs, KEYED_METHOD, KEYED_TARGET, pairs)


# --------------------------------------------------------------------------- 2. decide, keyed


@pytest.mark.benchmark(group="2 decide keyed", **FAST)
@pytest.mark.parametrize("n_sessions", SESSION_COUNTS)
@pytest.mark.parametrize("traffic", ["rotating", "hot"])
def test_decide_keyed_hit(
    benchmark: BenchmarkFixture,
    keyed_sessions: list[Session],
    keyed_snapshot: Callable[[int], Snapshot],
    traffic: str,
    n_sessions: int,
) -> None:
    """Key present, session live, route (and its extra match, if it has one) holds.

    ``rotating`` cycles through 1,024 heads whose keys are drawn at random from the loaded
    sessions (one route in ten has an extra match), so a large snapshot is read the way
    real traffic reads it; ``hot`` repeats one head whose route has no extra match, so
    everything stays in cache. Hot isolates the algorithm, rotating adds the memory cost.
    """
    snap = keyed_snapshot(n_sessions)
    by_key = {s.key: s.id for s in keyed_sessions[:n_sessions]}
    if traffic == "rotating":
        heads = rotating_keyed_heads(n_sessions)
    else:
        middle = next(i for i in range(n_sessions // 2, n_sessions) if keyed_sessions[i].routes[0].match is None)
        heads = [head(baggage_with_key(session_key(middle)))] * ROTATING_HEADS
    for h in heads:
        decision = snap.decide(SERVICE, h, NOW)
        assert h.found_key is not None
        assert decision.kind in ("sandbox", "mirror") and decision.session_id == by_key[h.found_key.value]
    next_head = cycler(heads)
    decide = snap.decide

    def run() -> object:
        return decide(SERVICE, next_head(), NOW)

    _target(benchmark, TARGET_DECIDE_KEYED_S, flat_group=f"decide_keyed_hit[{traffic}]", flat_n=n_sessions)
    benchmark(run)


@pytest.mark.benchmark(group="2 decide keyed", **FAST)
def test_decide_keyed_miss(benchmark: BenchmarkFixture, keyed_snapshot: Callable[[int], Snapshot]) -> None:
    """A key no session has (say, an expired one already removed), 100,000 sessions: baseline."""
    snap = keyed_snapshot(MAX_SESSIONS)
    h = head(baggage_with_key("0123456789abcdef"))
    assert snap.decide(SERVICE, h, NOW) is BASELINE
    assert h.found_key is not None and h.found_key.value == "0123456789abcdef"
    _target(benchmark, TARGET_DECIDE_KEYED_S)
    benchmark(snap.decide, SERVICE, h, NOW)


@pytest.mark.benchmark(group="2 decide keyed", **FAST)
def test_decide_no_key(benchmark: BenchmarkFixture, keyed_snapshot: Callable[[int], Snapshot]) -> None:
    """No key in the request, 100,000 keyed sessions, no filter-only routes: baseline."""
    snap = keyed_snapshot(MAX_SESSIONS)
    h = head(BAGGAGE_NO_KEY)
    assert snap.decide(SERVICE, h, NOW) is BASELINE and h.found_key is None
    _target(benchmark, TARGET_DECIDE_KEYED_S)
    benchmark(snap.decide, SERVICE, h, NOW)


# --------------------------------------------------------------------------- 3. decide, filter-only


def _brute_force(sessions: list[Session], h: RequestHead) -> str | None:
    """The winning session id by the documented rule, one route at a time (the oracle)."""
    best: tuple[int, float, str] | None = None
    for s in sessions:
        for r in s.routes:
            if r.service == SERVICE and s.live(NOW) and (r.match is None or r.match.matches(h)):
                rank = (-r.priority, s.created_at, s.id)
                best = rank if best is None or rank < best else best
    return None if best is None else best[2]


@pytest.mark.benchmark(group="3 decide filter-only", **FAST)
@pytest.mark.parametrize("hit", [True, False], ids=["hit", "none"])
@pytest.mark.parametrize("mix", FILTER_MIXES)
def test_decide_filters(
    benchmark: BenchmarkFixture,
    filter_sessions: Callable[[str], list[Session]],
    filter_snapshot: Callable[[str], Snapshot],
    mix: str,
    hit: bool,
) -> None:
    """1,000 filter-only routes on one service, no key; the request matches one route or none."""
    sessions = filter_sessions(mix)
    assert len(sessions) == FILTER_ROUTES
    snap = filter_snapshot(mix)
    h = filter_head(mix, hit)
    decision = snap.decide(SERVICE, h, NOW)
    expected = _brute_force(sessions, h)
    assert decision.session_id == expected
    if hit:
        # mirrord's filters are unanchored: "x-dev: dev7" also matches dev737, and is older.
        winner = "-0007" if mix == "mirrord_header" else f"-{FILTER_HIT:04d}"
        assert expected is not None and expected.endswith(winner)
    else:
        assert decision is BASELINE
    _target(benchmark, TARGET_DECIDE_FILTERS_S)
    benchmark(snap.decide, SERVICE, h, NOW)


# --------------------------------------------------------------------------- 4. compile and validate


def _collect() -> None:
    gc.collect()  # start each round from a clean heap; not timed


def _pedantic(benchmark: BenchmarkFixture, fn: Callable[..., T], args: tuple[object, ...], rounds: int) -> T:
    """``rounds`` single calls, each after an untimed ``gc.collect()``: for second-long work."""
    result: T = benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark leaves it untyped
        fn, args=args, setup=_collect, rounds=rounds, iterations=1)
    return result


@pytest.mark.benchmark(group="4 compile")
def test_compile_100k_sessions(benchmark: BenchmarkFixture, keyed_sessions: list[Session]) -> None:
    """``compile_snapshot`` of 100,000 parsed sessions (~200,000 routes over 41 services)."""
    snap = compile_snapshot(keyed_sessions, "check", KeyConfig())
    assert len(snap.sessions) == MAX_SESSIONS and SERVICE in snap.services
    del snap
    _target(benchmark, TARGET_COMPILE_100K_S)
    _pedantic(benchmark, compile_snapshot, (keyed_sessions, "v1", KeyConfig()), rounds=3)


@pytest.mark.benchmark(group="4 compile")
def test_compile_1k_filter_routes(benchmark: BenchmarkFixture, filter_sessions: Callable[[str], list[Session]]) -> None:
    """Reference, no target: compiling the mixed 1,000 filter-only routes (RE2 sets, overlap check)."""
    sessions = filter_sessions("mixed")
    _target(benchmark, None)
    _pedantic(benchmark, compile_snapshot, (sessions, "v1", KeyConfig()), rounds=5)


@pytest.mark.benchmark(group="4 compile")
def test_parse_100k_sessions(benchmark: BenchmarkFixture) -> None:
    """Reference, no target: ``parse_sessions`` (validation, conflicts) of 100,000 session dicts."""
    specs = keyed_session_specs(MAX_SESSIONS)
    _target(benchmark, None)
    sessions = _pedantic(benchmark, parse_sessions, (specs,), rounds=3)
    assert len(sessions) == MAX_SESSIONS
