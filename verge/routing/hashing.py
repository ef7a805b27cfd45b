"""Rendezvous (highest-random-weight) hashing: which member owns a key, and who is next.

Used twice: an edge picks the parent (shield) for a cache key, and the router picks the edge
of a region for a URL when cache affinity is on. Rendezvous hashing fits both better than a
ring: every member ranks every key independently, so removing a member moves only the keys
it owned, the full failover order comes for free (the ranking), and no virtual nodes are
needed for balance. Members are few (edges of one region, parents of one edge), so the
O(members) cost per key is a handful of hashes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

_SCALE = float(1 << 64)


def _score(key: str, member: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / _SCALE  # in (0, 1), never 0
    return -weight / math.log(unit)  # weighted rendezvous (Schindelhauer & Schomaker)


def rank(key: str, members: Sequence[T], name: Callable[[T], str] = str,
         weight: Callable[[T], float] | None = None) -> list[T]:
    """All members, best owner of `key` first; the rest is the failover order.

    `name` gives a member's stable identity (its hash input); `weight` (default 1) skews the
    share of keys a member owns in proportion.
    """
    def score(member: T) -> float:
        return _score(key, name(member), weight(member) if weight else 1.0)

    return sorted(members, key=score, reverse=True)
