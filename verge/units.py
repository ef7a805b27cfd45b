"""Sizes and durations as people write them: "64MiB", "1.5GiB", "500ms", "1h30m".

The syntax alone, on the standard library only, so that every part may use it (the config's
annotated types in verge.config.units, the protection settings, CLI flags such as
``--memory 512MiB``); bounds are the config's business.
"""

from __future__ import annotations

import math
import re

# Every multiple is binary, as in nginx and Varnish: 1k = 1kB = 1KiB = 1024 bytes.
_BYTE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _BYTE_UNITS[_suffix] = 1024**_power
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
