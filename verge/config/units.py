"""Sizes and durations as an operator writes them: "64MiB", "1.5GiB", "500ms", "1h30m".

parse_bytes and parse_duration are also what the CLI uses for flags like ``--memory 512MiB``;
the annotated types (ByteSize, Duration, ...) are how a model field accepts them, with their
bounds from verge.config.bounds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from verge.config.bounds import (
    MAX_BYTE_SIZE,
    MAX_REQUEST_HEAD_BYTES,
    MAX_TIMEOUT,
    MAX_TTL,
    MIN_HEALTH_INTERVAL,
)
from verge.units import parse_bytes, parse_duration


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
