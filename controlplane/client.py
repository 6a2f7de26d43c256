"""A client of the control plane's HTTP API (urllib: no dependency beyond the standard library).

Every failure to talk to a control plane becomes one ``Unreachable`` whose message names
the URL and what to check: nothing listening, a name that does not resolve, the gRPC port
given for the API, plain HTTP against TLS or the other way round, an untrusted
certificate, a server that is not a turnout control plane (every reply of one carries
``server: turnout-control-plane``), no answer in time.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from email.message import Message
from typing import Any
from urllib.parse import quote, urlencode

from controlplane.http import SERVER
from filters import TurnoutError

# The API's default address, for hints.
_API_DEFAULT = "127.0.0.1:18080"


class Unreachable(TurnoutError):
    """No usable answer from ``url``: ``reason`` says what happened and what to check."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot use the control plane at {url}: {reason}")


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
                self._check_server(response.status, response.headers)
                payload = response.read()
        except urllib.error.HTTPError as exc:
            self._check_server(exc.code, exc.headers)
            raise ApiError(exc.code, _error_body(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            raise Unreachable(self.base_url, explain(reason if isinstance(reason, BaseException) else
                                                     OSError(str(reason)), self._timeout_s)) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise Unreachable(self.base_url, explain(exc, self._timeout_s)) from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise Unreachable(self.base_url, "the reply is not JSON: is this turnout's control plane?") from None

    def _check_server(self, status: int, headers: Message | None) -> None:
        server = headers.get("server") if headers is not None else None
        if server != SERVER:
            raise Unreachable(self.base_url, f"it answered HTTP {status} but is not a turnout control plane "
                              f"(server: {server or 'not given'}); check the URL and port (the API's default is "
                              f"{_API_DEFAULT})")

    def create_session(self, spec: dict[str, Any]) -> Any:
        """``POST /v1/sessions``: ``{"session", "revision"}``."""
        return self.call("POST", "/v1/sessions", spec)

    def update_session(self, session_id: str, spec: dict[str, Any]) -> Any:
        """``PUT /v1/sessions/{id}``: ``{"session", "revision"}``."""
        return self.call("PUT", "/v1/sessions/" + quote(session_id, safe=""), spec)

    def list_sessions(self, owner: str | None = None) -> Any:
        """``GET /v1/sessions``: ``{"revision", "sessions"}``."""
        return self.call("GET", "/v1/sessions" + ("?" + urlencode({"owner": owner}) if owner is not None else ""))

    def get_session(self, session_id: str) -> Any:
        """``GET /v1/sessions/{id}``: ``{"session", "revision", "proxies"}``."""
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

    def audit(self, since: float | None = None, session: str | None = None, limit: int | None = None) -> Any:
        """``GET /v1/audit``: ``{"entries": [...]}``."""
        query = {k: str(v) for k, v in (("since", since), ("session", session), ("limit", limit)) if v is not None}
        return self.call("GET", "/v1/audit" + ("?" + urlencode(query) if query else ""))

    def tunnel_ticket(self, session_id: str) -> Any:
        """``POST /v1/sessions/{id}/tunnel``: a one-use ticket to attach a tunnel (``{"ticket", ...}``)."""
        return self.call("POST", "/v1/sessions/" + quote(session_id, safe="") + "/tunnel", {})

    def tunnels(self) -> Any:
        """``GET /v1/tunnels``: ``{"tunnels": [...]}``."""
        return self.call("GET", "/v1/tunnels")

    def attach_tunnel(self, ticket: str, gateway: str, address: str, peer: str) -> Any:
        """``POST /v1/tunnels`` (gateways): redeem a machine's ticket; ``{"tunnel", "session", ...}``."""
        return self.call("POST", "/v1/tunnels", {"ticket": ticket, "gateway": gateway, "address": address,
                                                 "peer": peer})

    def report_tunnel(self, tunnel_id: str, stats: dict[str, Any]) -> Any:
        """``POST /v1/tunnels/{id}`` (gateways): counts, renewing the tunnel's lease."""
        return self.call("POST", "/v1/tunnels/" + quote(tunnel_id, safe=""), stats)

    def detach_tunnel(self, tunnel_id: str, reason: str) -> None:
        """``DELETE /v1/tunnels/{id}`` (gateways): the machine's link is gone."""
        self.call("DELETE", "/v1/tunnels/" + quote(tunnel_id, safe="") + "?" + urlencode({"reason": reason}))

    def whoami(self) -> Any:
        """``GET /v1/whoami``: the caller's identity, groups and rules."""
        return self.call("GET", "/v1/whoami")


def explain(exc: BaseException, timeout_s: float) -> str:
    """What went wrong talking to a control plane, and what to check, in one line."""
    if isinstance(exc, ConnectionRefusedError):
        return (f"connection refused: nothing listens there; is `turnout control-plane` running, and is this its "
                f"--api address (default {_API_DEFAULT})?")
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror}); check the URL"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s; check the address, the port and any firewall"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({exc.verify_message}); pass the CA that signed it with "
                "--ca-file, or check the host name in the URL")
    if isinstance(exc, ssl.SSLError):
        if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                          "UNKNOWN_PROTOCOL", "HTTP_REQUEST"):
            return "the TLS handshake failed: the server does not speak TLS there; use http:// (or check the port)"
        return f"TLS failed ({exc.reason or exc}); check --ca-file and the URL's scheme"
    if isinstance(exc, http.client.RemoteDisconnected):
        return ("the server closed the connection without answering; if it serves HTTPS use https:// "
                "(and --ca-file), otherwise check the port")
    if isinstance(exc, http.client.BadStatusLine):
        line = str(exc.args[0]) if exc.args else ""
        if line.startswith("\x00\x00"):
            return ("it answered in HTTP/2 frames: this is probably the control plane's gRPC port (proxies use it); "
                    f"the API is on its --api port (default {_API_DEFAULT})")
        return "its reply is not HTTP/1.1; check the port (is this the control plane's API?)"
    if isinstance(exc, http.client.HTTPException):
        return f"its reply is not valid HTTP ({exc.__class__.__name__}); check the port"
    if isinstance(exc, ConnectionError):
        return f"the connection failed ({exc.strerror or exc.__class__.__name__}); check the address and port"
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def _error_body(status: int, payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return body
    text = payload.decode(errors="replace").strip()[:200]
    return {"error": "http", "message": f"HTTP {status}" + (f": {text}" if text else "")}
