"""Fixtures shared by the micro-benchmarks: parsed sessions and compiled snapshots, built once."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.micro.workloads import MAX_SESSIONS, filter_session_specs, keyed_session_specs
from filters import KeyConfig, Session, Snapshot, compile_snapshot, parse_sessions


@pytest.fixture(scope="session")
def keyed_sessions() -> list[Session]:
    """The 100,000 sessions of the scaling workload, validated (the specs are dropped)."""
    return parse_sessions(keyed_session_specs(MAX_SESSIONS))


@pytest.fixture(scope="session")
def keyed_snapshot(keyed_sessions: list[Session]) -> Callable[[int], Snapshot]:
    """``keyed_snapshot(n)``: a snapshot of the first ``n`` sessions, compiled once per ``n``."""
    cache: dict[int, Snapshot] = {}

    def get(n: int) -> Snapshot:
        if n not in cache:
            cache[n] = compile_snapshot(keyed_sessions[:n], f"keyed-{n}", KeyConfig())
        return cache[n]

    return get


@pytest.fixture(scope="session")
def filter_sessions() -> Callable[[str], list[Session]]:
    """``filter_sessions(mix)``: the 1,000 filter-only sessions of one mix, parsed once."""
    cache: dict[str, list[Session]] = {}

    def get(mix: str) -> list[Session]:
        if mix not in cache:
            cache[mix] = parse_sessions(filter_session_specs(mix))
        return cache[mix]

    return get


@pytest.fixture(scope="session")
def filter_snapshot(filter_sessions: Callable[[str], list[Session]]) -> Callable[[str], Snapshot]:
    """``filter_snapshot(mix)``: the compiled snapshot of one mix, compiled once."""
    cache: dict[str, Snapshot] = {}

    def get(mix: str) -> Snapshot:
        if mix not in cache:
            cache[mix] = compile_snapshot(filter_sessions(mix), f"filters-{mix}", KeyConfig())
        return cache[mix]

    return get
