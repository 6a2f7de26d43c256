"""A worker's upstream side: its pools, the connecting, and passive outlier detection.

``acquire`` hands out a pooled connection with room for a request at once; ``connect``
opens one (for HTTP/2, or joins a connect already under way while it has room).
Connections are made with the limits and codec current when they open; the pools'
decisions live in ``pool.py``, the connections in ``http1/client.py`` and
``http2/client.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from mypy_extensions import mypyc_attr

from dataplane.http1.client import H1Client
from dataplane.http2.client import H2Client, ProtocolMismatch
from dataplane.outlier import OutlierDetector
from dataplane.pool import H1Pool, H2Pool
from dataplane.upstream import NOT_CONNECTED, UpstreamError

if TYPE_CHECKING:
    from dataplane.config import Limits
    from dataplane.http1.codec import HeadCodec
    from dataplane.upstream import Carrier
    from filters import Address

# A caller waits for at most this many HTTP/2 connects that others started (each round
# waits for one to finish) before it opens a connection of its own.
_MAX_JOINS = 16


# Test doubles subclass it (connects that succeed, fail or wait as a test says).
@mypyc_attr(allow_interpreted_subclasses=True)
class Upstreams:
    """Pools, connects and outlier state for one worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits, codec: HeadCodec) -> None:
        self.loop = loop
        self.limits = limits
        self.codec = codec
        self.h1: H1Pool[H1Client] = H1Pool(limits.upstream_max_idle_per_destination)
        self.h2: H2Pool[H2Client] = H2Pool()
        self.outliers = OutlierDetector(limits.outlier_consecutive_failures, limits.outlier_base_ejection_s,
                                        limits.outlier_max_ejection_s)
        self._connecting: dict[tuple[str, int], asyncio.Future[H2Client]] = {}

    def configure(self, limits: Limits, codec: HeadCodec) -> None:
        """New limits and codec, for connections opened from now on."""
        self.limits = limits
        self.codec = codec
        self.h1.max_idle_per_destination = limits.upstream_max_idle_per_destination
        outliers = self.outliers
        outliers.consecutive_failures = limits.outlier_consecutive_failures
        outliers.base_ejection_s = limits.outlier_base_ejection_s
        outliers.max_ejection_s = limits.outlier_max_ejection_s

    # ------------------------------------------------------------------ for the router

    def acquire(self, address: Address, http2: bool) -> Carrier | None:
        """A pooled connection to ``address`` with room for one request, reserved; or None."""
        key = (address.host, address.port)
        return self.h2.acquire(key) if http2 else self.h1.acquire(key)

    async def connect(self, address: Address, http2: bool) -> Carrier:
        """A new connection (HTTP/2: or room on one another caller just opened), reserved;
        raises ``UpstreamError`` (``NOT_CONNECTED``) when connecting fails."""
        if http2:
            return await self._connect_h2(address)
        return await self._connect_h1(address)

    # ------------------------------------------------------------------ H1Owner / H2Owner

    def release(self, conn: H1Client) -> None:
        """An HTTP/1.1 connection is free again: kept idle, or closed over the cap."""
        if not self.h1.release(conn, self.loop.time()):
            conn.cancel()

    def forget(self, conn: H1Client | H2Client) -> None:
        """A connection closed."""
        if isinstance(conn, H1Client):
            self.h1.forget(conn)
        else:
            self.h2.forget(conn)

    # ------------------------------------------------------------------ connecting

    async def _connect_h1(self, address: Address) -> H1Client:
        limits = self.limits
        codec = self.codec
        try:
            async with asyncio.timeout(limits.upstream_connect_timeout_s):
                # H1Client is an asyncio protocol by its methods (its base is the upstream interface).
                factory = cast(Callable[[], asyncio.Protocol], lambda: H1Client(self, address, limits, codec))
                _, protocol = await self.loop.create_connection(factory, address.host, address.port)
        except TimeoutError:
            raise _connect_error(address, "timed out", "connect_timeout") from None
        except OSError as exc:
            raise _connect_error(address, "failed: " + _why(exc), "connect_failed") from None
        conn = cast(H1Client, protocol)
        self.h1.add(conn)
        return conn

    async def _connect_h2(self, address: Address) -> H2Client:
        key = (address.host, address.port)
        for _ in range(_MAX_JOINS):
            # A connection may have become ready since the caller looked, or be on its way.
            conn = self.h2.acquire(key)
            if conn is not None:
                return conn
            pending = self._connecting.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)
        conn = await self._open_h2(address)
        conn.reserved += 1
        return conn

    async def _open_h2(self, address: Address) -> H2Client:
        key = (address.host, address.port)
        future: asyncio.Future[H2Client] = self.loop.create_future()
        self._connecting[key] = future
        limits = self.limits
        conn: H2Client | None = None
        try:
            async with asyncio.timeout(limits.upstream_connect_timeout_s):
                _, conn = await self.loop.create_connection(lambda: H2Client(self, address, limits, self.loop),
                                                            address.host, address.port)
                # Streams are counted against the peer's max_concurrent_streams, which its
                # SETTINGS carry: one round trip on a new connection, never per request.
                await conn.ready
        except TimeoutError:
            error = _connect_error(address, "timed out", "connect_timeout")
        except ProtocolMismatch:
            error = UpstreamError(502, "the upstream at " + str(address) + " answered in HTTP/1.1; set "
                                  "upstream_protocol: http1 for it", "upstream_protocol_mismatch", NOT_CONNECTED)
        except OSError as exc:
            error = _connect_error(address, "failed: " + _why(exc), "connect_failed")
        else:
            assert conn is not None
            self.h2.add(conn)
            future.set_result(conn)
            return conn
        finally:
            if self._connecting.get(key) is future:
                del self._connecting[key]
        if conn is not None:
            conn.close()
        future.set_exception(error)
        future.exception()  # retrieved: joiners re-raise it, nobody else must log it
        raise error

    # ------------------------------------------------------------------ housekeeping

    def tick(self, now: float) -> None:
        """Once a second: close connections idle too long, PING quiet HTTP/2 ones."""
        timeout = self.limits.upstream_idle_timeout_s
        for h1conn in self.h1.expired(now, timeout):
            h1conn.cancel()
        if self.h2:
            idle, live = self.h2.sweep(now, timeout)
            for h2conn in idle:
                h2conn.close()
            for h2conn in live:
                h2conn.check_liveness(now)

    def close_all(self) -> None:
        """Close every connection (shutdown)."""
        for h1conn in self.h1.connections():
            h1conn.cancel()
        for h2conn in self.h2.connections():
            h2conn.close()

    def stats(self) -> dict[str, Any]:
        """Counts for /config_dump."""
        now = self.loop.time()
        return {"http1": self.h1.stats(), "http2": self.h2.stats(), "outliers": self.outliers.report(now)}


def _connect_error(address: Address, what: str, cause: str) -> UpstreamError:
    return UpstreamError(503, "connect to " + str(address) + " " + what, cause, NOT_CONNECTED)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
