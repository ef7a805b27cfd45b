"""GCRA: the rate-limit algorithm behind nginx ``limit_req``, one float per key.

The generic cell rate algorithm (ITU-T I.371, the "virtual scheduling" form) is a leaky
bucket that stores, per key, a single timestamp: the theoretical arrival time (TAT) of the
next request if the client sent exactly at the rate. With ``interval = period / count`` and
``tolerance = burst * interval``, a request at ``now`` is allowed when ``TAT - now <=
tolerance``, and then moves ``TAT`` to ``max(TAT, now) + interval``. That is nginx's
``limit_req zone=... rate=count/period burst=burst nodelay``: from an idle key, ``burst + 1``
requests pass at once, then one per interval. A refused request leaves the TAT alone, so a
client hammering a limit does not dig itself deeper (the penalty box below does that, on
purpose). The equivalence with a bucket of capacity ``burst + 1`` draining one request per
interval is what tests/protect/test_gcra.py checks against an exact-arithmetic model.

Decisions carry what the RateLimit response fields need: ``remaining`` (requests that would
pass right now), ``reset`` (seconds until the bucket is empty, i.e. the whole burst is back)
and ``retry_after`` (seconds until the next request would pass).

The table is a plain dict in least-recently-used order (a key is moved to the end on every
check), bounded by ``max_keys``: a new key that finds the table full first evicts the
oldest ``max_keys // 64`` entries in one go (amortised O(1); the oldest are almost always
expired, i.e. indistinguishable from absent). Forgetting a live key only ever lets that key
start afresh: eviction is permissive, never stricter. :meth:`Gcra.sweep` drops expired keys
from the old end for callers that want the memory back early (the edge's housekeeping).

The penalty box: with ``penalty > 0`` a key refused once is refused outright for ``penalty``
seconds (or until the bucket allows it again, if later), without extending the sentence on
every retry. Boxed keys live in a second dict, empty on the fast path.

The hot path is :meth:`Limit.update` (one float back, nothing allocated): 0.2-0.6 µs a
check over 50k keys on the 2-core reference VM (``python -m verge.protect.bench``);
:meth:`Limit.check` wraps it in a :class:`Decision`.

Time is whatever monotonic clock the caller passes in (``time.monotonic()`` in the edge; the
coarse once-a-second clock of verge.http.server is too coarse for rates above 1/s).
"""

from __future__ import annotations

import abc
import math
from itertools import islice
from typing import NamedTuple

DEFAULT_MAX_KEYS = 100_000
EVICT_FRACTION = 64  # a full table evicts max_keys // EVICT_FRACTION keys at once
_EPSILON = 1e-9  # float slack when counting whole requests out of a time difference


class Decision(NamedTuple):
    allowed: bool
    retry_after: float
    """Seconds until a request would be allowed (0.0 when this one was)."""
    remaining: int
    """Requests that would still be allowed right now, after this one."""
    reset: float
    """Seconds until the bucket is empty again: the full burst is available."""


_decision = tuple.__new__  # Decision without its Python-level __new__: half the cost


