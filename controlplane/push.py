"""The gRPC push service: streams sessions to every subscribed proxy (work in progress)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from turnout.v1 import config_pb2_grpc


class PushService(config_pb2_grpc.SessionDiscoveryServicer):
    """Serves ``turnout.v1.SessionDiscovery`` from a ``SessionStore``."""

    def __init__(self, store: Any, control_plane_id: str, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.control_plane_id = control_plane_id

    def proxies(self) -> list[dict[str, Any]]:
        """Every proxy connected now or seen before, with the version it runs."""
        return []

    async def close(self) -> None:
        """End every stream (shutdown)."""
