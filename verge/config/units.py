"""Sizes and durations as an operator writes them: "64MiB", "1.5GiB", "500ms", "1h30m".

parse_bytes and parse_duration are also what the CLI uses for flags like ``--memory 512MiB``;
the annotated types (ByteSize, Duration, ...) are how a model field accepts them, with their
bounds from verge.config.bounds.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, Field

from verge.config.bounds import (
    MAX_BYTE_SIZE,
    MAX_REQUEST_HEAD_BYTES,
    MAX_TIMEOUT,
    MAX_TTL,
    MIN_HEALTH_INTERVAL,
    KiB,
)

# Every multiple is binary, as in nginx and Varnish: 1k = 1kB = 1KiB = 1024 bytes.
_BYTE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _BYTE_UNITS[_suffix] = KiB**_power
_BYTES_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)")
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def _non_negative_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"invalid {what} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {what} {value!r}: must be a finite number >= 0")
    return value


def parse_bytes(value: object) -> int:
    """A byte count from an int or a string like "500k", "64MiB", "1.5GiB" (binary multiples)."""
    if not isinstance(value, str):
        return int(_non_negative_number(value, "byte size"))
    match = _BYTES_RE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise ValueError(
            f"invalid byte size {value!r}: use a number of bytes or a number with a unit, "
            "e.g. 500k, 64MiB, 1GiB"
        )
    size = float(match.group(1)) * _BYTE_UNITS[match.group(2)]
    if not math.isfinite(size):
        raise ValueError(f"invalid byte size {value!r}: too large")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "500ms", "30s", "5m", "1h", "1d" or "1h30m"."""
    if not isinstance(value, str):
        return float(_non_negative_number(value, "duration"))
    text = value.strip().lower().replace(" ", "")
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    parts = _DURATION_PART_RE.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(
            f"invalid duration {value!r}: use a number of seconds or a number with a unit, "
            "e.g. 500ms, 30s, 5m, 1h, 1d"
        )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def bytes_input(value: object) -> object:
    """Parse unit strings; let pydantic judge everything else (so a list says 'valid integer')."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte size, got {value!r}")
    return parse_bytes(value) if isinstance(value, str) else value


def duration_input(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    return parse_duration(value) if isinstance(value, str) else value


# The bounds come before the BeforeValidator: so they reach the JSON schema as minimum/maximum.
ByteSize = Annotated[int, Field(ge=0, le=MAX_BYTE_SIZE), BeforeValidator(bytes_input)]
"""Bytes: an int or "64MiB"-style string; stored as int."""
RequestHeadSize = Annotated[
    int, Field(ge=0, le=MAX_REQUEST_HEAD_BYTES), BeforeValidator(bytes_input)
]
Duration = Annotated[float, Field(ge=0, le=MAX_TTL), BeforeValidator(duration_input)]
"""Seconds: a number or "30s"-style string; stored as float."""
PositiveDuration = Annotated[float, Field(gt=0, le=MAX_TIMEOUT), BeforeValidator(duration_input)]
"""A timeout or interval: more than 0, at most MAX_TIMEOUT."""
HealthInterval = Annotated[
    float, Field(ge=MIN_HEALTH_INTERVAL, le=MAX_TIMEOUT), BeforeValidator(duration_input)
]
