"""JSON and YAML documents, read with every number's length bounded.

Python refuses to convert an integer of more than 4,300 digits (a ``ValueError`` out of
the JSON decoder and out of YAML's constructor alike, with a message about
``sys.set_int_max_str_digits``), and an integer of more than about 309 digits overflows a
float. No number turnout reads comes anywhere near that, so a number written with more than
``MAX_NUMBER_CHARS`` characters is refused before it is converted, as a problem naming
where it is in the document (``routes[0].priority``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from filters.errors import Problem, ValidationError

# The longest number literal read: a unix time in nanoseconds has 19 digits, a float's
# shortest exact spelling about 25 characters; 100 leaves room and stays far below the
# 309 digits where an integer no longer converts to a float.
MAX_NUMBER_CHARS = 100
_T = TypeVar("_T")
# Problems reported for one document; the first few say all there is to say.
_MAX_PROBLEMS = 10


class _Oversized:
    """Stands in for a number too long to convert, until its place in the document is known."""

    __slots__ = ("chars",)

    def __init__(self, chars: int) -> None:
        self.chars = chars


class _JsonNumbers:
    """The JSON decoder's number hooks for one document; ``oversized``: any stood in for."""

    __slots__ = ("oversized",)

    def __init__(self) -> None:
        self.oversized = False

    def integer(self, text: str) -> int | _Oversized:
        if len(text) > MAX_NUMBER_CHARS:
            self.oversized = True
            return _Oversized(len(text))
        return int(text)

    def real(self, text: str) -> float | _Oversized:
        if len(text) > MAX_NUMBER_CHARS:
            self.oversized = True
            return _Oversized(len(text))
        return float(text)


def load_json(text: str | bytes, root: str = "") -> Any:
    """Parse JSON; raises ``ValueError`` for invalid JSON (``RecursionError`` for nesting
    deeper than Python's stack) and ``ValidationError`` naming every over-long number by
    its path under ``root``."""
    numbers = _JsonNumbers()
    data = json.loads(text, parse_int=numbers.integer, parse_float=numbers.real)
    if numbers.oversized:
        _check(data, root)
    return data


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader, with integers and floats bounded before they are converted."""

    oversized = False  # set on the instance when a number was stood in for


def _yaml_int(loader: _BoundedLoader, node: yaml.ScalarNode) -> int | _Oversized:
    text = loader.construct_scalar(node)
    if len(text) > MAX_NUMBER_CHARS:
        loader.oversized = True
        return _Oversized(len(text))
    value: int = loader.construct_yaml_int(node)
    return value


def _yaml_float(loader: _BoundedLoader, node: yaml.ScalarNode) -> float | _Oversized:
    text = loader.construct_scalar(node)
    if len(text) > MAX_NUMBER_CHARS:
        loader.oversized = True
        return _Oversized(len(text))
    value: float = loader.construct_yaml_float(node)
    return value


def _yaml_timestamp(loader: _BoundedLoader, node: yaml.ScalarNode) -> Any:
    # A date-shaped scalar that is no date (month 13) is a ValueError out of datetime:
    # a YAML error at its line and column instead.
    try:
        return loader.construct_yaml_timestamp(node)
    except (ValueError, OverflowError) as exc:
        raise yaml.constructor.ConstructorError(None, None, f"not a date or time: {exc}", node.start_mark) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float)
_BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _yaml_timestamp)


class _Unconstructed(yaml.YAMLError):
    """What PyYAML raised besides its own errors, as a YAML error (see ``_parsed``)."""


def _parsed(loader: _BoundedLoader, parse: Callable[[], _T]) -> _T:
    """``parse()`` with ``loader``, every failure a ``yaml.YAMLError``: PyYAML's constructors
    let their own errors out (ValueError for ``!!int x``, AttributeError for a malformed
    ``!!timestamp``), and its composer recurses once per nesting level (RecursionError)."""
    try:
        return parse()
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise _Unconstructed("nested too deeply") from None
    except Exception as exc:
        raise _Unconstructed(f"{type(exc).__name__}: {exc}") from None
    finally:
        loader.dispose()


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely; raises ``yaml.YAMLError`` for invalid YAML and
    ``ValidationError`` naming every over-long number."""
    loader = _BoundedLoader(text)
    data = _parsed(loader, loader.get_single_data)
    if loader.oversized:
        _check(data)
    return data


def load_yaml_all(text: str) -> list[Any]:
    """Parse every YAML document in ``text``, as ``load_yaml`` does one."""
    loader = _BoundedLoader(text)
    documents: list[Any] = []

    def parse_all() -> None:
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())

    _parsed(loader, parse_all)
    if loader.oversized:
        for i, document in enumerate(documents):
            _check(document, f"document {i + 1}" if len(documents) > 1 else "")
    return documents


def _check(data: Any, root: str = "") -> None:
    """Raise ``ValidationError`` naming where ``data`` holds a stand-in for an over-long number."""
    problems: list[Problem] = []
    stack: list[tuple[str, Any]] = [(root, data)]
    seen: set[int] = set()  # YAML aliases share (and may nest) containers: each is walked once
    while stack and len(problems) < _MAX_PROBLEMS:
        where, item = stack.pop()
        if isinstance(item, (dict, list)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, _Oversized):
            problems.append(Problem(where, f"a number of {item.chars} characters; numbers are at most "
                                           f"{MAX_NUMBER_CHARS}"))
        elif isinstance(item, dict):
            for key, value in reversed(item.items()):
                if isinstance(key, _Oversized):  # YAML keys may be numbers too
                    problems.append(Problem(where, f"a key that is a number of {key.chars} characters; numbers "
                                                   f"are at most {MAX_NUMBER_CHARS}"))
                else:
                    stack.append((f"{where}.{key}" if where else str(key), value))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", value) for i, value in reversed(list(enumerate(item))))
    if problems:
        raise ValidationError(problems)
