"""The WAF's two numbers: CPU per inspected request, and detection on the corpus.

Why these: the CRS is what a WAF costs and what it catches. CPU per request decides where
the WAF may run (issue 14 measured ~0.56 ms for a benign GET at paranoia 1, five to six
times a whole cache hit, hence "misses and dynamic requests only"); the blocked rate on
attacks and the false-positive rate on their benign twins (tests/protect/waf_corpus.py)
say what that CPU buys, per paranoia level.

CPU is time.process_time() over many calls of the engine itself (no event loop, one
thread), so it is the engine's cost per request; the detection run goes through
Waf.inspect() as the edge calls it.

    .venv/bin/python bench/waf_bench.py [--paranoia 1 2] [--calls 2000]

Needs the engine and the CRS (scripts/waf-deps.sh). Prints a table, writes
bench/results/waf.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.protect.waf_corpus import ATTACKS, BENIGN, Case  # noqa: E402
from verge.protect.waf import InspectLimits, Waf, prepare  # noqa: E402
from verge.protect.waf_settings import WafSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "waf.json"
BENIGN_GETS = {
    "plain GET": "/static/css/site.css",
    "GET with query": "/search?q=blue+running+shoes&page=2&sort=price",
}


def cpu_per_request(waf: Waf, target: str, calls: int) -> float:
    """Milliseconds of CPU per engine evaluation of one benign browser GET."""
    request = Case("benign", "get", "GET", target, attack=False).request()[0]
    prepared = prepare(request, None, waf.settings.max_body_bytes, InspectLimits()).request
    waf.engine.evaluate(**prepared)  # warm-up
    start = time.process_time()
    for _ in range(calls):
        waf.engine.evaluate(**prepared)
    return (time.process_time() - start) / calls * 1000


async def detection(waf: Waf) -> dict[str, object]:
    """Blocked share of the attacks and of the benign twins, plus the misses by name."""

    async def verdicts(cases: list[Case]) -> list[bool]:
        out = []
        for case in cases:
            request, body = case.request()
            out.append((await waf.inspect(request, body)).blocked)
        return out

    attacks, benign = await verdicts(ATTACKS), await verdicts(BENIGN)
    by_category: dict[str, list[int]] = {}
    for case, blocked in zip(ATTACKS, attacks, strict=True):
        tally = by_category.setdefault(case.category, [0, 0])
        tally[0] += blocked
        tally[1] += 1
    return {
        "attacks": len(attacks),
        "blocked": sum(attacks),
        "blocked_rate": sum(attacks) / len(attacks),
        "benign": len(benign),
        "false_positives": sum(benign),
        "false_positive_rate": sum(benign) / len(benign),
        "by_category": {name: f"{hit}/{total}" for name, (hit, total) in by_category.items()},
        "missed": [_label(c) for c, hit in zip(ATTACKS, attacks, strict=True) if not hit],
        "false_positive_cases": [_label(c) for c, hit in zip(BENIGN, benign, strict=True) if hit],
    }


def _label(case: Case) -> str:
    return f"{case.category}: {case.name}"


def run_level(level: int, calls: int) -> dict[str, object]:
    # a generous budget: the detection figures must not depend on this machine's load
    waf = Waf(WafSettings(paranoia=level, budget_ms=1000), threads=1)
    try:
        cpu = {name: cpu_per_request(waf, target, calls) for name, target in BENIGN_GETS.items()}
        found = asyncio.run(detection(waf))
        return {"paranoia": level, "rules": waf.engine.rule_count, "cpu_ms": cpu, **found}
    finally:
        waf.close()


def report(result: dict[str, object]) -> None:
    cpu = result["cpu_ms"]
    assert isinstance(cpu, dict)
    print(f"\nCRS paranoia {result['paranoia']} ({result['rules']} rules)")
    for name, ms in cpu.items():
        print(f"  CPU per request, {name:15} {ms:6.3f} ms")
    print(
        f"  blocked        {result['blocked']:3}/{result['attacks']} attacks"
        f"   {result['blocked_rate']:6.1%}   {result['by_category']}"
    )
    print(
        f"  false positive {result['false_positives']:3}/{result['benign']} benign twins"
        f" {result['false_positive_rate']:6.1%}"
    )
    for name in result["missed"]:  # type: ignore[union-attr]
        print(f"    missed: {name}")
    for name in result["false_positive_cases"]:  # type: ignore[union-attr]
        print(f"    false positive: {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paranoia", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    results = [run_level(level, args.calls) for level in args.paranoia]
    for result in results:
        report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
