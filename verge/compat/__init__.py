"""Patches to third-party internals, one module per library, each with its pinned versions.

Why: a few hot or missing features are reached through a library's private names (h2's
header-block buffer, aioquic's handshake and stream internals, the ``SSL_CTX *`` inside a
CPython ``ssl.SSLContext``, wasmtime's raw C API). Private names change without notice in
any release, so they are kept here and nowhere else in :mod:`verge`:

* :mod:`verge.compat.h2` — h2 (and hpack): validation flags, the CONTINUATION buffer;
* :mod:`verge.compat.aioquic` — aioquic (and pylsqpack): SNI certificates, H3 hooks,
  stream limits and send buffers, the CONNECTION_REFUSED packet;
* :mod:`verge.compat.openssl` — CPython's ``_ssl`` layout and libssl/libcrypto via ctypes;
* :mod:`verge.compat.wasmtime` — wasmtime's ``_ffi`` (pooling, WASI config, exports) and
  guest memory addresses;
* :mod:`verge.compat.aioice` — the host addresses ICE gathers on (WebRTC playback).

Each module states what it touches, why, and what to look at when upgrading; declares
``SUPPORTED`` (the :class:`VersionRange` s it was written and tested against); and has a
``check()`` that raises :class:`CompatError` naming what changed and the module to read.
``tests/compat/`` runs every ``check()`` and the patched behaviour, so an upgrade that breaks
one fails there loudly rather than in production. This package imports no library itself:
importing :mod:`verge.compat` costs nothing; each submodule imports only its own library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LIBRARIES", "CompatError", "Expect", "VersionRange", "check_all", "require_versions"]

LIBRARIES = ("h2", "aioquic", "openssl", "wasmtime", "aioice")  # the submodules of this package


class CompatError(RuntimeError):
    """A library is not what its compat module was written against (version or internals)."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "4.4.1rc1" -> (4, 4, 1)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    if numbers is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in numbers.group().split("."))


def _padded(release: tuple[int, ...], width: int) -> tuple[int, ...]:
    return release + (0,) * (width - len(release))


@dataclass(frozen=True)
class VersionRange:
    """The versions of ``name`` a compat module supports: ``minimum <= v < below``.

    ``tested`` is the version the module was written and tested against; the version in use
    is the distribution's (importlib.metadata), or what ``version_of()`` returns.
    """

    name: str
    minimum: str
    below: str
    tested: str
    module: str  # the compat module to read, e.g. "verge/compat/h2.py"
    version_of: Callable[[], str] | None = field(default=None, compare=False)

    def installed(self) -> str:
        if self.version_of is not None:
            return self.version_of()
        return importlib.metadata.version(self.name)

    @property
    def spec(self) -> str:
        """The range as a requirement specifier, e.g. ``>=4.4.1,<4.5``."""
        return f">={self.minimum},<{self.below}"

    def contains(self, version: str) -> bool:
        release = _release(version)
        width = max(len(release), len(_release(self.minimum)), len(_release(self.below)))
        low, high = _padded(_release(self.minimum), width), _padded(_release(self.below), width)
        return low <= _padded(release, width) < high

    def require(self) -> str:
        """The installed version; CompatError when it is outside the range."""
        version = self.installed()
        if not self.contains(version):
            raise CompatError(
                f"{self.name} {version} is outside {self.spec} (tested: {self.tested}), the "
                f"range {self.module} was written for: read that module's docstring, check "
                f"what it touches, run tests/compat/, then widen its SUPPORTED range"
            )
        return version


def require_versions(ranges: Sequence[VersionRange]) -> dict[str, str]:
    """Every range's installed version ({name: version}); CompatError for the first outside."""
    return {supported.name: supported.require() for supported in ranges}


class Expect:
    """Shape checks for one library: each failure is a CompatError naming what changed.

    ``Expect("h2", "4.5.0", "verge/compat/h2.py").that(ok, "FrameBuffer._headers_buffer")``
    raises ``CompatError("h2 4.5.0 changed FrameBuffer._headers_buffer: see verge/compat/h2.py")``.
    """

    def __init__(self, library: str, version: str, module: str) -> None:
        self.library = library
        self.version = version
        self.module = module

    def error(self, what: str) -> CompatError:
        return CompatError(f"{self.library} {self.version} changed {what}: see {self.module}")

    def that(self, ok: object, what: str) -> None:
        if not ok:
            raise self.error(what)

    def attribute(self, owner: object, name: str, what: str | None = None) -> Any:
        """``owner.name``, which must exist."""
        label = what or f"{_label(owner)}.{name}"
        try:
            return getattr(owner, name)
        except AttributeError:
            raise self.error(f"{label} (gone)") from None

    def function(self, owner: object, name: str, params: Sequence[str] | None = None) -> Any:
        """``owner.name``, callable, whose parameters start with ``params`` (if given)."""
        label = f"{_label(owner)}.{name}"
        func = self.attribute(owner, name, label)
        self.that(callable(func), f"{label} (no longer callable)")
        if params is not None:
            actual = list(inspect.signature(func).parameters)[: len(params)]
            self.that(actual == list(params), f"{label} parameters ({actual}, not {list(params)})")
        return func

    def ctypes_function(
        self, func: Any, argtypes: Sequence[type], restype: type | None, label: str
    ) -> None:
        """A ctypes foreign function with exactly this C signature."""
        self.that(hasattr(func, "argtypes") and callable(func), f"{label} (not a C function)")
        self.that(
            list(func.argtypes or ()) == list(argtypes),
            f"{label} argument types ({func.argtypes})",
        )
        self.that(func.restype == restype, f"{label} result type ({func.restype})")


def _label(owner: object) -> str:
    for name in ("__qualname__", "__name__"):  # a class or function, a module
        label = getattr(owner, name, None)
        if isinstance(label, str):
            return label
    return type(owner).__qualname__


def check_all() -> dict[str, str]:
    """Versions and ``check()`` of every compat module ({library: version}); CompatError."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        module = importlib.import_module(f"{__name__}.{name}")
        versions.update(require_versions(module.SUPPORTED))
        module.check()
    return versions
