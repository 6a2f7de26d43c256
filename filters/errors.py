"""turnout's own error types for rules: every problem names the field and the reason."""

from __future__ import annotations

from dataclasses import dataclass


class TurnoutError(Exception):
    """Base class of every error turnout raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a rule: where (a dotted field path) and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class ValidationError(TurnoutError):
    """A rule, session or snapshot was refused; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))
