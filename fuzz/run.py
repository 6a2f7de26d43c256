"""Run turnout's fuzz targets: coverage-guided under atheris, or a smoke replay of their corpus.

::

    python -m fuzz.run [--seconds N] [--target NAME ...] [--json]   # fuzz each target N seconds
    python -m fuzz.run --smoke [--seconds N] [--target NAME ...]    # replay seeds + saved corpus
    python -m fuzz.run --merge [--target NAME ...]                  # minimize the saved corpus

Arguments of libFuzzer's form (``-max_len=8192``, ``-dict=FILE``) are handed to it.

A target is a module in ``fuzz/targets/`` (names starting with ``_`` are helpers) exposing
``fuzz_one(data: bytes) -> None``, which raises on a finding, and ``seeds() -> list[bytes]``.
Its saved corpus is ``fuzz/corpus/<name>/``, one input a file, kept in the repository.

Fuzzing runs each target in its own process (``--worker``), with turnout's packages
instrumented for coverage, for ``--seconds`` (libFuzzer's ``-max_total_time``). What it
learns goes to ``fuzz/.work/<name>/corpus`` (not committed: ``--merge`` keeps the inputs
that add coverage beyond the seeds in the saved corpus); a crashing, hanging or
memory-hungry input is written next to it as ``crash-*``, ``timeout-*`` or ``oom-*``, and
the run exits non-zero. The smoke pass needs no atheris: it calls ``fuzz_one`` on every
seed and every saved input, so an input that crashed once keeps being checked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
TARGETS_DIR = FUZZ_DIR / "targets"
CORPUS_DIR = FUZZ_DIR / "corpus"
WORK_DIR = FUZZ_DIR / ".work"
# The packages whose code the fuzzer measures coverage in (and the targets themselves).
INSTRUMENTED = ["filters", "dataplane", "controlplane", "turnout", "fuzz"]
# More for some targets: PyYAML's own branches and comparisons lead the file loaders' inputs
# to YAML's tags, anchors and scalar forms.
INSTRUMENTED_ALSO = {"config_loader": ["yaml"], "policy_file": ["yaml"]}
# libFuzzer options for every target: one input taking 10 s is a finding (a hang or a
# quadratic path), as is one needing 2 GiB.
LIBFUZZER_OPTIONS = ["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]
# libFuzzer's names for what it saves of a finding (-artifact_prefix).
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
# The whole fuzz run gets this long beyond --seconds to start, load its corpus and stop.
_GRACE_S = 120


def target_names() -> list[str]:
    """Every target in ``fuzz/targets/``, sorted."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.py") if not p.stem.startswith("_"))


def corpus_files(name: str) -> list[Path]:
    """The saved corpus of target ``name``, sorted by file name."""
    directory = CORPUS_DIR / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


@dataclass
class Failure:
    """One input that made ``fuzz_one`` raise in the smoke pass."""

    target: str
    input: str  # "seed-N" or the corpus file's path relative to the repository
    error: str  # the traceback


def replay(name: str) -> tuple[int, list[Failure]]:
    """Call target ``name``'s ``fuzz_one`` on its seeds and its saved corpus: (inputs, failures)."""
    module = importlib.import_module("fuzz.targets." + name)
    fuzz_one: Callable[[bytes], None] = module.fuzz_one
    failures = []
    try:
        inputs: list[tuple[str, bytes]] = [(f"seed-{i}", seed) for i, seed in enumerate(module.seeds())]
    except Exception:
        failures.append(Failure(name, "seeds()", traceback.format_exc()))
        inputs = []
    inputs += [(str(path.relative_to(ROOT)), path.read_bytes()) for path in corpus_files(name)]
    for label, data in inputs:
        try:
            fuzz_one(data)
        except Exception:
            failures.append(Failure(name, label, traceback.format_exc()))
    return len(inputs), failures


