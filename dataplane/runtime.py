"""The runtime snapshot: what a request is served with, in one immutable object.

Limits, the routing snapshot, the HTTP/1.1 codec, debug headers, the baggage member the
key is propagated in, the tracer and the access log change together (a reload, a push) and
are read together by every request; they live in one ``Runtime``, built aside and swapped
by one reference (``Router.runtime``). A connection or a stream keeps the one its request
started with, so nothing is half old and half new.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from dataplane.accesslog import AccessLog
from dataplane.http1.codec import make_codec

if TYPE_CHECKING:
    from dataplane.config import Limits, ProxyConfig
    from dataplane.http1.codec import HeadCodec
    from dataplane.tracing import RequestTracer
    from filters import Snapshot


class Runtime:
    """One immutable snapshot of everything a request is served with."""

    __slots__ = ("config", "limits", "snapshot", "codec", "debug_headers", "propagate_member", "tracer",
                 "access_log")

    def __init__(self, config: ProxyConfig, snapshot: Snapshot, codec: HeadCodec, tracer: RequestTracer | None,
                 access_log: AccessLog | None) -> None:
        self.config = config
        self.limits: Limits = config.limits
        self.snapshot = snapshot  # the routing table: the bootstrap file's sessions and the pushed ones
        self.codec = codec
        self.debug_headers = config.debug_headers
        baggage = [s for s in snapshot.key_config.sources if s.kind == "baggage"]
        # A key found elsewhere (query, cookie, a legacy header) is copied into this member.
        self.propagate_member = (baggage[0].names[0] if baggage else "turnout-session").encode()
        self.tracer = tracer
        self.access_log = access_log

    def with_snapshot(self, snapshot: Snapshot) -> Runtime:
        """The same runtime with another routing snapshot (a push changed the sessions)."""
        return Runtime(self.config, snapshot, self.codec, self.tracer, self.access_log)

    def close(self, successor: Runtime | None) -> None:
        """Release the tracer and access log that ``successor`` does not share (a reload
        changed them, or shutdown: ``successor`` None)."""
        if self.tracer is not None and (successor is None or successor.tracer is not self.tracer):
            self.tracer.shutdown()
        if self.access_log is not None and (successor is None or successor.access_log is not self.access_log):
            self.access_log.close()


def build_runtime(config: ProxyConfig, snapshot: Snapshot, codec_name: str, instance: str,
                  previous: Runtime | None = None) -> Runtime:
    """A runtime for ``config``, keeping ``previous``'s tracer and access log when their
    settings did not change (a reload must not reopen files or lose queued spans)."""
    codec = make_codec(codec_name, config.limits.max_head_bytes)
    tracer = None
    if config.tracing is not None:
        if previous is not None and previous.tracer is not None and previous.tracer.config == config.tracing:
            tracer = previous.tracer
        else:
            from dataplane.tracing import RequestTracer  # the SDK loads only when tracing is on

            try:
                tracer = RequestTracer(config.tracing, instance)
            except OSError as exc:  # e.g. the console exporter's file: serve untraced rather than not at all
                sys.stderr.write(f"turnout: tracing off, cannot open its output: {exc}\n")
    access_log = None
    if config.access_log is not None:
        if (previous is not None and previous.access_log is not None
                and previous.config.access_log == config.access_log):
            access_log = previous.access_log
        else:
            access_log = AccessLog(config.access_log.path, instance)
    return Runtime(config, snapshot, codec, tracer, access_log)
