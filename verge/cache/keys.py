"""Cache key construction.

Two requests share a cache entry exactly when their keys are equal, so the key must fold
together URLs that RFC 3986 §6.2.2 says are equivalent (``/%7Euser`` and ``/~user``,
``/a/./b`` and ``/a/b``, ``%2f`` and ``%2F``) while never merging URLs an origin may treat
differently (``%2F`` stays encoded: ``/a%2Fb`` is not ``/a/b``). The normal form is
:mod:`verge.uri`'s, the one the edge's requests already have. Keys are plain strings so
that purge by prefix is a string prefix test.

Key shape: ``host path ["?" query] *("\\n" name [":" value])`` — host lower-cased without
port, no scheme and no method (GET and HEAD share entries). This runs on every request, so
the common case (no ``%``, no dot segment, no query, no key headers) does almost no work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from verge import uri


def normalize_path(path: str) -> str:
    """A request path's normal form for a key (verge.uri: the same as the edge's requests,
    lenient towards malformed escapes in operator-typed purge URLs)."""
    return uri.normalize_path(path)


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
    query = uri.normalize_escapes(query)
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


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The cache key of one request under the rule that matches it: the one value the lookup,
    the fill lock, the store and invalidation use, built once in the route phase.

    ``url`` is the primary part (host, path and the query as the rule folds it: sorted,
    ignored); ``text`` is the stored key, ``url`` followed by the values of the rule's key
    headers (the same string without them); ``rule`` is the rule that made it (None: the
    service's defaults). The Vary variant inputs are the request's fields, chosen between at
    lookup: the Vary names are the stored response's, not known before it is found.
    """

    url: str
    text: str
    rule: object | None = None

    @classmethod
    def under(cls, rule, host: str, path: str, query: str,
              request_headers: Mapping[str, str] | None = None) -> CacheKey:
        """The key of a URL under ``rule`` (its ``sort_query``, ``ignore_query`` and
        ``key_headers``; None: the defaults), with the key headers' values taken from
        ``request_headers`` (absent when None)."""
        url = cache_key(host, path, query, sort_query=bool(rule and rule.sort_query),
                        ignore_query=bool(rule and rule.ignore_query))
        if rule is None or not rule.key_headers:
            return cls(url, url, rule)
        return cls(url, url + _header_suffix(rule.key_headers, request_headers), rule)

    def scope(self) -> tuple[str, str]:
        """What removes every entry of this URL under its rule (RFC 9111 §4.4 invalidation):
        ``("url", key)``, or ``("prefix", url + "\\n")`` when key headers make one entry
        per header value."""
        if self.rule is None or not self.rule.key_headers:
            return "url", self.text
        return "prefix", self.url + "\n"


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


def url_keys(config, url: str) -> list[str]:
    """The keys an edge with ``config`` may store a URL under (purge by URL): the service's
    key host (``Config.key_host``: whichever of its names or addresses the URL uses), the
    default key and the one a matching rule's ``sort_query``/``ignore_query`` makes."""
    base = key_for_url(url)
    host, _, rest = base.partition("/")
    path, _, query = ("/" + rest).partition("?")
    service = config.service_for_host(host)
    if service is None:
        return [base]
    key_host = config.key_host(service, host)
    rule = service.match_rule(path)
    found = {base, cache_key(key_host, path, query)}
    if rule is not None:
        found.add(CacheKey.under(rule, key_host, path, query).url)
    return sorted(found)


def prefix_key(config, url: str) -> str:
    """The key prefix of a purge by prefix, under the service's key host."""
    key = key_for_url(url)
    host, _, rest = key.partition("/")
    service = config.service_for_host(host)
    if service is None:
        return key
    return _normalize_host(config.key_host(service, host)) + "/" + rest
