"""deploy/Dockerfile, read statically (no container engine here): stages, user, sources, entrypoint.

The checks tie the image to the repository: every package setuptools ships is copied, every
COPY source exists and gets past the build-context filter, the entrypoint is the console
script pyproject declares, the user is the one the manifests run as, and the ports the
manifests use are exposed.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from turnout.inject import RUN_AS_USER, InjectOptions

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"


@dataclass
class Stage:
    """One FROM ... stage and its instructions, in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction with this keyword."""
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage; comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _copy_sources(stage: Stage) -> list[str]:
    sources: list[str] = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    return sources


def test_is_multi_stage_with_a_slim_runtime() -> None:
    assert len(STAGES) >= 2
    assert STAGES[0].name == "builder"
    assert STAGES[-1].base == "python:3.11-slim"
    runtime_copies = _copy_sources(STAGES[-1])
    assert not runtime_copies, f"the runtime stage copies sources from the context: {runtime_copies}"


def test_builder_copies_every_package_setuptools_ships() -> None:
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    copied = {src.rstrip("/") for src in _copy_sources(STAGES[0])}
    assert packages <= copied, f"packages not copied into the builder: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied  # pyproject names README.md as the readme


def test_every_copy_source_exists_and_passes_the_context_filter() -> None:
    kept = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*", "the filter starts from nothing and lists what the build needs"
    for stage in STAGES:
        for src in _copy_sources(stage):
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert src.rstrip("/") in kept, f"COPY {src}: excluded by {DOCKERIGNORE.name}"


def test_installs_only_runtime_dependencies_from_the_built_wheels() -> None:
    builder_runs = " ".join(STAGES[0].all("RUN"))
    assert "pip wheel" in builder_runs and "[" not in builder_runs, "no extras (test tools) in the image"
    runtime_runs = " ".join(STAGES[-1].all("RUN"))
    assert "--no-index" in runtime_runs and "from=builder" in runtime_runs
    assert "pip install" in runtime_runs and "--no-cache-dir" in runtime_runs


def test_runs_as_the_non_root_user_the_manifests_expect() -> None:
    users = STAGES[-1].all("USER")
    assert users, "the runtime stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    assert int(uid) == RUN_AS_USER
    last = [kw for kw, _ in STAGES[-1].instructions]
    assert "RUN" not in last[last.index("USER"):], "nothing runs as root after USER"


def test_entrypoint_is_the_turnout_console_script_and_no_healthcheck() -> None:
    (entrypoint,) = STAGES[-1].all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["turnout"]
    assert "turnout" in PYPROJECT["project"]["scripts"]
    assert not any(stage.all("HEALTHCHECK") for stage in STAGES), "Kubernetes probes do health checks"


def test_exposes_the_ports_the_manifests_use() -> None:
    exposed = {int(p) for args in STAGES[-1].all("EXPOSE") for p in args.split()}
    defaults = InjectOptions()
    assert {defaults.proxy_port, defaults.admin_port, 15002, 18000, 18080} <= exposed


def test_documents_the_build_command() -> None:
    assert "docker build -f deploy/Dockerfile -t turnout:" in DOCKERFILE.read_text()


def test_builder_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    """The files the builder copies are enough to build turnout's wheel, and it has every module."""
    src = tmp_path / "src"
    src.mkdir()
    for name in _copy_sources(STAGES[0]):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    # No build isolation: the check must run offline, with the setuptools the venv has.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "out"), str(src)], check=True, timeout=120, capture_output=True)
    (wheel,) = (tmp_path / "out").glob("turnout-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (pattern.rstrip("*") for pattern in includes):
        for module in (ROOT / package).rglob("*.py"):
            relative = module.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert relative in names, f"{relative} is missing from the image's wheel"
    assert "turnout/v1/config.proto" in names
    assert "turnout = turnout.cli:main" in entry_points
