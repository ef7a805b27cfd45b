"""The request target, parsed and normalised once, where a request is read.

Every decision the edge makes about a request — service and rule matching, edge-function
routes, signed-URL checks, the cache key, the access log and the upstream request — reads
``Request.target`` (and ``path``/``query``), so that value must already be the one true
form of the URL. Each protocol (HTTP/1.1 in ``server.py``, HTTP/2 and HTTP/3 through
``h2server.request_from_fields``) calls :func:`normalize_target` before building a
``Request``; a target that cannot be normalised safely is refused with a status.

The forms (RFC 9112 §3.2): origin-form ``/path?query``; absolute-form
``http(s)://authority/path?query`` is reduced to origin-form and its authority replaces
``Host`` (§3.2.2), so the origin gets origin-form — other schemes, userinfo and bad
authorities get 400; ``*`` (asterisk-form) only with OPTIONS. CONNECT and TRACE get 405 (an
edge is not a forward proxy, and TRACE would reflect credentials); a fragment gets 400.
The path and query are normalised by :mod:`verge.uri` (strictly: what an origin could read
differently is refused); an empty query is dropped.

The common target (``/static/app.js?v=3``) takes a fast path of a few ``in`` tests.
"""

from __future__ import annotations

from verge.uri import UnsafePath, normalize_escapes, normalize_path, valid_authority

MEMO_SIZE = 4096
_MEMO: dict[tuple[str, str], tuple[str, str | None]] = {}


class BadTarget(ValueError):
    """The request target cannot be normalised safely; ``status`` says how to refuse it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def normalize_target(method: str, target: str) -> tuple[str, str | None]:
    """(normalised origin-form target, the authority of an absolute-form target or None).

    Raises :class:`BadTarget` (with the status to answer) for what must be refused.
    """
    if target[:1] == "/" and "%" not in target and "/." not in target and "//" not in target \
            and "\\" not in target and "#" not in target and target.isascii() \
            and method != "CONNECT" and method != "TRACE":
        return (target[:-1] if target[-1] == "?" else target), None
    memo_key = (method, target)
    known = _MEMO.get(memo_key)
    if known is None:
        known = _normalize(method, target)
        if len(_MEMO) >= MEMO_SIZE:
            _MEMO.clear()
        _MEMO[memo_key] = known
    return known


def _normalize(method: str, target: str) -> tuple[str, str | None]:
    if method in ("CONNECT", "TRACE"):
        raise BadTarget(405, f"{method} is not allowed")
    if target == "*":
        if method == "OPTIONS":
            return "*", None
        raise BadTarget(400, "asterisk-form is for OPTIONS only")
    if "#" in target:
        raise BadTarget(400, "fragment in the request target")
    authority = None
    if not target.startswith("/"):
        authority, target = _split_absolute(target)
    path, question, query = target.partition("?")
    try:
        path = normalize_path(path, strict=True)
    except UnsafePath as exc:
        raise BadTarget(400, str(exc)) from None
    query = normalize_escapes(query) if question else ""
    return (path + "?" + query if query else path), authority


def _split_absolute(target: str) -> tuple[str, str]:
    """(authority, origin-form target) of an absolute-form target."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadTarget(400, "request target must be origin-form or an http(s) URL")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if "@" in authority:
        raise BadTarget(400, "userinfo in the request target")
    if not valid_authority(authority):
        raise BadTarget(400, "invalid authority in the request target")
    return authority, path if path.startswith("/") else "/" + path
