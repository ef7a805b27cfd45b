"""Single byte-range requests (RFC 9110 §14) and If-Range (§13.1.5).

The edge serves a range of a cached or streamed body instead of the whole of it. Only one
range per request is supported: multi-range requests (multipart/byteranges) are rare and
the RFC lets a server ignore Range, so they get the full body, as do syntactically invalid
headers (§14.2). A valid range that starts past the end raises :class:`Unsatisfiable`,
which the caller turns into ``416`` with ``Content-Range: bytes */size``.
"""

from __future__ import annotations

import re
from email.utils import parsedate_tz

# int-range = first-pos "-" [ last-pos ] / suffix-range = "-" suffix-length (§14.1.1)
_RANGE_SPEC = re.compile(r"(?:([0-9]+)-([0-9]*)|-([0-9]+))")
# Digit strings longer than this are beyond any real size; avoids int() on huge strings.
_MAX_DIGITS = 19
_HUGE = 1 << 64


class Unsatisfiable(Exception):
    """A valid Range that selects no byte of a ``size``-byte body (-> 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a {size}-byte body")
        self.size = size

    @property
    def content_range(self) -> str:
        """The Content-Range value for the 416 response: ``bytes */size``."""
        return f"bytes */{self.size}"


def _to_int(digits: str) -> int:
    """Parse a DIGIT string, mapping absurdly long ones to a value past any body size."""
    digits = digits.lstrip("0") or "0"
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits)


def _single_spec(header: str) -> str | None:
    """The one range-spec of a ``bytes=`` header, or None (other unit, none or several)."""
    header = header.strip()
    if header[:6].lower() != "bytes=":
        return None
    # 1#range-spec: recipients accept empty list elements (§5.6.1).
    specs = [spec.strip(" \t") for spec in header[6:].split(",")]
    specs = [spec for spec in specs if spec]
    return specs[0] if len(specs) == 1 else None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` a Range header selects from a ``size``-byte body.

    None means serve the full body (no header, not ``bytes=``, several ranges, invalid
    syntax, or a suffix range of an empty body). Raises :class:`Unsatisfiable` for a valid
    range whose first byte is at or past ``size``, or a zero-length suffix.
    """
    if not header:
        return None
    spec = _single_spec(header)
    if spec is None:
        return None
    match = _RANGE_SPEC.fullmatch(spec)
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        return _suffix_range(_to_int(suffix), size)
    start = _to_int(first)
    end = _to_int(last) if last else None
    if end is not None and end < start:
        return None  # invalid int-range (§14.1.1): ignore the header
    if start >= size:
        raise Unsatisfiable(size)
    return start, size - 1 if end is None else min(end, size - 1)


def _suffix_range(length: int, size: int) -> tuple[int, int] | None:
    if length == 0:
        raise Unsatisfiable(size)
    if size == 0:
        return None  # nothing to select; a 200 with the empty body is the honest answer
    return max(0, size - length), size - 1


def content_range(start: int, end: int, size: int) -> str:
    """The Content-Range value of a 206: ``bytes 0-99/1000``."""
    return f"bytes {start}-{end}/{size}"


def _is_strong_etag(tag: str) -> bool:
    return len(tag) >= 2 and tag[0] == '"' and tag[-1] == '"'


def if_range_ok(if_range: str | None, etag: str | None, last_modified: str | None) -> bool:
    """Whether the Range header may be honoured given If-Range (RFC 9110 §13.1.5).

    True without If-Range. An entity-tag must match ``etag`` by strong comparison (weak
    tags never match); an HTTP-date must equal ``last_modified`` exactly. Anything else,
    including a malformed value, is false, so the full body is sent.
    """
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return etag is not None and _is_strong_etag(if_range) and if_range == etag.strip()
    if last_modified is None or if_range != last_modified.strip():
        return False
    return parsedate_tz(if_range) is not None
