"""turnout's routing rules: pure, synchronous, no I/O.

Routing-key extraction (W3C baggage and the legacy forms), request matchers, the session
and route model with its validation, and the snapshot compiler whose ``decide`` picks
baseline or a session's sandbox for each request. The data plane and the control plane
both import this package; it imports neither.
"""

from filters.baggage import BaggageMember, MemberExtractor, baggage_values, parse_baggage
from filters.errors import Problem, TurnoutError, ValidationError
from filters.head import RequestHead
from filters.keys import KeyConfig, KeyExtractor, parse_key_config
from filters.matchers import Matcher, MatchLimits, parse_match
from filters.model import (
    TUNNEL,
    UPSTREAM_PROTOCOLS,
    Address,
    Route,
    RuleLimits,
    Session,
    finite_number,
    parse_address,
    parse_session,
    parse_sessions,
)
from filters.snapshot import BASELINE, Decision, Snapshot, compile_snapshot
from filters.sources import FoundKey, KeySource

__all__ = [
    "BASELINE",
    "TUNNEL",
    "UPSTREAM_PROTOCOLS",
    "Address",
    "BaggageMember",
    "Decision",
    "FoundKey",
    "KeyConfig",
    "KeyExtractor",
    "KeySource",
    "MatchLimits",
    "Matcher",
    "MemberExtractor",
    "Problem",
    "RequestHead",
    "Route",
    "RuleLimits",
    "Session",
    "Snapshot",
    "TurnoutError",
    "ValidationError",
    "baggage_values",
    "compile_snapshot",
    "finite_number",
    "parse_address",
    "parse_baggage",
    "parse_key_config",
    "parse_match",
    "parse_session",
    "parse_sessions",
]
