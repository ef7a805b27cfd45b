"""HTTP message types shared by the server, the upstream client, the cache and the edge.

Headers are kept as a list of ``(name, value)`` string pairs in their original case and
order (latin-1 decoded), so that headers the edge does not own pass through unchanged.
Look-ups go through :func:`header_map`, which folds names to lower case and joins repeated
fields with ``", "`` (RFC 9110 §5.3), which is what the pure cache policy consumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from verge.http_semantics import HOP_BY_HOP  # also importable from here, as before
from verge.uri import valid_authority

Headers = list[tuple[str, str]]


def header_map(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased name -> combined value (repeats joined with ', ')."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in out:
            out[key] = out[key] + ", " + value
        else:
            out[key] = value
    return out


def get_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The combined value of one field, or None when absent."""
    name = name.lower()
    values = [v for n, v in headers if n.lower() == name]
    return ", ".join(values) if values else None


def without(headers: Iterable[tuple[str, str]], names: Iterable[str]) -> Headers:
    """A copy of ``headers`` minus the (case-insensitive) ``names``."""
    drop = {n.lower() for n in names}
    return [(n, v) for n, v in headers if n.lower() not in drop]


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Remove hop-by-hop fields and any field named in Connection (RFC 9110 §7.6.1)."""
    headers = list(headers)
    named = set(HOP_BY_HOP)
    for n, v in headers:
        if n.lower() == "connection":
            named.update(t.strip().lower() for t in v.split(",") if t.strip())
    return [(n, v) for n, v in headers if n.lower() not in named]


def replace_header(headers: Headers, name: str, value: str | None) -> Headers:
    """A copy with every ``name`` field removed and, unless value is None, one appended."""
    out = without(headers, (name,))
    if value is not None:
        out.append((name, value))
    return out


class Request:
    """One parsed request as the edge pipeline sees it.

    ``target`` is the raw request-target (origin-form ``/path?query``); ``path`` and
    ``query`` are its two halves, still percent-encoded, split on first use (a cache hit
    whose route is memoised never needs them). ``body`` is an async byte source (see
    :class:`verge.http.server.RequestBody`) or None for requests without a body. A plain
    slotted class rather than a dataclass: one is built per request on the hot path.
    """

    __slots__ = ("method", "target", "_path", "_query", "headers", "version", "client", "body",
                 "_map", "keep_alive", "_host", "service", "scheme", "admitted", "computed")

    def __init__(self, method: str, target: str, path: str | None = None,
                 query: str | None = None, headers: Headers | None = None, version: str = "1.1",
                 client: str = "", body: object | None = None,
                 hmap: dict[str, str] | None = None) -> None:
        self.method = method
        self.target = target
        self._path = path
        self._query = query
        self.headers = headers if headers is not None else []
        self.version = version
        self.client = client
        self.body = body
        self._map = hmap
        self.keep_alive = True
        self._host: str | None = None
        self.service = ""  # the name of the service it was routed to (for stats)
        self.scheme = "http"  # "https" when it arrived over TLS
        self.admitted = None  # the protect phase's verdict, once taken (verge.edge.protect)
        self.computed = None  # an edge function's run, when the fast path made it

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target} HTTP/{self.version})"

    def replace(self, *, target: str | None = None, headers: Headers | None = None) -> Request:
        """A copy with another target and/or header list, its derived views (path, query,
        header map, host) recomputed on use. The pipeline changes a request this way (a
        signed URL's token taken out, a function's rewrite), never in place: the protocol
        layer's request stays the one the client sent."""
        clone = Request.__new__(Request)
        for name in Request.__slots__:
            setattr(clone, name, getattr(self, name))
        if target is not None:
            clone.target, clone._path, clone._query = target, None, None
        if headers is not None:
            clone.headers, clone._map, clone._host = headers, None, None
        return clone

    @property
    def path(self) -> str:
        if self._path is None:
            self._path, self._query = split_target(self.target)
        return self._path

    @property
    def query(self) -> str:
        if self._query is None:
            self._path, self._query = split_target(self.target)
        return self._query

    @property
    def hmap(self) -> Mapping[str, str]:
        """Lower-cased header map, built once on first use."""
        if self._map is None:
            self._map = header_map(self.headers)
        return self._map

    def header(self, name: str) -> str | None:
        return self.hmap.get(name.lower())

    @property
    def host(self) -> str:
        """The Host field without port, lower-cased ('' when absent), computed once."""
        if self._host is None:
            field = self.hmap.get("host", "")
            host = _HOSTS.get(field)
            if host is None:
                if len(_HOSTS) >= HOST_MEMO_SIZE:
                    _HOSTS.clear()
                host = _HOSTS[field] = host_without_port(field)
            self._host = host
        return self._host


HOST_MEMO_SIZE = 1024
_VALID_HOSTS: set[str] = set()  # Host fields seen valid: few distinct per edge


def known_host(field: str | None) -> bool:
    """Whether a Host field (None: absent) is a plain authority: a name, IPv4 or [IPv6],
    optional port — no space, '/', '@' or emptiness (verge.uri.valid_authority)."""
    if field is None or field in _VALID_HOSTS:
        return True
    if not valid_authority(field):
        return False
    if len(_VALID_HOSTS) >= HOST_MEMO_SIZE:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(field)
    return True


def set_host(headers: Headers, hmap: dict[str, str], authority: str) -> Headers:
    """The request's fields with Host set to ``authority`` (an absolute-form target's), in
    the list and in its lower-cased map."""
    hmap["host"] = authority
    return [("Host", authority), *((n, v) for n, v in headers if n.lower() != "host")]
_HOSTS: dict[str, str] = {}  # Host field -> host_without_port(field): few distinct per edge


def host_without_port(field: str) -> str:
    """'Example.COM:8080' -> 'example.com'; '[::1]:80' -> '[::1]'."""
    if field.startswith("["):
        field = field[: field.find("]") + 1]
    elif ":" in field:
        field = field.rsplit(":", 1)[0]
    return field.lower()


def split_target(target: str) -> tuple[str, str]:
    """('/path', 'query') of an origin-form request-target; absolute-form is reduced."""
    if not target.startswith("/") and "://" in target:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path or "/", query
