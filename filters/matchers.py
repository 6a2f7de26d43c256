"""Request matchers: predicate trees over a request head, parsed from rule specs.

A match spec is a mapping with exactly one of these keys::

    header:  {name: x-user, exact: alice}      # + ignore_case, invert
    path:    {prefix: /api, with_query: false}  # path without the query by default
    method:  GET | [GET, POST] | {regex: "P.*"}
    baggage: {key: tenant, exact: acme}         # a member of the W3C baggage header
    all_of:  [spec, ...]
    any_of:  [spec, ...]
    not:     spec
    http_filter: {header_filter: "x-user: alice"}   # mirrord's shape, as mirrord means it

A string matcher is exactly one of ``exact``, ``prefix``, ``suffix``, ``contains``,
``one_of`` (a list), ``regex`` (RE2, full match) or ``present`` (true/false), with
``ignore_case`` and ``invert`` (negates the result, also for an absent header).
Repeated header lines are matched against their comma-joined value.

Regexes are RE2 (google-re2): linear time in the input, so no rule pushed by a user or an
agent can make matching backtrack. RE2 has no look-around; ``(?!...)`` is refused with a
hint to use ``not``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import re2

from filters.baggage import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS
from filters.errors import Problem
from filters.head import RequestHead

STRING_KINDS = ("exact", "prefix", "suffix", "contains", "one_of", "regex", "present")
NODE_KINDS = ("header", "path", "method", "baggage", "all_of", "any_of", "not", "http_filter")


@dataclass(frozen=True, slots=True)
class MatchLimits:
    """Size limits on one route's match tree; refusing big rules keeps decisions cheap."""

    # Envoy caps a route's regex program size at 100 by default; 1,000 characters of
    # pattern is far beyond any sensible routing filter and still compiles in microseconds.
    max_regex_chars: int = 1000
    # RE2 program size (instructions), the measure Envoy limits (max_program_size).
    max_regex_program_size: int = 2000
    # Literal values: headers are capped at a few KiB by every server anyway.
    max_literal_chars: int = 4096
    # Nodes in one tree: enough for any hand-written filter, small enough to stay O(1).
    max_nodes: int = 64


def re2_options(case_sensitive: bool = True, never_nl: bool = False) -> re2.Options:
    """RE2 options for rule regexes; ``never_nl`` keeps a match inside one line."""
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = case_sensitive
    options.never_nl = never_nl
    return options


class RegexError(ValueError):
    """A pattern RE2 refuses, with a message a rule author can act on."""


def compile_regex(pattern: str, limits: MatchLimits, case_sensitive: bool = True, lines: bool = False) -> Any:
    """Compile an RE2 pattern within the limits, or raise ``RegexError``.

    ``lines``: the pattern searches a block of lines; ``^``/``$`` match at line
    boundaries and no match crosses a line.
    """
    if len(pattern) > limits.max_regex_chars:
        raise RegexError(f"regex is longer than {limits.max_regex_chars} characters")
    if not pattern.isascii():
        try:
            pattern.encode()
        except UnicodeEncodeError:  # re2 takes UTF-8; JSON's "\ud800" gives a lone surrogate
            raise RegexError("invalid RE2 regex: not valid Unicode (a lone surrogate)") from None
    try:
        compiled = re2.compile(line_pattern(pattern) if lines else pattern, re2_options(case_sensitive, lines))
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        if "(?!" in pattern or "(?=" in pattern or "(?<" in pattern:
            reason += " (RE2 has no look-around; express the exclusion with 'not')"
        raise RegexError("invalid RE2 regex: " + reason) from None
    if compiled.programsize > limits.max_regex_program_size:
        raise RegexError(
            f"regex program size {compiled.programsize} exceeds {limits.max_regex_program_size}"
        )
    return compiled


# --------------------------------------------------------------------------- strings


