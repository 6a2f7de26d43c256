"""Session-wide guard: never test a stale compiled module instead of its source.

``make compile`` puts mypyc-built extensions next to the hot modules and Python imports
them before the ``.py`` files; one older than its source would run old code in every test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stale_extensions(root: Path = ROOT) -> list[str]:
    """Compiled modules (``name.cpython-*.so``) older than their ``name.py``."""
    stale = []
    for package in ("dataplane", "filters", "controlplane", "turnout"):
        for extension in (root / package).rglob("*.so"):
            source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
            if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
                stale.append(str(extension.relative_to(root)))
    return sorted(stale)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop before any test runs when a compiled module is out of date."""
    stale = stale_extensions()
    if stale:
        raise pytest.UsageError("compiled modules older than their sources: " + ", ".join(stale)
                                + "; run `make compile` again, or `make clean-compiled` for pure Python")
