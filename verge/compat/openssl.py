"""CPython's ``ssl`` internals and OpenSSL through ctypes: the process's libssl/libcrypto and
the ``SSL_CTX *`` inside an ``ssl.SSLContext``.

Why: Python's ``ssl`` module lacks a few server features (shared session ticket keys, OCSP
stapling). :mod:`verge.http.tls_tickets` and :mod:`verge.http.tls_ocsp` add them by calling
OpenSSL through ctypes on the ``SSL_CTX`` inside an ``ssl.SSLContext``; each declares the C
signatures of the functions it calls in a subclass of :class:`OpenSslLibraries`. What is
touched:

* the private layout of CPython's ``PySSLContext`` (Modules/_ssl.c): the ``SSL_CTX *ctx`` is
  the first field after ``PyObject_HEAD``, read at ``id(ctx) + object.__basicsize__``
  (:meth:`OpenSslLibraries.ctx_pointer`); CPython only;
* the libraries ``_ssl`` itself mapped (found in /proc/self/maps, else the ``.so.3`` names),
  whose version must equal ``ssl.OPENSSL_VERSION_NUMBER``;
* OpenSSL 3's C ABI: ``SSL_CTX_get_options`` returns ``uint64_t`` (an ``unsigned long`` in
  1.1.1), and the ticket callback uses ``EVP_MAC`` / ``OSSL_PARAM`` (3.0 and later).

Both users must trust what they call, so the checks run before any pointer is used: a
pointer is used only after ``SSL_CTX_get_options`` on it returns the context's ``options``.
Anything unexpected raises :class:`BindingError`; each user then logs once and leaves the
context as it was (fail safe): :class:`LazyBinding` is that "make once, warn once" holder.
:func:`check` runs the same checks loudly (CompatError) for tests.

When upgrading Python: compare ``PySSLContext`` in the new Modules/_ssl.c (is ``SSL_CTX *ctx``
still first?). When upgrading OpenSSL: compare the signatures declared here and in the two
users' ``_declare`` with the new headers (and the ``SSL_CTRL_*`` numbers the users pass).
Run ``tests/compat/test_openssl.py``, ``tests/http/test_tls_tickets.py`` and
``tests/http/test_tls_ocsp.py``; then move ``SUPPORTED``.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from verge.compat import CompatError, Expect, VersionRange

__all__ = [
    "SUPPORTED",
    "BindingError",
    "LazyBinding",
    "OpenSslLibraries",
    "check",
    "loaded_library",
]

_MODULE = "verge/compat/openssl.py"


def _openssl_version() -> str:
    """The version ``_ssl`` was linked with, e.g. "3.0.19" from "OpenSSL 3.0.19 27 Jan 2026"."""
    numbers = re.search(r"\d+\.\d+\.\d+", ssl.OPENSSL_VERSION)
    return numbers.group() if numbers else "0"


CPYTHON = VersionRange(
    "CPython",
    minimum="3.11",
    below="3.14",
    tested="3.11.7",
    module=_MODULE,
    version_of=platform.python_version,
)
OPENSSL = VersionRange(
    "OpenSSL",
    minimum="3.0",
    below="4",
    tested="3.0.19",
    module=_MODULE,
    version_of=_openssl_version,
)
SUPPORTED = (CPYTHON, OPENSSL)

L = TypeVar("L")


class BindingError(CompatError):
    """This process's OpenSSL or CPython is not what the ctypes binding expects."""


def loaded_library(stem: str) -> str:
    """The path of ``stem`` (e.g. "libssl.so") as mapped into this process by ``_ssl``."""
    import _ssl  # noqa: F401  (make sure the libraries are mapped)

    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if Path(path).name.startswith(stem):
                return path
    except OSError:
        pass
    return f"{stem}.3"


