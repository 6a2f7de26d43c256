"""Passive outlier detection for sandbox destinations, without I/O.

A sandbox that refuses connections costs a request little; one that accepts and never
answers costs it the whole response timeout. So a destination is ejected after
``consecutive_failures`` failures in a row, or at once after a timeout, and while it is
ejected its routes' fallback applies without trying it (Envoy's outlier detection, per
worker). Each ejection of the same destination lasts twice the previous one, up to a cap;
one success forgets its history.
"""

from __future__ import annotations

from typing import Any

Key = tuple[str, int]


class _Host:
    __slots__ = ("failures", "ejections", "ejected_until", "cause")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.cause = ""


class OutlierDetector:
    """Consecutive failures and ejections per destination."""

    def __init__(self, consecutive_failures: int, base_ejection_s: float, max_ejection_s: float,
                 max_hosts: int = 4096) -> None:
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_hosts = max_hosts  # bounded: a stream of failing made-up destinations cannot grow memory
        self._hosts: dict[Key, _Host] = {}
        self.ejections_total = 0

    def ejected(self, key: Key, now: float) -> bool:
        """Whether ``key`` is ejected at ``now``."""
        host = self._hosts.get(key)
        return host is not None and now < host.ejected_until

    def failure(self, key: Key, now: float, cause: str, timeout: bool) -> bool:
        """Count a failure; returns True when it ejects the destination (a timeout ejects at once)."""
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= self.max_hosts:
                self._hosts.pop(next(iter(self._hosts)))  # the oldest entry
            host = self._hosts[key] = _Host()
        host.failures += 1
        host.cause = cause
        if now < host.ejected_until or (host.failures < self.consecutive_failures and not timeout):
            return False
        host.ejections += 1
        host.failures = 0
        seconds = min(self.max_ejection_s, self.base_ejection_s * (1 << min(host.ejections - 1, 20)))
        host.ejected_until = now + seconds
        self.ejections_total += 1
        return True

    def success(self, key: Key) -> None:
        """A request to ``key`` got its response: its history is forgotten."""
        if self._hosts:
            self._hosts.pop(key, None)

    def report(self, now: float) -> list[dict[str, Any]]:
        """Destinations with failures or ejected, for /config_dump and explain."""
        return [{"destination": (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"),
                 "consecutive_failures": h.failures, "ejections": h.ejections,
                 "ejected_for_s": round(max(0.0, h.ejected_until - now), 3), "last_cause": h.cause}
                for (host, port), h in self._hosts.items()]