class StringTest:
    """One string predicate; ``test(None)`` is the absent case."""

    __slots__ = ("kind", "value", "ignore_case", "_fn")

    def __init__(self, kind: str, value: Any, ignore_case: bool, limits: MatchLimits) -> None:
        self.kind = kind
        self.value = value
        self.ignore_case = ignore_case
        self._fn = self._build(limits)

    def _build(self, limits: MatchLimits) -> Callable[[str], bool]:
        kind, value, fold = self.kind, self.value, self.ignore_case
        if kind == "present":
            return lambda s: True  # test() decides presence before calling this
        if kind == "regex":
            fullmatch = compile_regex(value, limits, case_sensitive=not fold).fullmatch
            return lambda s: fullmatch(s) is not None
        if fold:
            if kind == "one_of":
                folded = frozenset(v.lower() for v in value)
                return lambda s: s.lower() in folded
            v = value.lower()
            ops: dict[str, Callable[[str], bool]] = {
                "exact": lambda s: s.lower() == v,
                "prefix": lambda s: s.lower().startswith(v),
                "suffix": lambda s: s.lower().endswith(v),
                "contains": lambda s: v in s.lower(),
            }
            return ops[kind]
        if kind == "one_of":
            members = frozenset(value)
            return lambda s: s in members
        return {
            "exact": lambda s: s == value,
            "prefix": lambda s: s.startswith(value),
            "suffix": lambda s: s.endswith(value),
            "contains": lambda s: value in s,
        }[kind]

    def test(self, subject: str | None) -> bool:
        """Whether the subject satisfies the predicate (``present: false`` holds for None)."""
        if subject is None:
            return self.kind == "present" and not self.value
        if self.kind == "present":
            return bool(self.value)
        return self._fn(subject)

    def describe(self) -> str:
        """Short human form, e.g. ``prefix '/api'``."""
        if self.kind == "present":
            return "present" if self.value else "absent"
        text = self.kind + " " + (repr(sorted(self.value)) if self.kind == "one_of" else repr(self.value))
        return text + (" (ignore case)" if self.ignore_case else "")

    def to_spec(self) -> dict[str, Any]:
        """The spec fields this test came from."""
        spec: dict[str, Any] = {self.kind: sorted(self.value) if self.kind == "one_of" else self.value}
        if self.ignore_case:
            spec["ignore_case"] = True
        return spec


# --------------------------------------------------------------------------- nodes