class OpenSslLibraries:
    """libssl + libcrypto with checked versions; subclasses declare what they call in _declare."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise BindingError(f"needs CPython's ssl module, not {sys.implementation.name}")
        try:
            self.ssl = ctypes.CDLL(loaded_library("libssl.so"))
            self.crypto = ctypes.CDLL(loaded_library("libcrypto.so"))
            self._declare()
        except (OSError, AttributeError) as exc:
            raise BindingError(str(exc)) from None
        version = self.crypto.OpenSSL_version_num()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise BindingError(
                f"libcrypto version {version:#x} is not ssl's {ssl.OPENSSL_VERSION_NUMBER:#x}"
            )

    def _declare(self) -> None:
        """Give every function used its C signature (AttributeError: a symbol is missing)."""
        self.crypto.OpenSSL_version_num.restype = ctypes.c_ulong
        self.crypto.OpenSSL_version_num.argtypes = []
        self.ssl.SSL_CTX_get_options.restype = ctypes.c_uint64
        self.ssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]

    def ctx_pointer(self, ctx: ssl.SSLContext) -> int:
        """The ``SSL_CTX *`` inside ``ctx``; BindingError unless it checks out."""
        if not isinstance(ctx, ssl.SSLContext):
            raise BindingError("not an ssl.SSLContext")
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or pointer % ctypes.sizeof(ctypes.c_void_p):
            raise BindingError("unexpected PySSLContext layout (no SSL_CTX pointer)")
        if self.ssl.SSL_CTX_get_options(pointer) != ctx.options:
            raise BindingError("unexpected PySSLContext layout (options do not match)")
        return pointer


class LazyBinding(Generic[L]):  # L: an OpenSslLibraries subclass
    """A binding made on first use, and one warning (``message % reason``) the first time a
    feature cannot use it; after that, callers get None and carry on without the feature."""

    def __init__(self, make: Callable[[], L], log: logging.Logger, message: str) -> None:
        self._make = make
        self._log = log
        self._message = message
        self._lib: L | None = None
        self._error: str | None = None
        self.warned = False

    def get(self) -> L | None:
        if self._lib is None and self._error is None:
            try:
                self._lib = self._make()
            except BindingError as exc:
                self._error = str(exc)
                self.warn(self._error)
        return self._lib

    def warn(self, reason: str) -> None:
        if not self.warned:
            self.warned = True
            self._log.warning(self._message, reason)

    def context(self, ctx: ssl.SSLContext) -> tuple[L, int] | None:
        """(the binding, ``ctx``'s ``SSL_CTX *``), or None after the one warning."""
        lib = self.get()
        if lib is None:
            return None
        try:
            return lib, lib.ctx_pointer(ctx)
        except BindingError as exc:
            self.warn(str(exc))
            return None


# --------------------------------------------------------------------------- check


def check(libraries: Callable[[], OpenSslLibraries] = OpenSslLibraries) -> OpenSslLibraries:
    """Make ``libraries()`` and read a fresh context's ``SSL_CTX *`` through it, twice (the
    options changed in between, so a stale or wrong pointer cannot match by chance).

    Returns the binding; CompatError (naming CPython or OpenSSL) when anything is off.
    """
    python = Expect("CPython", CPYTHON.installed(), _MODULE)
    python.that(sys.implementation.name == "cpython", "the implementation (not CPython)")
    python.that(
        ssl.SSLContext.__basicsize__ >= object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p),
        "PySSLContext (too small to hold the SSL_CTX pointer)",
    )
    openssl = Expect("OpenSSL", OPENSSL.installed(), _MODULE)
    try:
        lib = libraries()
    except BindingError as exc:
        raise openssl.error(f"the library or a symbol ({exc})") from exc
    openssl.ctypes_function(
        lib.ssl.SSL_CTX_get_options, [ctypes.c_void_p], ctypes.c_uint64, "SSL_CTX_get_options"
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        pointer = lib.ctx_pointer(ctx)
        ctx.options ^= ssl.OP_NO_TICKET
        python.that(lib.ctx_pointer(ctx) == pointer, "PySSLContext (the pointer moved)")
    except BindingError as exc:
        raise python.error(f"PySSLContext's layout ({exc})") from exc
    return lib
