"""The fuzz targets' smoke pass (fuzz/run.py): every target's seeds and saved corpus go
through its ``fuzz_one``, so an input that once found a bug keeps being checked. A failure
names the target and each failing input (a seed, or a file under fuzz/corpus/)."""

from __future__ import annotations

import pytest

from fuzz.run import corpus_bytes, replay, target_names


@pytest.mark.parametrize("target", target_names())
def test_target_replays_its_corpus(target: str) -> None:
    count, failures = replay(target)
    assert count, "a target without seeds or corpus"
    assert not failures, "\n\n".join(f"{f.target}: {f.input}\n{f.error}" for f in failures)


def test_targets_are_discovered() -> None:
    assert {"h2_engine_server", "h2_engine_client", "hpack_differential", "chunked_splits", "baggage_keys",
            "controlplane_json", "config_loader", "policy_file"} <= set(target_names())


def test_saved_corpora_stay_small() -> None:
    assert corpus_bytes() < 1 << 20, "minimize with `python -m fuzz.run --merge` (see fuzz/README.md)"
