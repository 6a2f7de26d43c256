"""A client of the control plane's HTTP API (urllib: no dependency beyond the standard library)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

from filters import TurnoutError


class Unreachable(TurnoutError):
    """The control plane could not be reached (connection, TLS or timeout); ``url`` says where."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"control plane at {url} is unreachable: {reason}")


class ApiError(TurnoutError):
    """The control plane answered with an error; ``body`` is its JSON (``error``, ``message``, ...)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(str(body.get("message") or body.get("error") or f"HTTP {status}"))


class ControlPlaneClient:
    """Calls the API at ``base_url`` with a bearer ``token``; ``ca_file`` verifies an HTTPS server."""

    def __init__(self, base_url: str, token: str | None = None, ca_file: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        handlers: list[urllib.request.BaseHandler] = []
        if ca_file is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; returns the decoded JSON (None for an empty reply), raises ``ApiError`` or ``Unreachable``."""
        url = self.base_url + path
        headers = {"accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if self._token is not None:
            headers["authorization"] = "Bearer " + self._token
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, _error_body(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            raise Unreachable(self.base_url, str(exc.reason)) from None
        except (OSError, ValueError) as exc:  # resets, timeouts, a malformed reply
            raise Unreachable(self.base_url, str(exc) or exc.__class__.__name__) from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise Unreachable(self.base_url, "the reply is not JSON: is this turnout's control plane?") from None

    def create_session(self, spec: dict[str, Any]) -> Any:
        """``POST /v1/sessions``: ``{"session", "revision"}``."""
        return self.call("POST", "/v1/sessions", spec)

    def list_sessions(self, owner: str | None = None) -> Any:
        """``GET /v1/sessions``: ``{"revision", "sessions"}``."""
        return self.call("GET", "/v1/sessions" + ("?" + urlencode({"owner": owner}) if owner is not None else ""))

    def get_session(self, session_id: str) -> Any:
        """``GET /v1/sessions/{id}``."""
        return self.call("GET", "/v1/sessions/" + quote(session_id, safe=""))

    def extend_session(self, session_id: str, ttl_s: float) -> Any:
        """``POST /v1/sessions/{id}/extend`` to ``ttl_s`` seconds from now."""
        return self.call("POST", "/v1/sessions/" + quote(session_id, safe="") + "/extend", {"ttl_s": ttl_s})

    def delete_session(self, session_id: str) -> None:
        """``DELETE /v1/sessions/{id}``."""
        self.call("DELETE", "/v1/sessions/" + quote(session_id, safe=""))

    def proxies(self) -> Any:
        """``GET /v1/proxies``: ``{"revision", "proxies"}``."""
        return self.call("GET", "/v1/proxies")


def _error_body(status: int, payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return body
    text = payload.decode(errors="replace").strip()[:200]
    return {"error": "http", "message": f"HTTP {status}" + (f": {text}" if text else "")}
