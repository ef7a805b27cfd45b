"""HTTP message types shared by the server, the upstream client, the cache and the edge.

Headers are kept as a list of ``(name, value)`` string pairs in their original case and
order (latin-1 decoded), so that headers the edge does not own pass through unchanged.
Look-ups go through :func:`header_map`, which folds names to lower case and joins repeated
fields with ``", "`` (RFC 9110 §5.3), which is what the pure cache policy consumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1: connection-specific fields, never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


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


@dataclass(slots=True)
class Request:
    """One parsed request as the edge pipeline sees it.

    ``target`` is the raw request-target (origin-form ``/path?query``); ``path`` and
    ``query`` are its two halves, still percent-encoded. ``body`` is an async byte source
    (see :class:`verge.http.server.RequestBody`) or None for requests without a body.
    """

    method: str
    target: str
    path: str
    query: str
    headers: Headers
    version: str = "1.1"
    client: str = ""
    body: object | None = None
    _map: dict[str, str] | None = field(default=None, repr=False)
    keep_alive: bool = True
    _host: str | None = field(default=None, repr=False)

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
            host = self.hmap.get("host", "")
            if host.startswith("["):
                host = host[: host.find("]") + 1]
            elif ":" in host:
                host = host.rsplit(":", 1)[0]
            self._host = host.lower()
        return self._host


def split_target(target: str) -> tuple[str, str]:
    """('/path', 'query') of an origin-form request-target; absolute-form is reduced."""
    if not target.startswith("/") and "://" in target:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path or "/", query
