"""Signed URLs: an HMAC token that grants a path prefix until an expiry time.

A rule with ``signed`` (verge.config ``SignedUrls``) makes the edge answer 403 unless the
request carries a valid token, in the query parameter (``?token=...``) or, with
``cookie: true``, in the ``verge_token`` cookie. The token is the one thing a player needs:
a valid token in the query comes back as a cookie scoped to the prefix's directory, so that
the relative requests an HLS player makes afterwards (media playlists, segments, parts, the
AES key) carry it without any URL rewriting.

Token format (URL- and cookie-safe, no padding)::

    EXPIRES-PREFIX_B64-HMAC_B64
    EXPIRES     expiry, Unix seconds, decimal
    PREFIX_B64  base64url of the granted path prefix (UTF-8), e.g. "/live/show"
    HMAC_B64    base64url of HMAC-SHA256(secret, f"{EXPIRES}:{PREFIX}") (always 43 characters)

base64url uses '-' too, so the fields are split by position: EXPIRES ends at the first '-',
the HMAC is the last 43 characters. The token grants every path that starts with PREFIX
(a plain string prefix, checked on the normalised path so that dot segments cannot climb out
of it). It is removed from the request before the cache key is made and before the origin
sees it: every viewer's token maps to the same cache entry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from verge.uri import normalize_path

COOKIE = "verge_token"
HMAC_CHARS = 43  # base64url of 32 bytes, unpadded
MIN_SECRET = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, expires: int, prefix: str) -> str:
    message = f"{expires}:{prefix}".encode()
    return _b64(hmac.new(secret.encode(), message, hashlib.sha256).digest())


def sign(secret: str, prefix: str, expires: int) -> str:
    """A token granting paths that start with ``prefix`` until ``expires`` (Unix seconds)."""
    if not prefix.startswith("/"):
        raise ValueError(f"prefix {prefix!r} must start with '/'")
    expires = int(expires)
    return f"{expires}-{_b64(prefix.encode())}-{_mac(secret, expires, prefix)}"


def parse(token: str) -> tuple[int, str, str] | None:
    """(expires, prefix, mac) of a well-formed token, else None. Says nothing about validity."""
    head, sep, rest = token.partition("-")
    if not sep or not head.isascii() or not head.isdigit() or len(head) > 12:
        return None
    if len(rest) < HMAC_CHARS + 1 or rest[-HMAC_CHARS - 1] != "-":
        return None
    try:
        prefix = _unb64(rest[: -HMAC_CHARS - 1]).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return int(head), prefix, rest[-HMAC_CHARS:]


def verify(secret: str, token: str, path: str, now: float) -> str | None:
    """None if ``token`` grants ``path`` at ``now``; else why not (for the 403 body)."""
    parsed = parse(token)
    if parsed is None:
        return "malformed token"
    expires, prefix, mac = parsed
    if not hmac.compare_digest(mac.encode(), _mac(secret, expires, prefix).encode()):
        return "bad token signature"
    if now >= expires:
        return "token expired"
    if not normalize_path(path).startswith(prefix):
        return "token does not cover this path"
    return None


# ----- the request side ----------------------------------------------------------------------


def take_param(query: str, param: str) -> tuple[str | None, str]:
    """(the first value of ``param``, the query without any ``param``); the rest is untouched."""
    if not query or param not in query:
        return None, query
    value = None
    kept = []
    for part in query.split("&"):
        name, _, raw = part.partition("=")
        if name == param:
            value = raw if value is None else value
        else:
            kept.append(part)
    return value, "&".join(kept)


def take_cookie(headers: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]] | None]:
    """(the ``verge_token`` cookie, the headers without it) — None for the headers when the
    request had no such cookie (nothing to change). Other cookies are kept."""
    if not any(n.lower() == "cookie" and COOKIE in v for n, v in headers):
        return None, None
    token = None
    out = []
    for name, value in headers:
        if name.lower() != "cookie":
            out.append((name, value))
            continue
        kept = []
        for pair in value.split(";"):
            key, _, cookie_value = pair.strip().partition("=")
            if key == COOKIE:
                token = token or cookie_value.strip('"')
            elif pair.strip():
                kept.append(pair.strip())
        if kept:
            out.append((name, "; ".join(kept)))
    return token, out


def cookie_path(prefix: str) -> str:
    """The cookie's Path: the prefix's directory. A cookie path only matches whole segments
    (RFC 6265 5.1.4), so "/live/show" would not reach "/live/show.m3u8"."""
    return prefix[: prefix.rfind("/") + 1] or "/"


def set_cookie(token: str, now: float) -> str | None:
    """The Set-Cookie value that hands a (valid) query token to the player's later requests."""
    parsed = parse(token)
    if parsed is None:
        return None
    expires, prefix, _ = parsed
    remaining = max(0, int(expires - now))
    return (
        f"{COOKIE}={token}; Path={cookie_path(prefix)}; Max-Age={remaining}; HttpOnly; SameSite=Lax"
    )


@dataclass(slots=True)
class Admission:
    """A request the signed rule lets through, and how to rewrite it before lookup/fetch."""

    token: str
    target: str | None  # the request-target without the token parameter (None: unchanged)
    headers: list[tuple[str, str]] | None  # the headers without the cookie (None: unchanged)
    set_cookie: str | None  # to add to the response (the token came in the query)


def admit(
    settings, path: str, query: str, headers: list[tuple[str, str]], now: float
) -> Admission | str:
    """Check one request against a rule's ``signed`` settings: an Admission, or the reason
    for a 403. The cookie is taken out of the request whether or not it is accepted."""
    secret = settings.secret_value()
    if secret is None:
        return "signed URLs are not usable on this edge (its signing secret is not set)"
    query_token, rest = take_param(query, settings.param)
    cookie_token, stripped = take_cookie(headers)
    token = query_token or (cookie_token if settings.cookie else None)
    if not token:
        return f"this URL needs a signed token (?{settings.param}=...)"
    reason = verify(secret, token, path, now)
    if reason is not None:
        return reason
    target = None
    if query_token is not None:
        target = path + ("?" + rest if rest else "")
    cookie = set_cookie(token, now) if query_token is not None and settings.cookie else None
    return Admission(token, target, stripped, cookie)


# ----- the signer's side -----------------------------------------------------------------------


def sign_url(
    url: str,
    secret: str,
    *,
    prefix: str | None = None,
    ttl: float = 3600,
    param: str = "token",
    now: float | None = None,
) -> str:
    """``url`` with a token in ``param`` granting ``prefix`` (default: the URL's own path)
    for ``ttl`` seconds."""
    if len(secret) < MIN_SECRET:
        raise ValueError(f"the secret must be at least {MIN_SECRET} characters")
    parts = urlsplit(url)
    path = parts.path or "/"
    prefix = prefix or path
    if not normalize_path(path).startswith(prefix):
        raise ValueError(f"prefix {prefix!r} does not cover the URL's path {path!r}")
    expires = int((time.time() if now is None else now) + ttl)
    token = sign(secret, prefix, expires)
    _, query = take_param(parts.query, param)
    query = f"{query}&{param}={token}" if query else f"{param}={token}"
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))
