"""AMF0, the value encoding of RTMP commands and FLV script data (onMetaData).

Why our own: it is small, and the input comes from anyone who can reach the RTMP port, so the
decoder must be strict about bounds — nesting depth, element counts that cannot exceed the
bytes left, strings that cannot run past the end — and fail with :class:`AmfError`, never with
an IndexError or a huge allocation.

Python mapping (both ways):

=================  =======================================================
AMF0               Python
=================  =======================================================
number             float (ints and floats encode as number; bool does not)
boolean            bool
string/long str    str (long string when the UTF-8 form exceeds 65535 bytes)
object             dict (str keys)
ECMA array         :class:`EcmaArray` (a dict subclass)
strict array       list (tuples encode too)
null               None
undefined          :data:`UNDEFINED`
date               :class:`AmfDate` (decode only needs it for onMetaData of some encoders)
=================  =======================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

NUMBER = 0x00
BOOLEAN = 0x01
STRING = 0x02
OBJECT = 0x03
NULL = 0x05
UNDEFINED_MARKER = 0x06
ECMA_ARRAY = 0x08
OBJECT_END = 0x09
STRICT_ARRAY = 0x0A
DATE = 0x0B
LONG_STRING = 0x0C

MAX_DEPTH = 32
_END_OF_OBJECT = b"\x00\x00\x09"
_double = struct.Struct(">d")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_date = struct.Struct(">dh")


class AmfError(ValueError):
    """The bytes are not valid AMF0 (or exceed the decoder's bounds)."""


class _Undefined:
    """The AMF0 ``undefined`` value (distinct from ``null``, which is None)."""

    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED = _Undefined()


class EcmaArray(dict):
    """An AMF0 ECMA array: an associative array, encoded with a count (onMetaData uses it)."""


@dataclass(frozen=True, slots=True)
class AmfDate:
    milliseconds: float
    timezone: int = 0


# ---------------------------------------------------------------------------- encoding


def encode(*values: Any) -> bytes:
    """Encode values one after another, as RTMP command and data messages carry them."""
    out = bytearray()
    for value in values:
        _encode_value(out, value, 0)
    return bytes(out)


def _encode_value(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise AmfError(f"nesting deeper than {MAX_DEPTH}")
    if value is None:
        out.append(NULL)
    elif value is UNDEFINED:
        out.append(UNDEFINED_MARKER)
    elif isinstance(value, bool):
        out += bytes((BOOLEAN, 1 if value else 0))
    elif isinstance(value, int | float):
        out.append(NUMBER)
        out += _double.pack(float(value))
    elif isinstance(value, str):
        _encode_string_value(out, value)
    elif isinstance(value, EcmaArray):
        out.append(ECMA_ARRAY)
        out += _u32.pack(len(value))
        _encode_properties(out, value, depth)
    elif isinstance(value, dict):
        out.append(OBJECT)
        _encode_properties(out, value, depth)
    elif isinstance(value, list | tuple):
        out.append(STRICT_ARRAY)
        out += _u32.pack(len(value))
        for item in value:
            _encode_value(out, item, depth + 1)
    elif isinstance(value, AmfDate):
        out.append(DATE)
        out += _date.pack(value.milliseconds, value.timezone)
    else:
        raise AmfError(f"cannot encode {type(value).__name__} as AMF0")


def _encode_string_value(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        out.append(LONG_STRING)
        out += _u32.pack(len(raw))
    else:
        out.append(STRING)
        out += _u16.pack(len(raw))
    out += raw


def _encode_properties(out: bytearray, props: dict, depth: int) -> None:
    for key, item in props.items():
        raw = str(key).encode("utf-8")
        if len(raw) > 0xFFFF:
            raise AmfError("property name longer than 65535 bytes")
        out += _u16.pack(len(raw))
        out += raw
        _encode_value(out, item, depth + 1)
    out += _END_OF_OBJECT


# ---------------------------------------------------------------------------- decoding


def decode(data: bytes | bytearray | memoryview) -> list[Any]:
    """Decode every value in ``data`` (a command message holds several in a row)."""
    view = memoryview(data)
    values: list[Any] = []
    offset = 0
    while offset < len(view):
        value, offset = decode_value(view, offset)
        values.append(value)
    return values


def decode_value(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Any, int]:
    """Decode one value at ``offset``; return it and the offset just after it."""
    return _Decoder(memoryview(data)).value(offset, 0)


class _Decoder:
    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def need(self, offset: int, size: int) -> None:
        if offset + size > len(self.view):
            raise AmfError(f"truncated AMF0 data: need {size} bytes at offset {offset}")

    def value(self, offset: int, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise AmfError(f"nesting deeper than {MAX_DEPTH}")
        self.need(offset, 1)
        marker = self.view[offset]
        offset += 1
        if marker == NUMBER:
            self.need(offset, 8)
            return _double.unpack_from(self.view, offset)[0], offset + 8
        if marker == BOOLEAN:
            self.need(offset, 1)
            return self.view[offset] != 0, offset + 1
        if marker == STRING:
            return self.string(offset, short=True)
        if marker == LONG_STRING:
            return self.string(offset, short=False)
        if marker == NULL:
            return None, offset
        if marker == UNDEFINED_MARKER:
            return UNDEFINED, offset
        if marker == OBJECT:
            return self.properties(offset, {}, depth)
        if marker == ECMA_ARRAY:
            self.need(offset, 4)  # the count is only a hint: the end marker ends the array
            return self.properties(offset + 4, EcmaArray(), depth)
        if marker == STRICT_ARRAY:
            return self.strict_array(offset, depth)
        if marker == DATE:
            self.need(offset, 10)
            millis, tz = _date.unpack_from(self.view, offset)
            return AmfDate(millis, tz), offset + 10
        if marker == OBJECT_END:
            raise AmfError("object end marker outside an object")
        raise AmfError(f"unsupported AMF0 type marker 0x{marker:02x}")

    def string(self, offset: int, *, short: bool) -> tuple[str, int]:
        width = 2 if short else 4
        self.need(offset, width)
        length = (_u16 if short else _u32).unpack_from(self.view, offset)[0]
        offset += width
        self.need(offset, length)
        text = bytes(self.view[offset : offset + length]).decode("utf-8", "replace")
        return text, offset + length

    def properties(self, offset: int, target: dict, depth: int) -> tuple[dict, int]:
        while True:
            self.need(offset, 3)
            if self.view[offset : offset + 3] == _END_OF_OBJECT:
                return target, offset + 3
            key, offset = self.string(offset, short=True)
            target[key], offset = self.value(offset, depth + 1)

    def strict_array(self, offset: int, depth: int) -> tuple[list, int]:
        self.need(offset, 4)
        count = _u32.unpack_from(self.view, offset)[0]
        offset += 4
        if count > len(self.view) - offset:  # every element takes at least one byte
            raise AmfError(f"strict array claims {count} elements, more than the bytes left")
        items = []
        for _ in range(count):
            item, offset = self.value(offset, depth + 1)
            items.append(item)
        return items, offset
