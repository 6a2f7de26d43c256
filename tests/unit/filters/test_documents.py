"""JSON and YAML documents with over-long numbers: refused by where they are, never a
``ValueError`` from int() (more than 4,300 digits) or an ``OverflowError`` later."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from filters.documents import MAX_NUMBER_CHARS, load_json, load_yaml, load_yaml_all
from filters.errors import ValidationError

LONG = "7" * 5000


def problems(load: Any, text: str, *args: str) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        load(text, *args)
    return [(p.field, p.reason) for p in caught.value.problems]


def test_python_itself_refuses_these_numbers() -> None:
    # What the loaders guard against: without them, these are ValueErrors about
    # sys.set_int_max_str_digits, which name no field.
    with pytest.raises(ValueError, match="4300"):
        json.loads(LONG)
    with pytest.raises(ValueError, match="4300"):
        yaml.safe_load("a: " + LONG)


def test_json_names_each_over_long_number_by_its_path() -> None:
    text = '{"a": 1, "b": [2, ' + LONG + '], "c": {"d": -' + LONG + ', "e": 1.' + LONG + "}}"
    reason = f"a number of {{}} characters; numbers are at most {MAX_NUMBER_CHARS}"
    assert problems(load_json, text) == [("b[1]", reason.format(5000)), ("c.d", reason.format(5001)),
                                         ("c.e", reason.format(5002))]
    assert problems(load_json, LONG) == [("", reason.format(5000))]
    assert problems(load_json, '{"ttl_s": ' + LONG + "}", "session") == [("session.ttl_s", reason.format(5000))]


def test_json_numbers_up_to_the_bound_are_read_as_usual() -> None:
    top = "9" * MAX_NUMBER_CHARS
    assert load_json('{"a": [1, -2, 3.5, 1e3, ' + top + "]}") == {"a": [1, -2, 3.5, 1000.0, int(top)]}
    assert problems(load_json, "[" + top + "9]")[0][0] == "[0]"
    assert load_json(b'{"x": "' + LONG.encode() + b'"}') == {"x": LONG}  # strings are not numbers


def test_invalid_json_is_still_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_json("{")


def test_yaml_names_each_over_long_number_by_its_path() -> None:
    text = f"limits:\n  max_head_bytes: {LONG}\n  ratio: 0.{LONG}\nlist: [1, 0x{'f' * 200}]\n"
    assert [field for field, _ in problems(load_yaml, text)] == ["limits.max_head_bytes", "limits.ratio", "list[1]"]
    assert load_yaml("a: 1\nb: 2.5\nc: 0x10\nd: 1_000\n") == {"a": 1, "b": 2.5, "c": 16, "d": 1000}


def test_yaml_keys_that_are_over_long_numbers_are_refused() -> None:
    # An explicit key: a plain one may not be longer than 1,024 characters.
    assert problems(load_yaml, f"? {LONG}\n: a\n")[0][1].startswith("a key that is a number of 5000 characters")


def test_yaml_aliases_are_walked_once() -> None:
    # A "billion laughs" of aliases builds quickly (the lists are shared); the walk looking
    # for the over-long number must not expand it either.
    lines = [f"a0: &a0 [{LONG}]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    found = problems(load_yaml, "\n".join(lines) + "\n")
    assert found[0][0] == "a0[0]" and len(found) == 1


def test_yaml_all_names_the_document() -> None:
    assert [f for f, _ in problems(load_yaml_all, f"a: 1\n---\nb: {LONG}\n")] == ["document 2.b"]
    assert load_yaml_all("a: 1\n---\nb: 2\n") == [{"a": 1}, {"b": 2}]


def test_invalid_yaml_is_still_a_yaml_error() -> None:
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [\n")


def test_a_date_that_is_no_date_is_a_yaml_error_with_its_line() -> None:
    with pytest.raises(ValueError, match="month"):
        yaml.safe_load("when: 2030-13-01\n")  # what safe_load does
    with pytest.raises(yaml.YAMLError, match="line 2"):
        load_yaml("a: 1\nwhen: 2030-13-01\n")
