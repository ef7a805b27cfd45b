"""AMF0: exact bytes for what RTMP peers send, round trips, and hostile input."""

from __future__ import annotations

import contextlib
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verge.stream.rtmp import amf0
from verge.stream.rtmp.amf0 import UNDEFINED, AmfDate, AmfError, EcmaArray


def test_scalars_encode_to_the_spec_bytes() -> None:
    assert amf0.encode("connect") == b"\x02\x00\x07connect"
    assert amf0.encode(1.0) == b"\x00" + struct.pack(">d", 1.0)
    assert amf0.encode(3) == amf0.encode(3.0)  # ints are numbers
    assert amf0.encode(True, False) == b"\x01\x01\x01\x00"  # bools are not numbers
    assert amf0.encode(None, UNDEFINED) == b"\x05\x06"


def test_object_and_ecma_array_bytes() -> None:
    assert (
        amf0.encode({"a": 1.0}) == b"\x03\x00\x01a\x00" + struct.pack(">d", 1.0) + b"\x00\x00\x09"
    )
    encoded = amf0.encode(EcmaArray(width=320.0))
    assert encoded[:5] == b"\x08\x00\x00\x00\x01"
    assert encoded.endswith(b"\x00\x00\x09")


def test_round_trip_of_every_type() -> None:
    values = [
        1.5,
        -0.0,
        True,
        False,
        "",
        "héllo",
        None,
        UNDEFINED,
        {"level": "status", "nested": {"list": [1.0, "x", None]}},
        EcmaArray(duration=0.0, width=320.0, stereo=True),
        [],
        [1.0, [2.0, [3.0]]],
        AmfDate(1.7e12, 0),
    ]
    decoded = amf0.decode(amf0.encode(*values))
    assert decoded == values
    assert isinstance(decoded[9], EcmaArray)
    assert type(decoded[8]) is dict


def test_long_string_above_64k() -> None:
    text = "x" * 70_000
    encoded = amf0.encode(text)
    assert encoded[0] == amf0.LONG_STRING
    assert amf0.decode(encoded) == [text]


def test_decode_value_returns_the_next_offset() -> None:
    data = amf0.encode("a", 2.0)
    value, offset = amf0.decode_value(data)
    assert value == "a" and amf0.decode_value(data, offset) == (2.0, len(data))


def test_ecma_array_count_is_only_a_hint() -> None:
    wrong_count = b"\x08\x00\x00\x00\x09" + b"\x00\x01k\x05" + b"\x00\x00\x09"
    assert amf0.decode(wrong_count) == [{"k": None}]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert amf0.decode(b"\x02\x00\x02\xff\xfe") == ["\ufffd\ufffd"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x02\x00\x05ab", "truncated"),
        (b"\x00\x00\x00", "truncated"),
        (b"\x03\x00\x01a", "truncated"),
        (b"\x03\x00\x01a\x05", "truncated"),  # object without its end marker
        (b"\x09", "object end marker"),
        (b"\x11", "unsupported AMF0 type marker 0x11"),
        (b"\x0a\xff\xff\xff\xff\x05", "more than the bytes left"),
    ],
)
def test_malformed_input_raises_amf_error(data: bytes, message: str) -> None:
    with pytest.raises(AmfError, match=message):
        amf0.decode(data)


def test_nesting_is_bounded_both_ways() -> None:
    bomb = b"\x0a\x00\x00\x00\x01" * 100 + b"\x05"
    with pytest.raises(AmfError, match="nesting"):
        amf0.decode(bomb)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(AmfError, match="nesting"):
        amf0.encode(cyclic)


def test_unencodable_value() -> None:
    with pytest.raises(AmfError, match="set"):
        amf0.encode({1, 2})


json_like = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_like)
def test_round_trip_property(value: object) -> None:
    assert amf0.decode(amf0.encode(value)) == [value]


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_but_amf_error(data: bytes) -> None:
    with contextlib.suppress(AmfError):
        amf0.decode(data)


def test_nan_survives() -> None:
    assert math.isnan(amf0.decode(amf0.encode(float("nan")))[0])
