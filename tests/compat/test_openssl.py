"""verge.compat.openssl: the SSL_CTX pointer read out of an ssl.SSLContext is the live one,
and every function the TLS extensions declare exists in this OpenSSL."""

from __future__ import annotations

import ctypes
import ssl

import pytest

from tests.compat import loudly
from verge.compat import CompatError, VersionRange
from verge.compat import openssl as compat
from verge.http import tls_ocsp, tls_tickets


@pytest.mark.parametrize("supported", compat.SUPPORTED, ids=lambda r: r.name)
def test_installed_version_is_supported(supported: VersionRange) -> None:
    loudly(supported.require)


def test_check_passes() -> None:
    loudly(compat.check)


@pytest.mark.parametrize(
    "binding", [tls_ocsp._OpenSsl, tls_tickets._OpenSsl], ids=["ocsp", "tickets"]
)
def test_every_declared_function_binds(binding: type[compat.OpenSslLibraries]) -> None:
    """The users' _declare finds each symbol (an AttributeError would be a BindingError)."""
    assert isinstance(loudly(lambda: compat.check(binding)), binding)


def test_the_pointer_is_the_live_ssl_ctx() -> None:
    """Options written through the pointer show up in Python, and the other way round."""
    lib = compat.OpenSslLibraries()
    lib.ssl.SSL_CTX_set_options.restype = ctypes.c_uint64
    lib.ssl.SSL_CTX_set_options.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pointer = lib.ctx_pointer(ctx)
    assert pointer

    assert not ctx.options & (ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION)
    lib.ssl.SSL_CTX_set_options(pointer, ssl.OP_NO_TICKET)
    assert ctx.options & ssl.OP_NO_TICKET
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    assert lib.ssl.SSL_CTX_get_options(pointer) & ssl.OP_NO_RENEGOTIATION
    assert compat.OpenSslLibraries().ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) != pointer


def test_anything_but_a_context_is_refused() -> None:
    with pytest.raises(compat.BindingError):
        compat.OpenSslLibraries().ctx_pointer(object())  # type: ignore[arg-type]


def test_check_fails_loudly_on_a_wrong_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    def elsewhere(self: compat.OpenSslLibraries, ctx: ssl.SSLContext) -> int:
        raise compat.BindingError("unexpected PySSLContext layout (options do not match)")

    monkeypatch.setattr(compat.OpenSslLibraries, "ctx_pointer", elsewhere)
    with pytest.raises(
        CompatError,
        match=r"^CPython \S+ changed PySSLContext's layout .*"
        r"see verge/compat/openssl.py$",
    ):
        compat.check()


def test_binding_errors_are_compat_errors() -> None:
    assert issubclass(compat.BindingError, CompatError)
