"""The deploy tests' marker: `image` (builds the container image; slow, skippable)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "image: builds and runs the container image with podman (minutes the first time); "
        "skipped with VERGE_SKIP_IMAGE=1 or -m 'not image'",
    )
