"""The control plane's subcommands: ``control-plane``, ``session ...`` and ``status``."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    """Add the control plane's subcommands to ``sub``."""
