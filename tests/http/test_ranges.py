"""Single byte ranges (RFC 9110 §14) and If-Range (§13.1.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verge.http.ranges import Unsatisfiable, content_range, if_range_ok, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, (0, 99)),
        ("bytes=0-0", 1000, (0, 0)),
        ("bytes=100-", 1000, (100, 999)),
        ("bytes=999-", 1000, (999, 999)),
        ("bytes=-500", 1000, (500, 999)),
        ("bytes=-1", 1000, (999, 999)),
        ("bytes=-5000", 1000, (0, 999)),  # suffix longer than the body: all of it
        ("bytes=500-5000", 1000, (500, 999)),  # last-pos past the end is clamped
        ("bytes=0-999", 1000, (0, 999)),
        ("Bytes=1-2", 1000, (1, 2)),  # range units are case-insensitive
        ("  bytes=1-2  ", 1000, (1, 2)),
        ("bytes=1-2,", 1000, (1, 2)),  # empty list elements are allowed
        ("bytes= 1-2 , ", 1000, (1, 2)),
        ("bytes=007-0010", 1000, (7, 10)),
        ("bytes=0-" + "9" * 50, 1000, (0, 999)),
        ("bytes=-" + "9" * 50, 1000, (0, 999)),
        ("bytes=" + "0" * 40 + "5-6", 1000, (5, 6)),
        # full body: no header, other unit, multiple ranges, invalid syntax
        (None, 1000, None),
        ("", 1000, None),
        ("items=0-5", 1000, None),
        ("bytes 0-5", 1000, None),
        ("bytes=0-5,10-20", 1000, None),
        ("bytes=0-5, -10", 1000, None),
        ("bytes=", 1000, None),
        ("bytes=,", 1000, None),
        ("bytes=-", 1000, None),
        ("bytes=a-5", 1000, None),
        ("bytes=5-a", 1000, None),
        ("bytes=1.5-2", 1000, None),
        ("bytes=+1-2", 1000, None),
        ("bytes=-+5", 1000, None),
        ("bytes=1 - 2", 1000, None),
        ("bytes=\u0661-\u0662", 1000, None),  # non-ASCII digits are not DIGIT
        ("bytes=10-5", 1000, None),  # last < first: invalid, ignored
        ("bytes=5000-10", 1000, None),  # invalid beats unsatisfiable
        ("bytes=-5", 0, None),  # a suffix of an empty body: send it whole (empty)
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=1000-2000", 1000),
        ("bytes=5000-", 1000),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-0", 1000),
        ("bytes=-000", 1000),
        ("bytes=-0", 0),
        ("bytes=" + "9" * 50 + "-", 1000),
    ],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable) as info:
        parse_range(header, size)
    assert info.value.size == size
    assert info.value.content_range == f"bytes */{size}"


@given(
    size=st.integers(min_value=1, max_value=10_000),
    first=st.integers(min_value=0, max_value=20_000),
    length=st.integers(min_value=0, max_value=20_000),
)
def test_int_range_is_within_the_body(size: int, first: int, length: int) -> None:
    header = f"bytes={first}-{first + length}"
    if first >= size:
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)
        return
    start, end = parse_range(header, size)  # type: ignore[misc]
    assert (start, end) == (first, min(first + length, size - 1))
    assert 0 <= start <= end < size


@given(size=st.integers(min_value=1, max_value=10_000), suffix=st.integers(1, 20_000))
def test_suffix_range_selects_the_last_bytes(size: int, suffix: int) -> None:
    start, end = parse_range(f"bytes=-{suffix}", size)  # type: ignore[misc]
    assert end == size - 1
    assert end - start + 1 == min(suffix, size)


@pytest.mark.parametrize(
    ("start", "end", "size", "expected"),
    [
        (0, 99, 1000, "bytes 0-99/1000"),
        (999, 999, 1000, "bytes 999-999/1000"),
        (0, 0, 1, "bytes 0-0/1"),
    ],
)
def test_content_range(start: int, end: int, size: int, expected: str) -> None:
    assert content_range(start, end, size) == expected


LM = "Wed, 21 Oct 2015 07:28:00 GMT"


@pytest.mark.parametrize(
    ("if_range", "etag", "last_modified", "expected"),
    [
        (None, None, None, True),
        (None, '"abc"', LM, True),
        # entity tags: strong comparison only
        ('"abc"', '"abc"', None, True),
        (' "abc" ', '"abc"', None, True),
        ('"abc"', '"abd"', LM, False),
        ('"abc"', 'W/"abc"', None, False),
        ('W/"abc"', 'W/"abc"', None, False),
        ('W/"abc"', '"abc"', None, False),
        ('"abc"', None, LM, False),
        ('"abc', '"abc', None, False),
        # dates: exact match with Last-Modified
        (LM, '"abc"', LM, True),
        (LM, None, LM, True),
        (LM, None, "Wed, 21 Oct 2015 07:28:01 GMT", False),
        (LM, None, None, False),
        ("Wednesday, 21-Oct-15 07:28:00 GMT", None, LM, False),  # same instant, not exact
        # malformed
        ("", None, "", False),
        ("not a date", None, "not a date", False),
        ("abc", '"abc"', None, False),
    ],
)
def test_if_range_ok(
    if_range: str | None, etag: str | None, last_modified: str | None, expected: bool
) -> None:
    assert if_range_ok(if_range, etag, last_modified) is expected
