"""HPACK (RFC 7541) for turnout's HTTP/2 connections, compiled with the per-request path.

Drop-in replacements for the ``hpack`` library's ``Decoder`` and ``Encoder`` as h2 uses them
(``decode(block, raw=True)``, ``encode(headers)``, the table-size and header-list-size
attributes), raising the same ``hpack`` exceptions, so h2's handling of them (connection
errors for bad blocks, HPACK bombs and oversized header lists) is unchanged. They are
property-tested against ``hpack`` itself (tests/unit/dataplane/test_hpack.py).

Differences that are allowed by the RFC and make them cheaper: the encoder sends string
literals without Huffman coding (a few more bytes on the wire, much less CPU), and finds
table entries through dictionaries instead of a scan. Huffman-coded strings from peers are
decoded with ``hpack``'s own state machine table, walked in compiled code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

# Variable-length on purpose: compiled code keeps such tuples as Python objects, so a
# NeverIndexedHeaderTuple keeps its class (a tuple[bytes, bytes] would be unboxed).
Header = tuple[bytes, ...]

# Final: compiled code reads these as C statics, not through the module's dictionary.
_STATIC: Final[tuple[tuple[bytes, bytes], ...]] = HeaderTable.STATIC_TABLE
_STATIC_LEN: Final = 61
_DEFAULT_TABLE_SIZE: Final = 4096
_DEFAULT_MAX_HEADER_LIST_SIZE: Final = 2**16
_ENTRY_OVERHEAD: Final = 32  # RFC 7541 §4.1
_VARINT_MAX_BYTES: Final = 5  # as hpack: a prefix and a uint32

# hpack's Huffman state machine (nghttp2's), one int per (state, nibble): the next state in
# the low byte, the flags in the next, the emitted byte above.
_H_FAIL: Final = HUFFMAN_FAIL << 8
_H_EMIT: Final = HUFFMAN_EMIT_SYMBOL << 8
_H_COMPLETE: Final = HUFFMAN_COMPLETE << 8
_H_TABLE: Final[list[int]] = [state | flags << 8 | byte << 16 for state, flags, byte in HUFFMAN_TABLE]

# Static table lookups for the encoder: the first index of each (name, value) and name.
_STATIC_PAIR: Final[dict[tuple[bytes, bytes], int]] = {}
_STATIC_NAME: Final[dict[bytes, int]] = {}
assert len(_STATIC) == _STATIC_LEN
for _i, (_n, _v) in enumerate(_STATIC, 1):
    _STATIC_PAIR.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)


def decode_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at ``data[pos]`` with a ``prefix_bits`` prefix: (value, next position)."""
    end = len(data)
    if pos >= end:
        raise HPACKDecodingError("Unable to decode HPACK integer representation from " + repr(data[pos:]))
    mask = (1 << prefix_bits) - 1
    number = data[pos] & mask
    pos += 1
    if number < mask:
        return number, pos
    shift = 0
    used = 1
    while True:
        if pos >= end:
            raise HPACKDecodingError("Unable to decode HPACK integer representation from " + repr(data))
        byte = data[pos]
        pos += 1
        used += 1
        number += (byte & 0x7F) << shift
        if byte < 0x80:
            return number, pos
        shift += 7
        if used > _VARINT_MAX_BYTES:
            raise HPACKDecodingError("Variable integer representation is too long")


def encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with a ``prefix_bits`` prefix, ``first``'s high bits set on byte one."""
    out = bytearray()
    _put_integer(out, value, prefix_bits, first)
    return bytes(out)


def _put_integer(out: bytearray, value: int, prefix_bits: int, first: int) -> None:
    # encode_integer, appended to ``out`` (no bytes object per field).
    mask = (1 << prefix_bits) - 1
    if value < mask:
        out.append(first | value)
        return
    out.append(first | mask)
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def decode_huffman(data: bytes) -> bytes:
    """A Huffman-coded HPACK string (RFC 7541 §5.2), or ``HPACKDecodingError``."""
    table = _H_TABLE
    state = 0
    entry = 0
    out = bytearray()
    for byte in data:
        entry = table[state * 16 + (byte >> 4)]
        if entry & _H_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if entry & _H_EMIT:
            out.append(entry >> 16)
        state = entry & 0xFF
        entry = table[state * 16 + (byte & 0x0F)]
        if entry & _H_FAIL:
            raise HPACKDecodingError("Invalid Huffman string")
        if entry & _H_EMIT:
            out.append(entry >> 16)
        state = entry & 0xFF
    if data and not entry & _H_COMPLETE:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


class _Table:
    """The dynamic table: newest entry first, evicted by size (RFC 7541 §4)."""

    __slots__ = ("entries", "size", "maxsize")

    def __init__(self) -> None:
        self.entries: deque[Header] = deque()
        self.size = 0
        self.maxsize = _DEFAULT_TABLE_SIZE

    def get(self, index: int) -> Header:
        if 0 < index <= _STATIC_LEN:
            return _STATIC[index - 1]
        offset = index - _STATIC_LEN - 1
        if index <= 0 or offset >= len(self.entries):
            raise InvalidTableIndexError(f"Invalid table index {index}")
        return self.entries[offset]

    def add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self.maxsize:
            self.entries.clear()  # RFC 7541 §4.4: the table is emptied, nothing added
            self.size = 0
            return
        self.entries.appendleft((name, value))
        self.size += size
        self.shrink()

    def shrink(self) -> None:
        entries = self.entries
        while self.size > self.maxsize:
            name, value = entries.pop()
            self.size -= len(name) + len(value) + _ENTRY_OVERHEAD