@dataclass
class FuzzResult:
    """What one target's fuzz run reported."""

    target: str
    seconds: int
    runs: int = 0
    exec_per_s: int = 0
    cov: int = 0  # libFuzzer's coverage counters (edges) at the end
    ft: int = 0  # its features (edges by hit count, comparisons)
    corpus: int = 0  # inputs in the working corpus at the end
    new_units: int = 0
    peak_rss_mb: int = 0
    exit_code: int = 0
    findings: list[str] = field(default_factory=list)  # crash-*, timeout-*, ... files saved
    log: str = ""


_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
_PROGRESS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


def parse_log(result: FuzzResult, text: str) -> None:
    """Fill ``result`` from libFuzzer's output: its final stats and last progress line."""
    stats = {key: int(value) for key, value in _STAT.findall(text)}
    result.runs = stats.get("number_of_executed_units", 0)
    result.exec_per_s = stats.get("average_exec_per_sec", 0)
    result.new_units = stats.get("new_units_added", 0)
    result.peak_rss_mb = stats.get("peak_rss_mb", 0)
    progress = _PROGRESS.findall(text)
    if progress:
        result.cov, result.ft, result.corpus = (int(v) for v in progress[-1])


def _work(name: str) -> Path:
    return WORK_DIR / name


def _artifacts(directory: Path) -> set[Path]:
    return {p for p in directory.iterdir() if p.name.startswith(ARTIFACT_PREFIXES)} if directory.is_dir() else set()


def fuzz_target(name: str, seconds: int, extra: Sequence[str] = ()) -> FuzzResult:
    """Fuzz one target for ``seconds`` in a child process; its findings are saved in ``fuzz/.work/<name>/``."""
    work = _work(name)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    before = _artifacts(work)
    log_path = work / "fuzz.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "fuzz.run", "--worker", name, "--seconds", str(seconds), *extra]
    result = FuzzResult(name, seconds, log=str(log_path.relative_to(ROOT)))
    with log_path.open("wb") as log:
        try:
            result.exit_code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              timeout=seconds + _GRACE_S, check=False).returncode
        except subprocess.TimeoutExpired:
            result.exit_code = -1
            result.findings.append("the run did not stop within --seconds + " + str(_GRACE_S))
    parse_log(result, log_path.read_text(errors="replace"))
    result.findings += sorted(str(p.relative_to(ROOT)) for p in _artifacts(work) - before)
    if result.exit_code and not result.findings:
        result.findings.append(f"exit code {result.exit_code} (see {result.log})")
    return result


def _instrumented(name: str) -> Any:
    """Target ``name``'s module, with turnout's packages instrumented for coverage.

    Its temporary files go to ``fuzz/.work/<name>/tmp``: libFuzzer ends the process without
    running Python's exit handlers, which would remove them."""
    import atheris

    tmp = _work(name) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)

    with atheris.instrument_imports(include=INSTRUMENTED + INSTRUMENTED_ALSO.get(name, [])):
        return importlib.import_module("fuzz.targets." + name)


def _worker(name: str, seconds: int, merge: bool, extra: Sequence[str]) -> None:
    """Child process: instrument turnout, load the target, and run libFuzzer on it."""
    import atheris

    shutil.rmtree(_work(name) / "tmp", ignore_errors=True)  # what earlier runs left
    module = _instrumented(name)
    work = _work(name)
    saved = CORPUS_DIR / name
    saved.mkdir(parents=True, exist_ok=True)
    seeds = work / "seeds"
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    for i, seed in enumerate(module.seeds()):
        (seeds / f"seed-{i}").write_bytes(seed)
    if merge:
        # The seeds first, so only inputs adding coverage beyond them are kept; then dropped.
        merged = work / "merged"
        shutil.rmtree(merged, ignore_errors=True)
        shutil.copytree(seeds, merged)
        args = ["-merge=1", str(merged), str(saved), str(work / "corpus")]
    else:
        args = [f"-max_total_time={seconds}", f"-artifact_prefix={work}/", str(work / "corpus"), str(seeds),
                str(saved)]
    # A merge runs its work in processes libFuzzer starts through the shell with its own
    # argv[0] and flags added: that is this worker again (--inner), taking them as given.
    argv0 = f"{sys.executable} -m fuzz.run --worker {name} --inner"
    atheris.Setup([argv0, *LIBFUZZER_OPTIONS, *extra, *args], module.fuzz_one)
    atheris.Fuzz()


