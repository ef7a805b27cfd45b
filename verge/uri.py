"""URI normal forms: the one place that says when two request paths are the same.

Every part of Verge that compares or forwards a path — the request target each protocol
parses (verge.http.target), the cache key and purge URLs (verge.cache.keys), signed-URL
prefixes (verge.edge.signing) — uses these functions, so a path can never mean one thing to
a rule and another to the cache or the origin. Pure functions, no imports of ours: both the
``http`` and the ``cache`` layers use them.

RFC 3986 §6.2.2 with the edge's policy on top:

* escapes of unreserved characters are decoded (``%7E`` -> ``~``, ``%73`` -> ``s``), other
  escapes get upper-case hex (``%2f`` -> ``%2F``: an encoded '/' is never decoded into one);
* bytes outside ASCII are percent-encoded;
* runs of '/' are merged (``//a`` -> ``/a``, as nginx's ``merge_slashes``), then dot segments
  removed (§5.2.4: ``/a/../b`` -> ``/b``, never above the root; ``%2e%2e`` counts as ``..``).

``strict`` (request targets) refuses what an origin could read differently from the edge —
a malformed escape, ``%00``, a raw backslash, a dot segment with a path parameter
(``/..;/``, which Tomcat treats as ``..``) — with :class:`UnsafePath`; the lenient form
(purge URLs typed by an operator) leaves those as they are.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
# a name, IPv4 (letters, digits, '-', '.', '_') or a bracketed IPv6 literal; optional port
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                        r"(?::[0-9]{1,5})?")


class UnsafePath(ValueError):
    """A path the edge will not forward: origins could read it differently."""


def _escape_table() -> dict[str, str]:
    """Every two-hex-digit spelling -> its normal form (the char if unreserved, else %XX)."""
    table: dict[str, str] = {}
    for high in _HEX:
        for low in _HEX:
            char = chr(int(high + low, 16))
            table[high + low] = char if char in _UNRESERVED else f"%{high}{low}".upper()
    return table


_ESCAPES = _escape_table()


def normalize_escapes(text: str) -> str:
    """Decode %XX of unreserved chars, upper-case the rest; non-ASCII encoded; malformed
    '%' left alone."""
    if not text.isascii():
        text = "".join(c if c < "\x80" else f"%{ord(c):02X}" for c in text)
    if "%" not in text:
        return text
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def _remove_dot_segments(path: str, strict: bool) -> str:
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
        if strict and segment.startswith((".;", "..;")):
            raise UnsafePath("path parameter on a dot segment")
        out.append(segment)
    return "/".join(out)


def normalize_path(path: str, *, strict: bool = False) -> str:
    """The normal form of a request path (see the module docstring). A path that does not
    start with '/' (including the empty path) is taken as if it did."""
    if not path.startswith("/"):
        path = "/" + path
    if strict and "\\" in path:
        raise UnsafePath("backslash in the path")
    if "%" in path or not path.isascii():
        if strict and _BAD_ESCAPE.search(path):
            raise UnsafePath("malformed percent-escape in the path")
        path = normalize_escapes(path)
        if strict and "%00" in path:
            raise UnsafePath("NUL in the path")
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = _remove_dot_segments(path, strict)
    return path


def valid_authority(value: str) -> bool:
    """A Host field or URL authority: a name, IPv4 or [IPv6], optional port. Spaces, '/',
    '@' (userinfo), empty values and the like are refused."""
    return _AUTHORITY.fullmatch(value) is not None


def has_encoded_separator(path: str) -> bool:
    """Whether a normalised path holds an encoded '/' or '\\' (a service may refuse it)."""
    return "%" in path and ("%2F" in path or "%5C" in path)
