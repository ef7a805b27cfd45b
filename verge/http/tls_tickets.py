"""TLS session ticket keys shared by every worker of an edge node, installed with ctypes.

Why: a session ticket (TLS 1.3 resumption, and TLS 1.2 tickets) is the session state
encrypted with a key only the server knows. OpenSSL draws that key at random for each
``SSL_CTX``, and every edge worker is its own process with its own context, while
SO_REUSEPORT sends a client's next connection to any worker: a ticket issued by worker 1
means nothing to worker 2, and resumption mostly fails. So the node supervisor generates the
keys (:class:`TicketKeySchedule`), sends them to every worker, rotates them on a schedule,
and each worker makes OpenSSL use them (:func:`install_ticket_keys`).

Why ctypes: Python's ``ssl`` module has no API for ticket keys. OpenSSL has
``SSL_CTX_set_tlsext_ticket_key_evp_cb``: a callback that names the key for a new ticket
and picks the key for a presented one, which allows several keys at once (the current one
encrypts, older ones still decrypt, so a rotation does not void recent tickets). It needs the
``SSL_CTX *`` of a Python context: CPython's ``PySSLContext`` (Modules/_ssl.c) holds it as its
first field, right after ``PyObject_HEAD``; the functions come from the libssl/libcrypto that
``_ssl`` itself loaded (found in /proc/self/maps, else ``libssl.so.3``). Finding and checking
the libraries and the pointer is shared with OCSP stapling in :mod:`verge.compat.openssl`.

Fail safe: before using the pointer, this module checks that it runs on CPython, that the
libraries' version equals ``ssl.OPENSSL_VERSION_NUMBER``, that every symbol exists and that
``SSL_CTX_get_options`` on the pointer returns the context's ``options``. If anything is not
as expected it logs one warning and changes nothing: the context keeps OpenSSL's own
per-process keys (resumption still works on the worker that issued the ticket). An
exception inside the callback makes OpenSSL skip the ticket (full handshake), never fail it.

Key material never appears in logs or reprs; on the wire between supervisor and workers a key
is 80 bytes in base64: 16 bytes key name, 32 bytes HMAC-SHA256 key, 32 bytes AES-256 key
(the layout of nginx's ``ssl_session_ticket_key`` files).
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from verge.compat.openssl import BindingError, LazyBinding, OpenSslLibraries

__all__ = [
    "BindingError",
    "TicketKey",
    "TicketKeyRing",
    "TicketKeySchedule",
    "decode_keys",
    "encode_keys",
    "install_ticket_keys",
]

log = logging.getLogger("verge.tls")

NAME_BYTES, HMAC_BYTES, AES_BYTES = 16, 32, 32
KEY_BYTES = NAME_BYTES + HMAC_BYTES + AES_BYTES
IV_BYTES = 16  # AES-CBC block; OpenSSL's iv buffer is EVP_MAX_IV_LENGTH (16) bytes

# Callback results (SSL_CTX_set_tlsext_ticket_key_cb(3)).
_NO_TICKET = 0  # encrypt: issue no ticket; decrypt: unknown key, do a full handshake
_OK = 1
_OK_RENEW = 2  # decrypted with an older key: use it, and issue a fresh ticket

_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value


# --------------------------------------------------------------------------- key material


@dataclass(frozen=True)
class TicketKey:
    """One ticket key: a public 16-byte name (sent in each ticket) and two secret keys."""

    name: bytes
    hmac_key: bytes = field(repr=False)
    aes_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        sizes = (len(self.name), len(self.hmac_key), len(self.aes_key))
        if sizes != (NAME_BYTES, HMAC_BYTES, AES_BYTES):
            raise ValueError("a ticket key is 16 + 32 + 32 bytes")

    @classmethod
    def generate(cls) -> TicketKey:
        return cls.from_bytes(os.urandom(KEY_BYTES))

    @classmethod
    def from_bytes(cls, raw: bytes) -> TicketKey:
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a ticket key is {KEY_BYTES} bytes, got {len(raw)}")
        hmac_end = NAME_BYTES + HMAC_BYTES
        return cls(raw[:NAME_BYTES], raw[NAME_BYTES:hmac_end], raw[hmac_end:])

    def to_bytes(self) -> bytes:
        return self.name + self.hmac_key + self.aes_key


def encode_keys(keys: Sequence[TicketKey]) -> list[str]:
    """Keys as JSON-safe strings (base64 of the 80-byte form), order kept."""
    return [base64.b64encode(key.to_bytes()).decode("ascii") for key in keys]


def decode_keys(encoded: Sequence[str]) -> list[TicketKey]:
    """The inverse of :func:`encode_keys`; ValueError on anything malformed."""
    return [TicketKey.from_bytes(base64.b64decode(text, validate=True)) for text in encoded]


class TicketKeySchedule:
    """The supervisor's keys: the current one, ``previous`` older ones, and the next one.

    :meth:`keys` lists the encrypting key first. The next key is handed out one rotation
    early (decrypt only), so while a rotation reaches the workers one by one, a worker that
    has not switched yet still accepts tickets from one that has. After ``previous + 1``
    rotations a key is gone and its tickets only get a full handshake.
    """

    def __init__(self, previous: int = 1) -> None:
        self._current = TicketKey.generate()
        self._previous: deque[TicketKey] = deque(maxlen=max(0, previous))
        self._next = TicketKey.generate()

    def keys(self) -> list[TicketKey]:
        return [self._current, *self._previous, self._next]

    def rotate(self) -> None:
        if self._previous.maxlen:
            self._previous.appendleft(self._current)
        self._current, self._next = self._next, TicketKey.generate()

    def encoded(self) -> list[str]:
        return encode_keys(self.keys())


# --------------------------------------------------------------------------- OpenSSL binding

_TicketCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char iv[EVP_MAX_IV_LENGTH]
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc: 1 new ticket, 0 presented ticket
)


class _OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


class _OpenSsl(OpenSslLibraries):
    """The few libssl/libcrypto functions the ticket callback uses, with their C signatures."""

    def __init__(self) -> None:
        super().__init__()
        self.cipher = self.crypto.EVP_aes_256_cbc()

    def _declare(self) -> None:
        super()._declare()
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        self.crypto.EVP_aes_256_cbc.restype = vp
        self.crypto.EVP_aes_256_cbc.argtypes = []
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            func = getattr(self.crypto, name)
            func.restype, func.argtypes = c_int, [vp, vp, vp, vp, vp]
        self.crypto.EVP_MAC_CTX_set_params.restype = c_int
        self.crypto.EVP_MAC_CTX_set_params.argtypes = [vp, vp]
        self.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb.restype = c_int
        self.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb.argtypes = [vp, _TicketCallback]


_BINDING = LazyBinding(
    _OpenSsl, log,
    "shared TLS session ticket keys unavailable (%s); each worker keeps OpenSSL's own keys, "
    "so a session resumes only on the worker that issued its ticket",
)
_openssl, _warn = _BINDING.get, _BINDING.warn


# --------------------------------------------------------------------------- the callback


class _PreparedKey:
    """A key turned into the buffers OpenSSL wants (kept alive as long as the key is in use)."""

    def __init__(self, key: TicketKey) -> None:
        self.name = key.name
        self.aes = ctypes.create_string_buffer(key.aes_key, AES_BYTES)
        self._hmac = ctypes.create_string_buffer(key.hmac_key, HMAC_BYTES)
        self._digest = ctypes.create_string_buffer(b"SHA256")
        self.mac_params = (_OsslParam * 3)(
            _OsslParam(
                b"key",
                _OSSL_PARAM_OCTET_STRING,
                ctypes.addressof(self._hmac),
                HMAC_BYTES,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(
                b"digest",
                _OSSL_PARAM_UTF8_STRING,
                ctypes.addressof(self._digest),
                len(b"SHA256"),
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(None, 0, None, 0, 0),
        )


class TicketKeyRing:
    """The keys one context uses: the first encrypts new tickets, all of them decrypt."""

    def __init__(self, lib: _OpenSsl) -> None:
        self._lib = lib
        self._encrypting: _PreparedKey | None = None
        self._by_name: dict[bytes, _PreparedKey] = {}
        self._callback = _TicketCallback(self._on_ticket)  # referenced for the ring's lifetime
        self._failed = False

    def set_keys(self, keys: Sequence[TicketKey]) -> None:
        """Switch to ``keys`` (encrypting key first); takes effect on the next handshake."""
        if not keys:
            raise ValueError("at least one ticket key is needed")
        prepared = [_PreparedKey(key) for key in keys]
        self._by_name = {key.name: key for key in reversed(prepared)}
        self._encrypting = prepared[0]

    def _attach(self, ctx_pointer: int) -> bool:
        return self._lib.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx_pointer, self._callback) == 1

    def _on_ticket(
        self, _ssl: int, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int, enc: int
    ) -> int:
        try:
            if enc:
                return self._encrypt(key_name, iv, cipher_ctx, mac_ctx)
            return self._decrypt(key_name, iv, cipher_ctx, mac_ctx)
        except Exception:  # must not propagate into OpenSSL; a full handshake is fine
            if not self._failed:
                self._failed = True
                log.exception("TLS session ticket callback failed; issuing no tickets")
            return _NO_TICKET

    def _encrypt(self, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int) -> int:
        key = self._encrypting
        if key is None:
            return _NO_TICKET
        ctypes.memmove(key_name, key.name, NAME_BYTES)
        ctypes.memmove(iv, os.urandom(IV_BYTES), IV_BYTES)
        crypto = self._lib.crypto
        if crypto.EVP_EncryptInit_ex(cipher_ctx, self._lib.cipher, None, key.aes, iv) != 1:
            return _NO_TICKET
        if crypto.EVP_MAC_CTX_set_params(mac_ctx, key.mac_params) != 1:
            return _NO_TICKET
        return _OK

    def _decrypt(self, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int) -> int:
        key = self._by_name.get(ctypes.string_at(key_name, NAME_BYTES))
        if key is None:
            return _NO_TICKET
        crypto = self._lib.crypto
        if crypto.EVP_MAC_CTX_set_params(mac_ctx, key.mac_params) != 1:
            return _NO_TICKET
        if crypto.EVP_DecryptInit_ex(cipher_ctx, self._lib.cipher, None, key.aes, iv) != 1:
            return _NO_TICKET
        return _OK if key is self._encrypting else _OK_RENEW


_rings: dict[int, TicketKeyRing] = {}  # SSL_CTX pointer -> its ring; never freed (C holds it)


def install_ticket_keys(ctx: ssl.SSLContext, keys: Sequence[TicketKey]) -> TicketKeyRing | None:
    """Make ``ctx`` encrypt tickets with ``keys[0]`` and accept tickets from any of ``keys``.

    Call it again (or :meth:`TicketKeyRing.set_keys`) to rotate. Returns None, after one
    logged warning, when the binding cannot be trusted here; ``ctx`` is then left as it was.
    For an SNI front context, install on the front one: OpenSSL encrypts and decrypts tickets
    with the context the connection started on, whichever certificate context SNI picked.
    """
    bound = _BINDING.context(ctx)
    if bound is None:
        return None
    lib, pointer = bound
    ring = _rings.get(pointer)
    if ring is None:
        ring = TicketKeyRing(lib)
    ring.set_keys(keys)
    if not ring._attach(pointer):
        _warn("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
        return None
    _rings[pointer] = ring
    return ring
