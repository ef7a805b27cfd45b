"""Tests of verge.compat: each library's versions, internals and patched behaviour."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from verge.compat import CompatError

T = TypeVar("T")


def loudly(action: Callable[[], T]) -> T:
    """Run a compat check; a CompatError fails the test with just its message (which names
    what changed and the compat module to read), no traceback to dig through."""
    try:
        return action()
    except CompatError as exc:
        pytest.fail(str(exc), pytrace=False)
