"""The pure helpers of the memory benchmark (bench/memory/run.py): which processes count as
the proxy's, and how rounds are folded. The benchmark itself is not run here."""

from __future__ import annotations

from bench.memory.run import descendants, spread


def test_descendants_are_the_root_and_everything_below_it() -> None:
    parent_of = {1: 0, 100: 1, 101: 100, 102: 100, 103: 102, 200: 1, 201: 200}
    assert descendants(100, parent_of) == [100, 101, 102, 103]
    assert descendants(103, parent_of) == [103]


def test_descendants_leave_out_a_gone_root_and_other_trees() -> None:
    parent_of = {1: 0, 100: 1, 101: 100, 200: 1}
    assert descendants(999, parent_of) == []
    assert descendants(100, parent_of) == [100, 101]


def test_spread_is_median_min_and_max_to_one_decimal() -> None:
    assert spread([41.94, 40.0, 43.26]) == {"median": 41.9, "min": 40.0, "max": 43.3}
    assert spread([7.0]) == {"median": 7.0, "min": 7.0, "max": 7.0}