class Matcher:
    """A node of a match tree."""

    __slots__ = ()

    def matches(self, head: RequestHead) -> bool:
        """Whether the request satisfies this node."""
        raise NotImplementedError

    def why_not(self, head: RequestHead) -> str | None:
        """``None`` when it matches, else the reason it does not (for ``explain``)."""
        raise NotImplementedError

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec of this node (round-trips through ``parse_match``)."""
        raise NotImplementedError


class Leaf(Matcher):
    """A string test on one subject of the request; the unit the filter index works on."""

    __slots__ = ("field", "name", "test", "invert", "_subject")

    def __init__(self, field: str, name: str, test: StringTest, invert: bool,
                 subject: Callable[[RequestHead], str | None]) -> None:
        self.field = field  # header | path | target | method | baggage
        self.name = name  # header name or baggage key; "" otherwise
        self.test = test
        self.invert = invert
        self._subject = subject

    @property
    def subject_id(self) -> tuple[str, str]:
        """Identifies what the leaf reads, so the index can read it once for many leaves."""
        return (self.field, self.name)

    def subject(self, head: RequestHead) -> str | None:
        """The text this leaf tests, or ``None`` when it is absent."""
        return self._subject(head)

    def matches(self, head: RequestHead) -> bool:
        return self.test.test(self._subject(head)) is not self.invert

    def label(self) -> str:
        """Human form of the subject, e.g. ``header x-user``."""
        if self.field in ("header", "baggage"):
            return self.field + " " + self.name
        return "path+query" if self.field == "target" else self.field

    def why_not(self, head: RequestHead) -> str | None:
        subject = self._subject(head)
        if self.test.test(subject) is not self.invert:
            return None
        want = ("not " if self.invert else "") + self.test.describe()
        got = "absent" if subject is None else repr(subject[:200])
        return f"{self.label()}: wanted {want}, got {got}"

    def to_spec(self) -> dict[str, Any]:
        body = self.test.to_spec()
        if self.invert:
            body["invert"] = True
        if self.field == "header":
            return {"header": {"name": self.name, **body}}
        if self.field == "baggage":
            return {"baggage": {"key": self.name, **body}}
        if self.field == "method":
            return {"method": body}
        if self.field == "target":
            body["with_query"] = True
        return {"path": body}


def line_pattern(pattern: str) -> str:
    """A mirrord header filter as searched over ``RequestHead.header_block``."""
    return "(?m:" + pattern + ")"


class HeaderLines(Matcher):
    """mirrord's header filter: an unanchored, case-insensitive regex over ``name: value`` lines.

    It is searched in the request's header block (one line per header), multi-line
    (``^`` and ``$`` at line boundaries) and never across a line.
    """

    __slots__ = ("pattern", "_search")

    def __init__(self, pattern: str, limits: MatchLimits) -> None:
        self.pattern = pattern
        self._search = compile_regex(pattern, limits, case_sensitive=False, lines=True).search

    def matches(self, head: RequestHead) -> bool:
        return self._search(head.header_block()) is not None

    def why_not(self, head: RequestHead) -> str | None:
        return None if self.matches(head) else f"no header line matches {self.pattern!r}"

    def to_spec(self) -> dict[str, Any]:
        return {"http_filter": {"header_filter": self.pattern}}


class AllOf(Matcher):
    """Every child matches."""

    __slots__ = ("children",)

    def __init__(self, children: tuple[Matcher, ...]) -> None:
        self.children = children

    def matches(self, head: RequestHead) -> bool:
        for child in self.children:
            if not child.matches(head):
                return False
        return True

    def why_not(self, head: RequestHead) -> str | None:
        for child in self.children:
            reason = child.why_not(head)
            if reason is not None:
                return reason
        return None

    def to_spec(self) -> dict[str, Any]:
        return {"all_of": [c.to_spec() for c in self.children]}


class AnyOf(Matcher):
    """At least one child matches."""

    __slots__ = ("children",)

    def __init__(self, children: tuple[Matcher, ...]) -> None:
        self.children = children

    def matches(self, head: RequestHead) -> bool:
        for child in self.children:
            if child.matches(head):
                return True
        return False

    def why_not(self, head: RequestHead) -> str | None:
        reasons = []
        for child in self.children:
            reason = child.why_not(head)
            if reason is None:
                return None
            reasons.append(reason)
        return "none of: " + "; ".join(reasons)

    def to_spec(self) -> dict[str, Any]:
        return {"any_of": [c.to_spec() for c in self.children]}


class Not(Matcher):
    """The child does not match."""

    __slots__ = ("child",)

    def __init__(self, child: Matcher) -> None:
        self.child = child

    def matches(self, head: RequestHead) -> bool:
        return not self.child.matches(head)

    def why_not(self, head: RequestHead) -> str | None:
        if self.child.matches(head):
            return "'not' failed: " + repr(self.child.to_spec()) + " matched"
        return None

    def to_spec(self) -> dict[str, Any]:
        return {"not": self.child.to_spec()}


# --------------------------------------------------------------------------- parsing


class _Parser:
    """Turns a spec into a tree, collecting every problem with its field path."""

    def __init__(self, limits: MatchLimits, problems: list[Problem],
                 baggage_limits: tuple[int, int]) -> None:
        self.limits = limits
        self.problems = problems
        self.baggage_limits = baggage_limits
        self.nodes = 0

    def fail(self, where: str, reason: str) -> None:
        self.problems.append(Problem(where, reason))

    def node(self, spec: Any, where: str) -> Matcher | None:
        self.nodes += 1
        if self.nodes == self.limits.max_nodes + 1:
            self.fail(where, f"match tree has more than {self.limits.max_nodes} nodes")
        if self.nodes > self.limits.max_nodes:
            return None
        if not isinstance(spec, Mapping) or len(spec) != 1:
            self.fail(where, "must be a mapping with exactly one of: " + ", ".join(NODE_KINDS))
            return None
        ((kind, body),) = spec.items()
        at = f"{where}.{kind}"
        if kind in ("all_of", "any_of"):
            if not isinstance(body, list) or not body:
                self.fail(at, "must be a non-empty list of match specs")
                return None
            children = [self.node(child, f"{at}[{i}]") for i, child in enumerate(body)]
            if any(c is None for c in children):
                return None
            kids = tuple(c for c in children if c is not None)
            if len(kids) == 1:
                return kids[0]
            return AllOf(kids) if kind == "all_of" else AnyOf(kids)
        if kind == "not":
            child = self.node(body, at)
            return None if child is None else Not(child)
        if kind == "header":
            return self.header(body, at)
        if kind == "path":
            return self.path(body, at)
        if kind == "method":
            return self.method(body, at)
        if kind == "baggage":
            return self.baggage(body, at)
        if kind == "http_filter":
            return self.mirrord(body, at)
        self.fail(where, f"unknown matcher {kind!r}; expected one of: " + ", ".join(NODE_KINDS))
        return None

    def string_test(self, body: Mapping[str, Any], where: str, allowed: set[str],
                    allow_present: bool = True) -> tuple[StringTest, bool] | None:
        unknown = set(body) - allowed - set(STRING_KINDS) - {"ignore_case", "invert"}
        if unknown:
            self.fail(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown))))
            return None
        kinds = [k for k in STRING_KINDS if k in body]
        if len(kinds) != 1:
            self.fail(where, "needs exactly one of: " + ", ".join(STRING_KINDS))
            return None
        kind = kinds[0]
        value = body[kind]
        ignore_case = body.get("ignore_case", False)
        invert = body.get("invert", False)
        for flag, flag_value in (("ignore_case", ignore_case), ("invert", invert)):
            if not isinstance(flag_value, bool):
                self.fail(f"{where}.{flag}", "must be true or false")
                return None
        if kind == "present":
            if not allow_present:
                self.fail(f"{where}.present", "is not meaningful here")
                return None
            if not isinstance(value, bool):
                self.fail(f"{where}.present", "must be true or false")
                return None
        elif kind == "one_of":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, str) and len(v) <= self.limits.max_literal_chars for v in value)):
                self.fail(f"{where}.one_of", "must be a non-empty list of strings")
                return None
            value = frozenset(value)
        elif not isinstance(value, str):
            self.fail(f"{where}.{kind}", "must be a string")
            return None
        elif len(value) > self.limits.max_literal_chars and kind != "regex":
            self.fail(f"{where}.{kind}", f"is longer than {self.limits.max_literal_chars} characters")
            return None
        try:
            return StringTest(kind, value, ignore_case, self.limits), invert
        except RegexError as exc:
            self.fail(f"{where}.{kind}", str(exc))
            return None

    def header(self, body: Any, where: str) -> Matcher | None:
        if not isinstance(body, Mapping):
            self.fail(where, "must be a mapping like {name: x-user, exact: alice}")
            return None
        name = body.get("name")
        if not isinstance(name, str) or not name or not _is_token(name):
            self.fail(where + ".name", "must be a header name (an HTTP token)")
            return None
        parsed = self.string_test(body, where, {"name"})
        if parsed is None:
            return None
        lname = name.lower()
        return Leaf("header", lname, parsed[0], parsed[1], lambda h: h.header(lname))

    def path(self, body: Any, where: str) -> Matcher | None:
        if isinstance(body, str):
            body = {"exact": body}
        if not isinstance(body, Mapping):
            self.fail(where, "must be a path string or a mapping like {prefix: /api}")
            return None
        with_query = body.get("with_query", False)
        if not isinstance(with_query, bool):
            self.fail(where + ".with_query", "must be true or false")
            return None
        parsed = self.string_test(body, where, {"with_query"}, allow_present=False)
        if parsed is None:
            return None
        if with_query:
            return Leaf("target", "", parsed[0], parsed[1], _target)
        return Leaf("path", "", parsed[0], parsed[1], _path)

    def method(self, body: Any, where: str) -> Matcher | None:
        if isinstance(body, str):
            body = {"exact": body}
        elif isinstance(body, list):
            body = {"one_of": body}
        if not isinstance(body, Mapping):
            self.fail(where, "must be a method, a list of methods or a string matcher")
            return None
        parsed = self.string_test(body, where, set(), allow_present=False)
        if parsed is None:
            return None
        return Leaf("method", "", parsed[0], parsed[1], _method)

    def baggage(self, body: Any, where: str) -> Matcher | None:
        if not isinstance(body, Mapping):
            self.fail(where, "must be a mapping like {key: tenant, exact: acme}")
            return None
        key = body.get("key")
        if not isinstance(key, str) or not key or not _is_token(key):
            self.fail(where + ".key", "must be a baggage key (an HTTP token)")
            return None
        parsed = self.string_test(body, where, {"key"})
        if parsed is None:
            return None
        members, max_bytes = self.baggage_limits
        return Leaf("baggage", key, parsed[0], parsed[1],
                    lambda h: h.baggage(members, max_bytes).get(key))

    def mirrord(self, body: Any, where: str) -> Matcher | None:
        """mirrord's ``http_filter``: unanchored, case-insensitive regexes."""
        if not isinstance(body, Mapping):
            self.fail(where, "must be a mirrord http_filter mapping")
            return None
        # 'ports' picks which ports mirrord filters; here the listener decides, so it is
        # accepted and has no effect.
        kinds = [k for k in body if k != "ports"]
        allowed = ("header_filter", "path_filter", "method_filter", "all_of", "any_of")
        if len(kinds) != 1 or kinds[0] not in allowed:
            self.fail(where, "needs exactly one of: " + ", ".join(allowed))
            return None
        kind = kinds[0]
        value = body[kind]
        at = f"{where}.{kind}"
        if kind in ("all_of", "any_of"):
            if not isinstance(value, list) or not value:
                self.fail(at, "must be a non-empty list of {header|path|method: ...}")
                return None
            children = []
            for i, item in enumerate(value):
                if not (isinstance(item, Mapping) and len(item) == 1
                        and next(iter(item)) in ("header", "path", "method")):
                    self.fail(f"{at}[{i}]", "must be one of {header: regex}, {path: regex}, {method: name}")
                    return None
                ((sub, subvalue),) = item.items()
                child = self.mirrord_leaf(sub + "_filter", subvalue, f"{at}[{i}].{sub}")
                if child is None:
                    return None
                children.append(child)
            return AllOf(tuple(children)) if kind == "all_of" else AnyOf(tuple(children))
        return self.mirrord_leaf(kind, value, at)

    def mirrord_leaf(self, kind: str, value: Any, where: str) -> Matcher | None:
        if kind == "method_filter":
            methods = [value] if isinstance(value, str) else value
            if not isinstance(methods, list) or not methods or not all(isinstance(m, str) and m for m in methods):
                self.fail(where, "must be a method or a list of methods")
                return None
            test = StringTest("one_of", frozenset(methods), True, self.limits)
            return Leaf("method", "", test, False, _method)
        if not isinstance(value, str) or not value:
            self.fail(where, "must be a non-empty regex string")
            return None
        try:
            if kind == "header_filter":
                return HeaderLines(value, self.limits)
            pattern = "(?s:.*)(?:" + value + ")(?s:.*)"
            compile_regex(value, self.limits)
            test = StringTest("regex", pattern, True, self.limits)
        except RegexError as exc:
            self.fail(where, str(exc))
            return None
        return Leaf("path", "", test, False, _path)


def _is_token(name: str) -> bool:
    return all(c in _TOKEN for c in name)


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _path(head: RequestHead) -> str:
    return head.path


def _target(head: RequestHead) -> str:
    return head.target


def _method(head: RequestHead) -> str:
    return head.method


def parse_match(
    spec: Any,
    field_path: str,
    problems: list[Problem],
    limits: MatchLimits | None = None,
    baggage_limits: tuple[int, int] = (DEFAULT_MAX_MEMBERS, DEFAULT_MAX_BYTES),
) -> Matcher | None:
    """Parse a match spec; on failure append to ``problems`` and return ``None``."""
    before = len(problems)
    parser = _Parser(limits or MatchLimits(), problems, baggage_limits)
    node = parser.node(spec, field_path)
    return node if len(problems) == before else None