def _inner(name: str, args: Sequence[str]) -> None:
    """A process libFuzzer started (see ``_worker``): its arguments go to libFuzzer as they are."""
    import atheris

    module = _instrumented(name)
    atheris.Setup([sys.argv[0], *args], module.fuzz_one)
    atheris.Fuzz()


def merge_target(name: str, extra: Sequence[str] = ()) -> tuple[int, int]:
    """Replace target ``name``'s saved corpus by the inputs of it and of its working corpus
    that add coverage beyond the seeds (libFuzzer ``-merge=1``); saved ``crash-*`` inputs
    are always kept. Returns (files before, files after)."""
    work = _work(name)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    saved = CORPUS_DIR / name
    before = corpus_files(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "fuzz.run", "--worker", name, "--merge", *extra], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    merged = work / "merged"
    for seed in (work / "seeds").iterdir():
        (merged / seed.name).unlink(missing_ok=True)
    saved.mkdir(parents=True, exist_ok=True)
    for path in before:
        if not path.name.startswith("crash-"):
            path.unlink()
    for path in merged.iterdir():
        shutil.copyfile(path, saved / path.name)
    shutil.rmtree(merged)
    return len(before), len(corpus_files(name))


def corpus_bytes() -> int:
    """The size of every saved corpus together."""
    return sum(p.stat().st_size for p in CORPUS_DIR.rglob("*") if p.is_file())


def _smoke(names: Sequence[str], seconds: int, as_json: bool, extra: Sequence[str]) -> int:
    report = []
    failed = False
    for name in names:
        started = time.perf_counter()
        count, failures = replay(name)
        entry: dict[str, object] = {"target": name, "inputs": count, "seconds": round(time.perf_counter() - started, 2),
                                    "failures": [asdict(f) for f in failures]}
        failed = failed or bool(failures)
        if seconds:
            result = fuzz_target(name, seconds, extra)
            entry["fuzz"] = asdict(result)
            failed = failed or bool(result.findings)
        report.append(entry)
        if not as_json:
            print(f"{name}: {count} inputs replayed in {entry['seconds']} s, {len(failures)} failing")
            for failure in failures:
                print(f"  FAIL {failure.input}\n" + "\n".join("    " + line for line in failure.error.splitlines()))
            if seconds:
                _print_result(result)
    if as_json:
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


def _print_result(result: FuzzResult) -> None:
    print(f"{result.target}: {result.runs} runs in {result.seconds} s ({result.exec_per_s} exec/s), "
          f"cov {result.cov} ft {result.ft}, corpus {result.corpus} (+{result.new_units}), "
          f"rss {result.peak_rss_mb} MB, {len(result.findings)} finding(s)  [log: {result.log}]")
    for finding in result.findings:
        print("  FINDING " + finding)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=None,
                        help="fuzz each target this long (default 60; with --smoke, 0: replay only)")
    parser.add_argument("--target", nargs="+", choices=target_names(), help="only these targets")
    parser.add_argument("--smoke", action="store_true", help="replay seeds and the saved corpus (no atheris needed)")
    parser.add_argument("--merge", action="store_true", help="minimize the saved corpus with libFuzzer -merge=1")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    if args.worker and args.inner:
        _inner(args.worker, extra)
        return 0
    unknown = [arg for arg in extra if not re.fullmatch(r"-\w+=.*", arg)]
    if unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if args.worker:
        _worker(args.worker, args.seconds or 0, args.merge, extra)
        return 0
    names = args.target or target_names()
    if args.smoke:
        return _smoke(names, args.seconds or 0, args.json, extra)
    if args.merge:
        for name in names:
            before, after = merge_target(name, extra)
            print(f"{name}: saved corpus {before} -> {after} files")
        print(f"all corpora: {corpus_bytes()} bytes")
        return 0
    seconds = 60 if args.seconds is None else args.seconds
    results = []
    for name in names:
        result = fuzz_target(name, seconds, extra)
        results.append(result)
        if not args.json:
            _print_result(result)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
