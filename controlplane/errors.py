"""The control plane's own error types; each knows its HTTP status and JSON body."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from filters import TurnoutError


class ControlPlaneError(TurnoutError):
    """A request the control plane refuses; ``kind`` and ``status`` shape the API reply."""

    kind: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON error body."""
        return {"error": self.kind, "message": self.message}

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Extra response headers the reply needs."""
        return ()


class Conflict(ControlPlaneError):
    """The session id exists, another session holds a (key, service) claim, or another owner's
    filter-only session already matches requests this one could take; ``holder`` names it,
    ``session`` the session refused (when it has an id)."""

    kind = "conflict"
    status = 409

    def __init__(self, message: str, holder: str, session: str | None = None) -> None:
        self.holder = holder
        self.session = session
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON error body, with the holding session's id."""
        body = {**super().to_dict(), "holder": self.holder}
        if self.session is not None:
            body["session"] = self.session
        return body


class Forbidden(ControlPlaneError):
    """The caller may not do this to this session; ``owner`` names who may (with admins)."""

    kind = "forbidden"
    status = 403

    def __init__(self, message: str, owner: str | None = None) -> None:
        self.owner = owner
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON error body, naming the session's owner."""
        body = super().to_dict()
        if self.owner is not None:
            body["owner"] = self.owner
        return body


class RateLimited(ControlPlaneError):
    """Too many changes by one identity; ``retry_after_s`` says when the next one is allowed."""

    kind = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)

    def headers(self) -> tuple[tuple[str, str], ...]:
        """``Retry-After`` in whole seconds, rounded up (RFC 9110 section 10.2.3)."""
        return (("retry-after", str(max(1, math.ceil(self.retry_after_s)))),)


class NotFound(ControlPlaneError):
    """No session with that id (it may have expired)."""

    kind = "not_found"
    status = 404


class PolicyRefused(ControlPlaneError):
    """A guardrail of the policy file refused the request; ``policy`` is the rule's name."""

    kind = "policy"
    status = 403

    def __init__(self, policy: str, message: str) -> None:
        self.policy = policy
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON error body, naming the policy that refused."""
        return {"error": self.kind, "policy": self.policy, "message": self.message}


class Unauthorized(ControlPlaneError):
    """A missing or wrong bearer token; ``invalid_token`` tells the two apart in the challenge."""

    kind = "unauthorized"
    status = 401

    def __init__(self, message: str, invalid_token: bool) -> None:
        self.invalid_token = invalid_token
        super().__init__(message)

    def headers(self) -> tuple[tuple[str, str], ...]:
        """The RFC 6750 challenge."""
        challenge = 'Bearer realm="turnout"' + (', error="invalid_token"' if self.invalid_token else "")
        return (("www-authenticate", challenge),)


class StartupError(TurnoutError):
    """The control plane cannot start as configured (a flag, a token or certificate file, the database)."""
