"""What the ctypes TLS extensions share: the process's own libssl/libcrypto and SSL_CTX pointers.

Python's ``ssl`` module lacks a few server features (shared session ticket keys, OCSP
stapling). :mod:`verge.http.tls_tickets` and :mod:`verge.http.tls_ocsp` add them by calling
OpenSSL through ctypes on the ``SSL_CTX`` inside an ``ssl.SSLContext``. Both must trust what
they call, so the checks live here once:

* CPython only (the ``PySSLContext`` layout is CPython's, Modules/_ssl.c: the ``SSL_CTX *`` is
  the first field after ``PyObject_HEAD``);
* the libraries are the ones ``_ssl`` itself mapped (found in /proc/self/maps, else the
  ``.so.3`` names), and their version equals ``ssl.OPENSSL_VERSION_NUMBER``;
* a pointer is used only after ``SSL_CTX_get_options`` on it returns the context's
  ``options``.

Anything unexpected raises :class:`BindingError`; each user then logs once and leaves the
context as it was (fail safe): :class:`LazyBinding` is that "make once, warn once" holder.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["BindingError", "LazyBinding", "OpenSslLibraries", "loaded_library"]

L = TypeVar("L")


class BindingError(RuntimeError):
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
