"""Object and byte hit ratios of the memory-tier eviction policies on a Zipf workload.

Why: the memory tier's policy is chosen by byte hit ratio (bytes not fetched from the shield
or origin), and CDN popularity is skewed. This replays one synthetic trace -- Zipf
popularity, log-normal object sizes between 1 KiB and 1 MiB, sizes independent of
popularity, fixed seed -- against every policy at a few cache sizes and prints a table.

    python bench/zipf_hit_ratio.py [--objects N --requests M --alpha A --cache-frac F ...]
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verge.cache.eviction import POLICIES, make_policy  # noqa: E402

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Trace:
    keys: list[str]
    sizes: list[int]  # size of each request's object, parallel to keys
    working_set_bytes: int


def object_sizes(
    count: int, rng: random.Random, median: int = 24 * KIB, sigma: float = 1.5
) -> list[int]:
    """Log-normal sizes clamped to 1 KiB..1 MiB."""
    mu = math.log(median)
    return [min(MIB, max(KIB, int(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def zipf_trace(objects: int, requests: int, alpha: float, seed: int, churn: int = 0) -> Trace:
    """``requests`` draws from Zipf(alpha) popularity over ``objects`` objects.

    With ``churn`` > 0, every 1,000 requests ``churn`` new objects take the top popularity
    ranks and every other object slides down (news, new episodes): a workload where recency
    matters and not only frequency.
    """
    rng = random.Random(seed)
    epochs = requests // 1000 + 1
    sizes = object_sizes(objects + churn * epochs, rng)
    cum_weights = list(itertools.accumulate(1.0 / rank**alpha for rank in range(1, objects + 1)))
    ranks = rng.choices(range(objects), cum_weights=cum_weights, k=requests)
    # Rank r of epoch e is object e*churn + (objects-1-r): sizes were drawn independently of
    # popularity, and each epoch's newest objects are its most popular.
    drawn = [(i // 1000) * churn + objects - 1 - rank for i, rank in enumerate(ranks)]
    return Trace(
        keys=[f"/obj/{i}" for i in drawn],
        sizes=[sizes[i] for i in drawn],
        working_set_bytes=sum(sizes[i] for i in set(drawn)),
    )


@dataclass(frozen=True)
class Result:
    policy: str
    cache_bytes: int
    object_hit_ratio: float
    byte_hit_ratio: float
    seconds: float


def replay(policy_name: str, cache_bytes: int, trace: Trace) -> Result:
    """Replay ``trace`` the way the edge uses a policy: hit -> access, miss -> insert."""
    policy = make_policy(policy_name, cache_bytes)
    access, insert = policy.access, policy.insert
    hits = hit_bytes = total_bytes = 0
    started = time.perf_counter()
    for key, size in zip(trace.keys, trace.sizes, strict=True):
        total_bytes += size
        if key in policy:
            hits += 1
            hit_bytes += size
            access(key)
        else:
            insert(key, size)
    elapsed = time.perf_counter() - started
    return Result(
        policy_name, cache_bytes, hits / len(trace.keys), hit_bytes / total_bytes, elapsed
    )


def print_table(trace: Trace, cache_fracs: list[float], policies: list[str]) -> None:
    print(
        f"{len(trace.keys):,} requests, working set {trace.working_set_bytes / MIB:,.1f} MiB\n"
        f"{'cache':>8} {'cache MiB':>10} {'policy':>8} {'obj hit':>8} {'byte hit':>9} {'s':>6}"
    )
    for frac in cache_fracs:
        cache_bytes = int(trace.working_set_bytes * frac)
        for name in policies:
            r = replay(name, cache_bytes, trace)
            print(
                f"{frac:>8.1%} {cache_bytes / MIB:>10,.1f} {name:>8} "
                f"{r.object_hit_ratio:>8.4f} {r.byte_hit_ratio:>9.4f} {r.seconds:>6.2f}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument(
        "--cache-frac",
        type=float,
        action="append",
        help="cache size as a fraction of working-set bytes (repeatable; default 0.01 0.05 0.1 0.2)",
    )
    parser.add_argument("--policies", nargs="+", default=sorted(POLICIES), choices=sorted(POLICIES))
    parser.add_argument(
        "--churn", type=int, default=0, help="new most-popular objects per 1,000 requests"
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trace = zipf_trace(args.objects, args.requests, args.alpha, args.seed, args.churn)
    print(
        f"Zipf alpha={args.alpha}, {args.objects:,} objects, churn {args.churn}/1000 requests, "
        f"seed {args.seed}"
    )
    print_table(trace, args.cache_frac or [0.01, 0.05, 0.1, 0.2], args.policies)


if __name__ == "__main__":
    main()
