"""Finding what to purge: surrogate keys (tags) and key prefixes.

Origins label responses with surrogate keys so that one purge can drop every object about,
say, one product: Fastly's ``Surrogate-Key`` (space-separated) and Cloudflare's
``Cache-Tag`` (comma-separated) headers are both read. :class:`TagIndex` maps each tag to
the cache keys that carry it, in memory, so a purge by tag costs the number of keys purged,
not a scan of the cache. Prefix purges are rarer and scan the keys (:func:`match_prefix`).

Tags are compared exactly (case-sensitive, as Fastly does); callers that want Cloudflare's
case-insensitive matching fold the case on both sides.

A tag is not unique to one site: two tenants' origins may both say ``Surrogate-Key: home``.
A purge of one service therefore comes with a :class:`PurgeScope` (the hosts that service
serves), and only keys whose host is in scope go. Within one process the scope travels with
the tag as one string (:func:`scoped_tag`: tag, a newline, the scope as JSON; no tag holds a
newline, header values cannot), which :meth:`TagIndex.keys_for` understands, so the workers'
purge command needs no new field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SURROGATE_KEY = "surrogate-key"
CACHE_TAG = "cache-tag"
MAX_TAG_LENGTH = 1024  # Fastly's and Cloudflare's per-key limit; longer tokens are ignored


def parse_surrogate_keys(response_headers: Mapping[str, str]) -> frozenset[str]:
    """The tags of a response, from ``Surrogate-Key`` and ``Cache-Tag``.

    ``response_headers`` has lower-case names with repeated fields joined by ``", "`` (see
    :func:`verge.http.message.header_map`), so commas also separate surrogate keys.
    """
    tags: set[str] = set()
    surrogate = response_headers.get(SURROGATE_KEY)
    if surrogate:
        tags.update(surrogate.replace(",", " ").split())
    cache_tag = response_headers.get(CACHE_TAG)
    if cache_tag:
        tags.update(token.strip() for token in cache_tag.split(","))
    return frozenset(tag for tag in tags if tag and len(tag) <= MAX_TAG_LENGTH)


class TagIndex:
    """Tag -> cache keys, and back, so that keys can be dropped when they leave the cache."""

    def __init__(self) -> None:
        self._keys_by_tag: dict[str, set[str]] = {}
        self._tags_by_key: dict[str, frozenset[str]] = {}

    def add(self, key: str, tags: Iterable[str]) -> None:
        """Record ``key`` under ``tags``, replacing whatever tags it had before."""
        self.remove(key)
        tag_set = frozenset(tags)
        if not tag_set:
            return
        self._tags_by_key[key] = tag_set
        for tag in tag_set:
            self._keys_by_tag.setdefault(tag, set()).add(key)

    def remove(self, key: str) -> None:
        """Forget ``key`` (evicted or purged); unknown keys are ignored."""
        for tag in self._tags_by_key.pop(key, ()):
            keys = self._keys_by_tag[tag]
            keys.discard(key)
            if not keys:
                del self._keys_by_tag[tag]

    def keys_for(self, tag: str) -> set[str]:
        """A copy of the keys tagged ``tag`` (safe to purge them while holding it).

        ``tag`` may be a :func:`scoped_tag`: then only the keys of hosts in its scope.
        """
        tag, scope = split_scoped_tag(tag)
        keys = self._keys_by_tag.get(tag, ())
        if scope is None:
            return set(keys)
        return {key for key in keys if scope.contains(key_host(key))}

    def tags_for(self, key: str) -> frozenset[str]:
        return self._tags_by_key.get(key, frozenset())

    def __len__(self) -> int:
        """Number of tagged keys."""
        return len(self._tags_by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._tags_by_key


def match_prefix(keys: Iterable[str], prefix: str) -> list[str]:
    """The keys that start with ``prefix``, in the order given."""
    return [key for key in keys if key.startswith(prefix)]


# ---------------------------------------------------------------------------------------------
# Scoped purges: one service's hosts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeScope:
    """The hosts one service serves, as the edge routes Host headers.

    ``hosts`` are the service's host patterns (``name``, ``*.parent`` for every name below
    it at any depth, ``*`` for every host); ``excluded`` are other services' patterns that
    take precedence inside those (an exact host, a more specific wildcard).
    """

    hosts: frozenset[str]
    excluded: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, data: Mapping) -> PurgeScope:
        """From the control plane's ``{"hosts": [...], "except": [...]}``."""
        return cls(frozenset(data.get("hosts", ())), frozenset(data.get("except", ())))

    def to_json(self) -> dict:
        return {"hosts": sorted(self.hosts), "except": sorted(self.excluded)}

    def contains(self, host: str) -> bool:
        """Whether a request for ``host`` (a cache key's host) goes to this service."""
        if host in self.hosts:
            return True
        if host in self.excluded:
            return False
        dot = host.find(".")
        while dot != -1:  # the most specific wildcard decides
            wildcard = "*" + host[dot:]
            if wildcard in self.hosts:
                return True
            if wildcard in self.excluded:
                return False
            dot = host.find(".", dot + 1)
        return "*" in self.hosts and "*" not in self.excluded


def key_host(key: str) -> str:
    """The host of a cache key or storage key (``host/path...``)."""
    return key.partition("/")[0]


def scoped_tag(tag: str, scope: PurgeScope) -> str:
    """``tag`` limited to ``scope``, as one string for :meth:`TagIndex.keys_for`."""
    return tag + "\n" + json.dumps(scope.to_json(), separators=(",", ":"))


def split_scoped_tag(value: str) -> tuple[str, PurgeScope | None]:
    """(tag, scope) of a :func:`scoped_tag`; (value, None) for a plain tag."""
    tag, newline, scope = value.partition("\n")
    if not newline:
        return value, None
    return tag, PurgeScope.from_json(json.loads(scope))
