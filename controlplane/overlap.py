"""What a route's match can take: whether it is no filter at all, and whether two filters can
match the same request.

The control plane refuses what it cannot prove harmless, so every question here is asked
in the safe direction:

* ``unfiltered(match)``: True when the match holds for ordinary requests that opted into
  nothing. It is evaluated (with the proxies' own ``Matcher.matches``) on plain probe
  requests, whose paths and headers no real filter targets, and also proven statically: a
  path prefix ``/``, a regex that matches the empty string, ``any_of`` holding such a
  match, ``not`` of something that can never match, ``present: false`` or ``invert`` on a
  header plain requests lack. A filter that matches every request is no filter.
* ``disjoint(a, b)``: True only when no request can match both (different exact values of
  one header, ``x`` and ``not x``, prefixes that diverge, ...). Anything it cannot prove
  counts as overlapping.
"""

from __future__ import annotations

import itertools

from filters import Matcher, RequestHead
from filters.matchers import AllOf, AnyOf, HeaderLines, Leaf, Not

# Ordinary requests: every common method, a root and a made-up path, with and without a
# query, carrying only what every client sends. A filter that holds for any of them would
# take traffic from people who never asked for a sandbox.
_PROBE_HEADERS = {"host": "turnout-probe.invalid", "user-agent": "turnout-probe/1", "accept": "*/*"}
_PROBE_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_PROBE_TARGETS = ("/", "/turnout-probe-7c1e/x", "/?turnout-probe=1", "/turnout-probe-7c1e/x?y=z")
# Subjects every request has (a Leaf's field): tests on them never see "absent".
_ALWAYS_PRESENT = frozenset({"path", "target", "method"})
_FINITE = frozenset({"exact", "one_of"})


def _probes() -> tuple[RequestHead, ...]:
    return tuple(RequestHead(method, target, dict(_PROBE_HEADERS))
                 for method, target in itertools.product(_PROBE_METHODS, _PROBE_TARGETS))


_PROBES = _probes()


def unfiltered(match: Matcher | None) -> bool:
    """Whether a route with this match takes ordinary requests (None: no match, every request)."""
    if match is None or _always(match):
        return True
    for probe in _PROBES:
        # A fresh head per probe: heads cache their baggage and header block.
        if match.matches(RequestHead(probe.method, probe.target, dict(probe.headers))):
            return True
    return False


def disjoint(a: Matcher | None, b: Matcher | None) -> bool:
    """Whether it is certain that no request matches both (None matches every request)."""
    if a is None:
        return b is not None and _never(b)
    if b is None:
        return _never(a)
    return _disjoint(a, b)


# --------------------------------------------------------------------------- proofs


def _positive(leaf: Leaf) -> Leaf:
    """The leaf without ``invert`` (an inverted leaf is ``not`` of it)."""
    return Leaf(leaf.field, leaf.name, leaf.test, False, leaf.subject)


def _always(node: Matcher) -> bool:
    """Proven: every request matches."""
    if isinstance(node, Leaf):
        return _leaf_never(_positive(node)) if node.invert else _leaf_always(node)
    if isinstance(node, HeaderLines):
        return _searches_empty(node)
    if isinstance(node, AllOf):
        return all(_always(c) for c in node.children)
    if isinstance(node, AnyOf):
        return any(_always(c) for c in node.children) or _complements(node.children)
    assert isinstance(node, Not)
    return _never(node.child)


def _never(node: Matcher) -> bool:
    """Proven: no request matches."""
    if isinstance(node, Leaf):
        return _leaf_always(_positive(node)) if node.invert else _leaf_never(node)
    if isinstance(node, HeaderLines):
        return False
    if isinstance(node, AllOf):
        children = node.children
        return any(_never(c) for c in children) or any(
            _disjoint(x, y) for x, y in itertools.combinations(children, 2))
    if isinstance(node, AnyOf):
        return all(_never(c) for c in node.children)
    assert isinstance(node, Not)
    return _always(node.child)


def _searches_empty(node: HeaderLines) -> bool:
    # An unanchored search for a pattern that matches "" succeeds on any header block.
    return node.matches(RequestHead("GET", "/", {}))


def _leaf_always(leaf: Leaf) -> bool:
    test = leaf.test
    if test.kind == "regex" and test.test(""):
        return True  # a regex that accepts the empty string filters nothing
    if leaf.field not in _ALWAYS_PRESENT:
        return False
    if test.kind == "present":
        return bool(test.value)
    if test.kind in ("prefix", "suffix", "contains") and test.value == "":
        return True
    # Every path starts with '/'.
    return leaf.field in ("path", "target") and test.kind == "prefix" and test.value == "/"


def _leaf_never(leaf: Leaf) -> bool:
    test = leaf.test
    if leaf.field in _ALWAYS_PRESENT:
        if test.kind == "present":
            return not test.value
        # Paths and methods are never empty.
        return test.kind in _FINITE and all(v == "" for v in _values(leaf))
    return False


