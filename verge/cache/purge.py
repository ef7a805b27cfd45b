"""Finding what to purge: surrogate keys (tags) and key prefixes.

Origins label responses with surrogate keys so that one purge can drop every object about,
say, one product: Fastly's ``Surrogate-Key`` (space-separated) and Cloudflare's
``Cache-Tag`` (comma-separated) headers are both read. :class:`TagIndex` maps each tag to
the cache keys that carry it, in memory, so a purge by tag costs the number of keys purged,
not a scan of the cache. Prefix purges are rarer and scan the keys (:func:`match_prefix`).

Tags are compared exactly (case-sensitive, as Fastly does); callers that want Cloudflare's
case-insensitive matching fold the case on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
        """A copy of the keys tagged ``tag`` (safe to purge them while holding it)."""
        return set(self._keys_by_tag.get(tag, ()))

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