def _check_int(value: int, what: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{what} must be an int >= {least}, not {value!r}")


def _positive_finite(value: float, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")
    return float(value)


class Limit(abc.ABC):
    """What every GCRA table shares: the parameters, and Decisions built on ``update``.

    Subclasses store the state (:class:`Gcra`: a dict in this process;
    verge.protect.shared.SharedGcra: a table in shared memory) and implement ``update`` and
    ``state``.
    """

    __slots__ = ("count", "period", "burst", "interval", "tolerance", "ceiling", "penalty",
                 "evicted")

    def __init__(self, count: int, period: float, burst: int = 0, penalty: float = 0.0) -> None:
        _check_int(count, "count", 1)
        _check_int(burst, "burst", 0)
        self.count = count
        self.period = _positive_finite(period, "period")
        self.burst = burst
        self.penalty = _positive_finite(penalty, "penalty", allow_zero=True)
        try:
            self.interval = self.period / count
            self.tolerance = burst * self.interval
        except OverflowError:
            self.interval = self.tolerance = math.inf
        if not (self.interval > 0.0 and math.isfinite(self.tolerance)):
            raise ValueError(f"{count}/{period}s with burst {burst} is out of range")
        # A request is refused when its TAT is further ahead than the tolerance. TATs are sums
        # of intervals on a clock of ~1e5 s, so "exactly the tolerance" comes out 1e-13 over
        # or under it: a millionth of an interval of slack lets exactly burst + 1 through.
        self.ceiling = self.tolerance + self.interval * 1e-6
        self.evicted = 0  # live keys forgotten because the table was full

    @abc.abstractmethod
    def update(self, key: str, now: float) -> float:
        """Count one request; allowed: the key's new ``TAT - now`` (> 0), refused: minus the
        seconds to wait (< 0). :meth:`check` without the Decision, for the hot path."""

    @abc.abstractmethod
    def state(self, key: str, now: float) -> tuple[float | None, float | None]:
        """(TAT, end of penalty) of a key at ``now``; None for what is not recorded."""

    def remaining(self, ahead: float) -> int:
        """Requests that pass right now when the key's TAT is ``ahead`` seconds away."""
        slack = self.tolerance - ahead
        if slack < -_EPSILON:
            return 0
        return int(slack / self.interval + _EPSILON) + 1

    def check(self, key: str, now: float) -> Decision:
        """Count one request of ``key`` at ``now``: allowed (and recorded) or refused."""
        ahead = self.update(key, now)
        if ahead < 0.0:
            tat, _release = self.state(key, now)
            empty_in = max(tat - now, 0.0) if tat is not None else 0.0
            return _decision(Decision, (False, -ahead, 0, max(empty_in, -ahead)))
        return _decision(Decision, (True, 0.0, self.remaining(ahead), ahead))

    def peek(self, key: str, now: float) -> Decision:
        """What :meth:`check` would answer, without recording anything."""
        tat, release = self.state(key, now)
        ahead = max(tat - now, 0.0) if tat is not None else 0.0
        if release is not None and now < release:
            return _decision(Decision, (False, release - now, 0, max(ahead, release - now)))
        if ahead > self.ceiling:
            return _decision(Decision, (False, ahead - self.tolerance, 0, ahead))
        ahead += self.interval
        return _decision(Decision, (True, 0.0, self.remaining(ahead), ahead))

    def sentence(self, ahead: float) -> float:
        """Seconds a key whose TAT is ``ahead`` (> tolerance) away must wait: with a penalty,
        at least the penalty."""
        retry_after = ahead - self.tolerance
        return max(retry_after, self.penalty) if self.penalty > 0.0 else retry_after


class Gcra(Limit):
    """One limit, ``count`` requests per ``period`` seconds plus ``burst``, over many keys,
    in a dict of this process."""

    __slots__ = ("max_keys", "_tat", "_boxed")

    def __init__(
        self,
        count: int,
        period: float,
        burst: int = 0,
        *,
        penalty: float = 0.0,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        super().__init__(count, period, burst, penalty)
        _check_int(max_keys, "max_keys", 1)
        self.max_keys = max_keys
        self._tat: dict[str, float] = {}
        self._boxed: dict[str, float] = {}  # key -> end of its penalty

    def __len__(self) -> int:
        return len(self._tat)

    def update(self, key: str, now: float) -> float:
        if self._boxed:
            release = self._boxed.get(key)
            if release is not None:
                if now < release:
                    return now - release
                del self._boxed[key]
        table = self._tat
        tat = table.pop(key, None)  # re-inserted below: the dict stays in LRU order
        if tat is None:
            if len(table) >= self.max_keys:
                self._make_room(now)
            tat = now
        elif tat < now:
            tat = now
        if tat - now > self.ceiling:
            table[key] = tat
            return self._refuse(key, now, tat - now)
        tat += self.interval
        table[key] = tat
        return tat - now

    def state(self, key: str, now: float) -> tuple[float | None, float | None]:
        return self._tat.get(key), self._boxed.get(key)

    def _refuse(self, key: str, now: float, ahead: float) -> float:
        wait = self.sentence(ahead)
        if self.penalty > 0.0:
            boxed = self._boxed
            if len(boxed) >= self.max_keys:
                for old in list(islice(boxed, max(1, self.max_keys // EVICT_FRACTION))):
                    del boxed[old]
            boxed[key] = now + wait
        return -wait

    def _make_room(self, now: float) -> None:
        """Drop the least recently used batch of keys (almost always expired ones)."""
        table = self._tat
        batch = list(islice(table.items(), max(1, self.max_keys // EVICT_FRACTION)))
        for key, tat in batch:
            del table[key]
            if tat > now:
                self.evicted += 1

    def sweep(self, now: float, budget: int = 10_000) -> int:
        """Drop expired keys from the least recently used end; returns how many went.

        Stops at the first live key or after ``budget`` keys, so a call is bounded.
        """
        table = self._tat
        expired = []
        for key, tat in islice(table.items(), budget):
            if tat > now:
                break
            expired.append(key)
        for key in expired:
            del table[key]
        boxed = self._boxed
        released = [key for key, end in islice(boxed.items(), budget) if end <= now]
        for key in released:
            del boxed[key]
        return len(expired)

    def boxed(self, key: str, now: float) -> bool:
        """Whether ``key`` sits in the penalty box at ``now``."""
        release = self._boxed.get(key)
        return release is not None and now < release
