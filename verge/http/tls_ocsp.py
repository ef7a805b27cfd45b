"""OCSP stapling from a response file, installed on a server ``SSL_CTX`` with ctypes.

Why: a stapled OCSP response lets a browser check that the certificate is not revoked without
asking the CA itself (slow, and a privacy leak). The operator (or a cron job running
``openssl ocsp``) keeps a DER response in a file; the edge sends it in the handshake to every
client that asks (the ``status_request`` extension).

Why ctypes: Python's ``ssl`` has no server-side stapling API. OpenSSL calls the context's
status callback (``SSL_CTX_set_tlsext_status_cb``, a macro for ``SSL_CTX_callback_ctrl``
with ``SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB``) once the certificate is chosen, on the context
SNI switched to; the callback hands over a copy of the response made with ``OPENSSL_malloc``
(``CRYPTO_malloc``: OpenSSL frees it) through ``SSL_set_tlsext_status_ocsp_resp``
(``SSL_ctrl`` with ``SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP``). So :class:`TlsStore
<verge.http.tls.TlsStore>` installs a stapler on each certificate's own context.

The file is re-read when it changes (checked at most once a second, on handshakes that ask
for a status). A response that does not parse, is not "successful", or whose nextUpdate has
passed is not stapled (clients then check revocation themselves); each problem is logged once.
Fail safe: the library and pointer checks of :mod:`verge.compat.openssl` run first; if
anything is unexpected, one warning is logged and the context staples nothing. An exception in
the callback means "no stapled response", never a failed handshake.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from verge.compat.openssl import LazyBinding, OpenSslLibraries

__all__ = ["OcspStapler", "install_ocsp_stapling"]

log = logging.getLogger("verge.tls")

_SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
_SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_NOACK = 3
RECHECK_SECONDS = 1.0

_StatusCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)  # SSL *, arg


class _OpenSsl(OpenSslLibraries):
    def _declare(self) -> None:
        super()._declare()
        vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self.ssl.SSL_CTX_callback_ctrl.restype = c_long
        self.ssl.SSL_CTX_callback_ctrl.argtypes = [vp, c_int, _StatusCallback]
        self.ssl.SSL_ctrl.restype = c_long
        self.ssl.SSL_ctrl.argtypes = [vp, c_int, c_long, vp]
        self.crypto.CRYPTO_malloc.restype = vp
        self.crypto.CRYPTO_malloc.argtypes = [ctypes.c_size_t, ctypes.c_char_p, c_int]
        self.crypto.CRYPTO_free.restype = None
        self.crypto.CRYPTO_free.argtypes = [vp, ctypes.c_char_p, c_int]


_BINDING = LazyBinding(
    _OpenSsl, log, "OCSP stapling unavailable (%s); clients check revocation themselves"
)
_warn = _BINDING.warn


class OcspStapler:
    """One context's stapled response: the DER bytes of ``path``, kept fresh."""

    def __init__(self, lib: _OpenSsl, path: str | Path) -> None:
        self._lib = lib
        self.path = Path(path)
        self._der: bytes | None = None
        self._next_update: datetime | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._problem: str | None = None
        self.callback = _StatusCallback(self._on_status)  # referenced as long as the stapler
        self.stapled = 0

    def response(self) -> bytes | None:
        """The DER response to staple now, or None (missing, bad or expired)."""
        now = time.monotonic()
        if now - self._checked >= RECHECK_SECONDS:
            with self._lock:
                self._checked = now
                self._refresh()
        if self._next_update is not None and datetime.now(UTC) > self._next_update:
            self._report(f"{self.path}: the OCSP response is past its nextUpdate; not stapling")
            return None
        return self._der

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._der, self._stamp = None, None
            self._report(f"cannot read OCSP response {self.path}: {exc.strerror}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            der = self.path.read_bytes()
            self._next_update = _check_response(der)
        except (OSError, ValueError) as exc:
            self._der = None
            self._report(f"OCSP response {self.path} not stapled: {exc}")
            return
        self._der, self._problem = der, None

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            self._problem = problem
            log.warning("%s", problem)

    def _on_status(self, ssl_pointer: int, _arg: int) -> int:
        try:
            der = self.response()
            if not der or not self._hand_over(ssl_pointer, der):
                return _SSL_TLSEXT_ERR_NOACK
            self.stapled += 1
            return _SSL_TLSEXT_ERR_OK
        except Exception:  # must not propagate into OpenSSL; no staple is fine
            self._report("OCSP status callback failed")
            log.debug("OCSP status callback failed", exc_info=True)
            return _SSL_TLSEXT_ERR_NOACK

    def _hand_over(self, ssl_pointer: int, der: bytes) -> bool:
        """Give OpenSSL its own copy (it frees it with the connection)."""
        crypto = self._lib.crypto
        buffer = crypto.CRYPTO_malloc(len(der), b"verge/tls_ocsp", 0)
        if not buffer:
            return False
        ctypes.memmove(buffer, der, len(der))
        done = self._lib.ssl.SSL_ctrl(
            ssl_pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(der), buffer
        )
        if done != 1:
            crypto.CRYPTO_free(buffer, b"verge/tls_ocsp", 0)
            return False
        return True


def _check_response(der: bytes) -> datetime | None:
    """nextUpdate of a successful DER OCSP response; ValueError for anything else."""
    from cryptography.x509 import ocsp

    response = ocsp.load_der_ocsp_response(der)
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"response status is {response.response_status.name}")
    return response.next_update_utc


def install_ocsp_stapling(ctx: ssl.SSLContext, path: str | Path) -> OcspStapler | None:
    """Staple the response in ``path`` on handshakes served by ``ctx`` (its own certificate).

    Returns None, after one logged warning, when the binding cannot be trusted here; ``ctx``
    is then unchanged. The stapler lives as long as ``ctx`` (an attribute of it), since
    OpenSSL keeps calling its callback.
    """
    bound = _BINDING.context(ctx)
    if bound is None:
        return None
    lib, pointer = bound
    stapler = OcspStapler(lib, path)
    if (
        lib.ssl.SSL_CTX_callback_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, stapler.callback)
        != 1
    ):
        _warn("SSL_CTX_set_tlsext_status_cb failed")
        return None
    ctx._verge_ocsp_stapler = stapler  # type: ignore[attr-defined]
    return stapler