class Decoder:
    """An HPACK decoder with ``hpack.Decoder``'s interface as h2 uses it."""

    def __init__(self, max_header_list_size: int = _DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.table = _Table()
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = _DEFAULT_TABLE_SIZE

    @property
    def header_table_size(self) -> int:
        """The dynamic table's current maximum size."""
        return self.table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.table.maxsize = value
        self.table.shrink()

    def decode(self, data: bytes, raw: bool = True) -> list[Header]:
        """The header list of one complete header block (``raw``: bytes, the only form here)."""
        if not raw:
            raise ValueError("only raw (bytes) decoding is supported")
        data = bytes(data)
        table = self.table
        headers: list[Header] = []
        inflated = 0
        pos = 0
        end = len(data)
        while pos < end:
            first = data[pos]
            header: Header
            if first & 0x80:  # indexed field
                index, pos = decode_integer(data, pos, 7)
                header = table.get(index)
            elif first & 0x40:  # literal, added to the table
                header, pos = self._literal(data, pos, 6, True, False)
            elif first & 0x20:  # dynamic table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, pos = decode_integer(data, pos, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            else:  # literal, not added (0x10: never indexed)
                header, pos = self._literal(data, pos, 4, False, bool(first & 0x10))
            headers.append(header)
            inflated += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if inflated > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received")
        if table.maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers

    def _literal(self, data: bytes, pos: int, prefix_bits: int, index: bool, never: bool) -> tuple[Header, int]:
        name_index, pos = decode_integer(data, pos, prefix_bits)
        if name_index:
            name = self.table.get(name_index)[0]
        else:
            name, pos = _string(data, pos)
        value, pos = _string(data, pos)
        if index:
            self.table.add(name, value)
        if never:
            return NeverIndexedHeaderTuple(name, value), pos
        return (name, value), pos


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HPACKDecodingError("Truncated header block")
    huffman = data[pos] & 0x80
    length, pos = decode_integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    text = data[pos:end]
    return (decode_huffman(text) if huffman else text), end


class Encoder:
    """An HPACK encoder with ``hpack.Encoder``'s interface as h2 uses it (no Huffman)."""

    def __init__(self) -> None:
        self.maxsize = _DEFAULT_TABLE_SIZE
        self._size = 0
        self._entries: deque[tuple[bytes, bytes, int]] = deque()  # newest first, with insertion numbers
        self._inserted = 0  # insertion number of the next entry
        # The newest copy of each (name, value) and of each name, by insertion number.
        self._pairs: dict[Header, int] = {}
        self._names: dict[bytes, int] = {}
        self._pending_sizes: list[int] = []  # table size changes to announce

    @property
    def header_table_size(self) -> int:
        """The dynamic table's maximum size (the peer's SETTINGS_HEADER_TABLE_SIZE)."""
        return self.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value != self.maxsize:
            self.maxsize = value
            self._evict()
            self._pending_sizes.append(value)

    def encode(self, headers: Iterable[Header], huffman: bool = True) -> bytes:
        """One header block (``huffman`` is accepted and ignored: literals go uncoded)."""
        out = bytearray()
        if self._pending_sizes:
            for size in (min(self._pending_sizes), self._pending_sizes[-1]):
                _put_integer(out, size, 5, 0x20)
            self._pending_sizes = []
        pairs = self._pairs
        for header in headers:
            name = header[0]
            value = header[1]
            key = (name, value)
            static = _STATIC_PAIR.get(key, 0)
            if static:
                out.append(0x80 | static)  # static indexes are below 127: one byte
                continue
            index = self._index(pairs.get(key, -1))
            if index:
                _put_integer(out, index, 7, 0x80)
                continue
            name_index = _STATIC_NAME.get(name, 0) or self._index(self._names.get(name, -1))
            indexable = not isinstance(header, NeverIndexedHeaderTuple)
            if indexable:
                _put_integer(out, name_index, 6, 0x40)
            else:
                _put_integer(out, name_index, 4, 0x10)
            if not name_index:
                _put_integer(out, len(name), 7, 0)
                out += name
            _put_integer(out, len(value), 7, 0)
            out += value
            if indexable:
                self._add(name, value)
        return bytes(out)

    def _index(self, inserted: int) -> int:
        # The table index of the entry with that insertion number, 0 when it is gone.
        if inserted < 0:
            return 0
        offset = self._inserted - 1 - inserted
        return _STATIC_LEN + 1 + offset if offset < len(self._entries) else 0

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self.maxsize:  # RFC 7541 §4.4: the table is emptied, nothing added
            self._entries.clear()
            self._size = 0
            self._pairs.clear()
            self._names.clear()
            return
        number = self._inserted
        self._inserted = number + 1
        self._entries.appendleft((name, value, number))
        self._size += size
        self._pairs[(name, value)] = number
        self._names[name] = number
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while self._size > self.maxsize:
            name, value, number = entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
            if self._pairs.get((name, value)) == number:
                del self._pairs[(name, value)]
            if self._names.get(name) == number:
                del self._names[name]
