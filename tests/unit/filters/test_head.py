"""``joined_fields``: the routing view of raw fields, as HTTP/1.1 and HTTP/2 both build it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from filters import RequestHead
from filters.head import joined_fields

_NAME = st.sampled_from([b"cookie", b"baggage", b"x-user", b"accept", b"host"])
_VALUE = st.binary(max_size=20).filter(lambda v: b"\n" not in v)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=10))
def test_same_joining_as_from_pairs(headers: list[tuple[bytes, bytes]]) -> None:
    pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    assert joined_fields(headers) == RequestHead.from_pairs("GET", "/", pairs).headers


@given(st.dictionaries(_NAME, _VALUE, max_size=5))
def test_the_by_name_fast_path_agrees(fields: dict[bytes, bytes]) -> None:
    headers = list(fields.items())
    assert joined_fields(headers, fields) == joined_fields(headers)


def test_cookies_join_with_semicolons_and_others_with_commas() -> None:
    assert joined_fields([(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"accept", b"x"), (b"accept", b"y")]) == {
        "cookie": "a=1; b=2", "accept": "x, y"}


@given(st.dictionaries(_NAME, _VALUE, max_size=5), st.sampled_from([None, "users:8080"]),
       st.sampled_from(["cookie", "baggage", "x-user", "accept", "host", "absent"]))
def test_a_head_over_raw_fields_reads_as_the_decoded_one(fields: dict[bytes, bytes], host: str | None,
                                                         name: str) -> None:
    eager = joined_fields(list(fields.items()))
    if host is not None and "host" not in eager:
        eager["host"] = host
    lazy = RequestHead("GET", "/", raw=fields, host=host)
    assert lazy.header(name) == eager.get(name)  # read alone, before anything decoded the rest
    assert lazy.headers == eager
    assert lazy.header(name) == eager.get(name)  # and after
    assert lazy.baggage() == RequestHead("GET", "/", eager).baggage()
