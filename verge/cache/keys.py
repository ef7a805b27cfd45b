"""Cache key construction.

Two requests share a cache entry exactly when their keys are equal, so the key must fold
together URLs that RFC 3986 §6.2.2 says are equivalent (``/%7Euser`` and ``/~user``,
``/a/./b`` and ``/a/b``, ``%2f`` and ``%2F``) while never merging URLs an origin may treat
differently (``%2F`` stays encoded: ``/a%2Fb`` is not ``/a/b``). Keys are plain strings so
that purge by prefix is a string prefix test.

Key shape: ``host path ["?" query] *("\\n" name [":" value])`` — host lower-cased without
port, no scheme and no method (GET and HEAD share entries). This runs on every request, so
the common case (no ``%``, no dot segment, no query, no key headers) does almost no work.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"


def _escape_table() -> dict[str, str]:
    """Every two-hex-digit spelling -> its normal form (the char if unreserved, else %XX)."""
    table: dict[str, str] = {}
    for high in _HEX:
        for low in _HEX:
            byte = int(high + low, 16)
            table[high + low] = chr(byte) if byte in _UNRESERVED else f"%{byte:02X}"
    return table


_ESCAPES = _escape_table()
_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _normalize_escapes(text: str) -> str:
    """Decode %XX of unreserved chars, upper-case the rest; malformed '%' left alone."""
    if "%" not in text:
        return text
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(1)], text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path ('/' first); never climbs above the root."""
    segments = path.split("/")
    last = len(segments) - 1
    out: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "." or segment == "..":
            if segment == ".." and len(out) > 1:
                out.pop()
            if index == last:
                out.append("")  # "/a/b/.." -> "/a/": the trailing slash stays
            continue
        out.append(segment)
    return "/".join(out)


def normalize_path(path: str) -> str:
    """Normalise a request path for use in a key (RFC 3986 §6.2.2).

    Percent-decodes unreserved characters, upper-cases the hex of other escapes (reserved
    ones such as ``%2F`` stay encoded) and removes dot segments. A path that does not start
    with ``/`` (including the empty path) is treated as if it did.
    """
    if not path.startswith("/"):
        path = "/" + path
    if "%" in path:
        path = _normalize_escapes(path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _query_sort_key(part: str) -> tuple[str, str]:
    name, _, value = part.partition("=")
    return name, value


def normalize_query(query: str, *, sort: bool = False, drop: bool = False) -> str:
    """Normalise a query string (without its leading '?').

    ``drop`` returns ''. Percent-escapes are always normalised as in :func:`normalize_path`
    (an equivalence RFC 3986 allows for every component). ``sort`` also splits on '&',
    drops empty parts and stably sorts the parts by name, then value. '+' is kept as is.
    """
    if drop or not query:
        return ""
    query = _normalize_escapes(query)
    if not sort:
        return query
    parts = [part for part in query.split("&") if part]
    parts.sort(key=_query_sort_key)
    return "&".join(parts)


def _normalize_host(host: str) -> str:
    """Lower-case and drop any port; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    colon = host.rfind(":")
    if colon != -1 and "]" not in host[colon:]:
        host = host[:colon]
    return host


def _lookup(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive get; cheap when the mapping is already lower-cased (header_map)."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def _header_suffix(key_headers: Sequence[str], request_headers: Mapping[str, str] | None) -> str:
    """'\\nname:value' per key header, names lower-cased and sorted; absent -> '\\nname'.

    An absent header gets no ':' so it never matches a present but empty one (as with
    Vary, RFC 9111 §4.1).
    """
    headers = request_headers or {}
    lines = []
    for name in sorted({name.strip().lower() for name in key_headers}):
        value = _lookup(headers, name)
        lines.append(name if value is None else f"{name}:{value.strip()}")
    return "\n" + "\n".join(lines)


def cache_key(
    host: str,
    path: str,
    query: str,
    *,
    sort_query: bool = False,
    ignore_query: bool = False,
    key_headers: Sequence[str] = (),
    request_headers: Mapping[str, str] | None = None,
) -> str:
    """The cache key for one request, e.g. ``example.com/a/b?x=1&y=2``.

    ``query`` is without its '?'. With ``key_headers``, each named request header is
    appended so that different values make different keys.
    """
    key = _normalize_host(host) + normalize_path(path)
    if query:
        query = normalize_query(query, sort=sort_query, drop=ignore_query)
        if query:
            key = key + "?" + query
    if key_headers:
        key = key + _header_suffix(key_headers, request_headers)
    return key


def key_prefix(host: str, path_prefix: str) -> str:
    """The string every key under ``host`` + ``path_prefix`` starts with (purge by prefix).

    ``key_prefix("example.com", "/img/")`` matches ``/img/a.png`` and ``/img/b/c.png`` but
    not ``/images``; ``/img`` (no slash) matches both. An empty prefix matches the whole host.
    """
    return _normalize_host(host) + normalize_path(path_prefix)


def key_for_url(url: str) -> str:
    """The key :func:`cache_key` builds with defaults for a URL (purge by URL).

    Accepts ``http://host/path?query``, ``//host/path`` or ``host/path``; scheme, user info
    and fragment are ignored.
    """
    if "://" not in url and not url.startswith("//"):
        url = "//" + url
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return cache_key(host, parts.path, parts.query)