def _values(leaf: Leaf) -> frozenset[str]:
    value = leaf.test.value
    return frozenset(value) if leaf.test.kind == "one_of" else frozenset([value])


def _complements(children: tuple[Matcher, ...]) -> bool:
    """Whether some two children are ``x`` and ``not x`` (their union is every request)."""
    for x, y in itertools.permutations(children, 2):
        if isinstance(y, Not) and y.child.to_spec() == x.to_spec():
            return True
        if isinstance(x, Leaf) and isinstance(y, Leaf) and not x.invert and y.invert and \
                _positive(y).to_spec() == x.to_spec():
            return True
        if isinstance(x, Leaf) and isinstance(y, Leaf) and x.subject_id == y.subject_id and \
                x.test.kind == y.test.kind == "present" and not x.invert and not y.invert and \
                x.test.value != y.test.value:
            return True
    return False


def _disjoint(a: Matcher, b: Matcher) -> bool:
    if _never(a) or _never(b):
        return True
    if isinstance(a, AnyOf):
        return all(_disjoint(c, b) for c in a.children)
    if isinstance(b, AnyOf):
        return all(_disjoint(a, c) for c in b.children)
    if isinstance(a, AllOf):
        return any(_disjoint(c, b) for c in a.children)
    if isinstance(b, AllOf):
        return any(_disjoint(a, c) for c in b.children)
    if isinstance(a, Leaf) and a.invert:
        return _implies(b, _positive(a))
    if isinstance(b, Leaf) and b.invert:
        return _implies(a, _positive(b))
    if isinstance(a, Not):
        return _implies(b, a.child)
    if isinstance(b, Not):
        return _implies(a, b.child)
    if isinstance(a, Leaf) and isinstance(b, Leaf):
        return _leaves_disjoint(a, b)
    return False


def _implies(a: Matcher, b: Matcher) -> bool:
    """Proven: every request that matches ``a`` matches ``b``."""
    if _never(a) or _always(b) or a.to_spec() == b.to_spec():
        return True
    if isinstance(a, AnyOf):
        return all(_implies(c, b) for c in a.children)
    if isinstance(b, AllOf):
        return all(_implies(a, c) for c in b.children)
    if isinstance(a, AllOf):
        return any(_implies(c, b) for c in a.children)
    if isinstance(b, AnyOf):
        return any(_implies(a, c) for c in b.children)
    if isinstance(b, Leaf) and b.invert:
        return _disjoint(a, _positive(b))
    if isinstance(b, Not):
        return _disjoint(a, b.child)
    if isinstance(a, Leaf) and isinstance(b, Leaf) and not a.invert:
        return _leaf_implies(a, b)
    return False


def _caseless(values: frozenset[str]) -> bool:
    return all(v.lower() == v.upper() for v in values)


def _finite(leaf: Leaf, other: Leaf) -> frozenset[str] | None:
    """Every subject value ``leaf`` accepts, when that is a finite set ``other`` can be tested on."""
    test = leaf.test
    if test.kind not in _FINITE:
        return None
    values = _values(leaf)
    if not test.ignore_case or _caseless(values):
        return values
    # Case-insensitive values stand for all their case variants: fine when the other test
    # ignores case too (then one variant answers for all).
    return values if other.test.ignore_case else None


def _leaves_disjoint(a: Leaf, b: Leaf) -> bool:
    if a.subject_id != b.subject_id:
        return False  # different subjects vary independently
    ta, tb = a.test, b.test
    absent_a = ta.kind == "present" and not ta.value
    absent_b = tb.kind == "present" and not tb.value
    if absent_a or absent_b:
        return absent_a != absent_b  # "absent" against anything that needs a value
    for x, y in ((a, b), (b, a)):
        values = _finite(x, y)
        if values is not None:
            return not any(y.test.test(v) for v in values)
    if ta.kind == tb.kind and ta.kind in ("prefix", "suffix") and ta.ignore_case == tb.ignore_case:
        va, vb = (ta.value.lower(), tb.value.lower()) if ta.ignore_case else (ta.value, tb.value)
        if ta.kind == "prefix":
            return not (va.startswith(vb) or vb.startswith(va))
        return not (va.endswith(vb) or vb.endswith(va))
    return False


def _leaf_implies(a: Leaf, b: Leaf) -> bool:
    if b.invert:
        return _leaves_disjoint(a, _positive(b))
    if a.subject_id != b.subject_id:
        return False
    ta, tb = a.test, b.test
    if tb.kind == "present":
        # Every test but "absent" needs a value; "absent" implies only "absent".
        return bool(tb.value) != (ta.kind == "present" and not ta.value)
    values = _finite(a, b)
    if values is not None:
        return all(bool(tb.test(v)) for v in values)
    if ta.kind == tb.kind and ta.kind in ("prefix", "suffix") and ta.ignore_case == tb.ignore_case:
        va, vb = (str(ta.value).lower(), str(tb.value).lower()) if ta.ignore_case else (str(ta.value), str(tb.value))
        return va.startswith(vb) if ta.kind == "prefix" else va.endswith(vb)
    return False
