"""turnout's own error types for the data plane, raised at the boundary."""

from __future__ import annotations

from filters import TurnoutError


class HttpError(TurnoutError):
    """A request or response turnout refuses: the status to answer and a reason to show.

    ``cause`` is a short machine-readable token for the ``x-turnout-error`` header and the
    metrics (``bad_framing``, ``head_too_large``, ...).
    """

    def __init__(self, status: int, reason: str, cause: str = "bad_request") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.cause = cause
