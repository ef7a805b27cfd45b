"""Reduce benchmark rounds to medians and ratios, print them side by side, save them as JSON.

Kept apart from the harness so the arithmetic (which nginx config is "the better one", what
a ratio means for a latency) is pure and testable, and the printed table and the JSON file
are built from one and the same summary.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import WrkResult
from rich.console import Console
from rich.table import Table

MB = 1_000_000


@dataclass(frozen=True)
class Size:
    key: str
    label: str
    nbytes: int


SIZES = (
    Size("1k", "1 KiB", 1024),
    Size("100k", "100 KiB", 100 * 1024),
    Size("10m", "10 MiB", 10 * 1024 * 1024),
)

# Verge/nginx throughput ratio each size must reach (against the better nginx config).
TARGETS = {"1k": 0.8, "100k": 0.95, "10m": 1.0}  # issue "Edge core, second generation"

# The headline metric per size: requests/s for small objects, MB/s for the large one.
HEADLINE = {"1k": "requests_per_s", "100k": "requests_per_s", "10m": "mb_per_s"}
METRIC_LABEL = {"requests_per_s": "req/s", "mb_per_s": "MB/s", "p99_ms": "p99 ms"}


@dataclass(frozen=True)
class Contender:
    """One server under test as the report sees it."""

    key: str
    label: str
    side: str  # "nginx" or "verge"
    workers: int
    pinned: bool


def summarize_runs(runs: Sequence[WrkResult], nbytes: int) -> dict[str, float]:
    """Medians over rounds of one contender at one object size, plus the spread."""
    rps = [r.requests_per_s for r in runs]
    median_rps = statistics.median(rps)
    return {
        "requests_per_s": median_rps,
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "mb_per_s": median_rps * nbytes / MB,
        "spread": (max(rps) - min(rps)) / median_rps if median_rps else 0.0,
        "errors": sum(r.errors for r in runs),
        "rounds": len(runs),
    }


def best_of(
    values: dict[str, float], higher_is_better: bool
) -> tuple[str, float] | tuple[None, None]:
    """The key and value of the best entry (max or min), or (None, None) when empty."""
    if not values:
        return None, None
    pick: Callable[..., str] = max if higher_is_better else min
    key = pick(values, key=values.__getitem__)
    return key, values[key]


def compare(
    medians: dict[str, dict[str, dict[str, float]]],
    contenders: Sequence[Contender],
    size_key: str,
    metric: str,
) -> dict[str, Any]:
    """Verge (1 pinned worker) against the better nginx config for one size and metric."""
    higher_is_better = metric != "p99_ms"
    nginx = {
        c.key: medians[c.key][size_key][metric]
        for c in contenders
        if c.side == "nginx" and c.key in medians
    }
    best_key, best_value = best_of(nginx, higher_is_better)
    verge = medians.get("verge", {}).get(size_key, {}).get(metric)
    ratio = verge / best_value if verge is not None and best_value else None
    target = TARGETS[size_key] if metric == HEADLINE[size_key] else None
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "verge": verge,
        "nginx_best": best_value,
        "nginx_best_config": best_key,
        "ratio": ratio,
        "target": target,
        "meets_target": None if ratio is None or target is None else ratio >= target,
    }


def table_rows() -> list[tuple[Size, str]]:
    """(size, metric) pairs in print order."""
    rows = []
    for size in SIZES:
        rows.append((size, HEADLINE[size.key]))
        rows.append((size, "p99_ms"))
    return rows


# --- rendering ---------------------------------------------------------------------------


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    if metric == "p99_ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:,.0f}"


def _cell(stats: dict[str, float] | None, metric: str) -> str:
    if stats is None:
        return "—"
    text = _fmt(stats[metric], metric)
    if metric != "p99_ms" and stats["rounds"] > 1:
        text += f" [dim]±{stats['spread'] * 50:.0f}%[/dim]"
    if stats["errors"]:
        text += f" [red]({stats['errors']} err)[/red]"
    return text


def _ratio_cell(cmp: dict[str, Any]) -> str:
    if cmp["ratio"] is None:
        return "—"
    text = f"{cmp['ratio']:.2f}×"
    if cmp["meets_target"] is None:
        return f"[dim]{text}[/dim]"
    return f"[green]{text}[/green]" if cmp["meets_target"] else f"[red]{text}[/red]"


def _target_cell(cmp: dict[str, Any]) -> str:
    if cmp["target"] is not None:
        mark = {True: " [green]✓[/green]", False: " [red]✗[/red]", None: ""}[cmp["meets_target"]]
        return f"≥ {cmp['target']:g}×{mark}"
    return "[dim]lower is better[/dim]" if not cmp["higher_is_better"] else ""


def _bold_if(text: str, key: str, cmp: dict[str, Any]) -> str:
    """Mark the nginx config that Verge is compared with."""
    return f"[bold]{text}[/bold]" if key == cmp["nginx_best_config"] else text


def hits_table(summary: dict[str, Any], contenders: Sequence[Contender], title: str) -> Table:
    """Main side-by-side table: pinned contenders, one row per size and metric."""
    shown = [c for c in contenders if c.pinned]
    table = Table(title=title, title_justify="left")
    table.add_column("cache hit")
    for c in shown:
        table.add_column(c.label, justify="right")
    table.add_column("Verge/nginx", justify="right")
    table.add_column("target", justify="left")
    medians = summary["medians"]
    for size, metric in table_rows():
        cmp = summary["comparisons"][size.key][metric]
        cells = [
            _bold_if(_cell(medians.get(c.key, {}).get(size.key), metric), c.key, cmp) for c in shown
        ]
        label = f"{size.label} {METRIC_LABEL[metric]}"
        table.add_row(label, *cells, _ratio_cell(cmp), _target_cell(cmp))
    return table


def scaling_table(summary: dict[str, Any]) -> Table | None:
    """Verge --workers 2 next to --workers 1; None when either was not measured."""
    medians = summary["medians"]
    if "verge" not in medians or "verge-w2" not in medians:
        return None
    table = Table(
        title="Verge --workers 2: NOT pinned, 2 workers and wrk (2 threads) share both cores",
        title_justify="left",
    )
    for name in ("cache hit", "--workers 1 (pinned)", "--workers 2 (unpinned)", "scaling"):
        table.add_column(name, justify="left" if name == "cache hit" else "right")
    for size in SIZES:
        metric = HEADLINE[size.key]
        one = medians["verge"][size.key][metric]
        two = medians["verge-w2"][size.key][metric]
        table.add_row(
            f"{size.label} {METRIC_LABEL[metric]}",
            _fmt(one, metric),
            _fmt(two, metric),
            f"{two / one:.2f}×" if one else "—",
        )
    return table


def memory_table(summary: dict[str, Any], contenders: Sequence[Contender]) -> Table:
    table = Table(title="Memory: RSS summed over all processes of the server", title_justify="left")
    for name in ("server", "idle (after warm-up)", "peak under load"):
        table.add_column(name, justify="left" if name == "server" else "right")
    for c in contenders:
        mem = summary["memory"].get(c.key)
        if mem:
            table.add_row(
                c.label, f"{mem['idle_bytes'] / MB:.1f} MB", f"{mem['peak_load_bytes'] / MB:.1f} MB"
            )
    return table


def print_report(
    console: Console, summary: dict[str, Any], contenders: Sequence[Contender], title: str
) -> None:
    console.print()
    console.print(hits_table(summary, contenders, title))
    scaling = scaling_table(summary)
    if scaling is not None:
        console.print(scaling)
    console.print(memory_table(summary, contenders))
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def build_summary(
    samples: dict[str, dict[str, list[WrkResult]]],
    contenders: Sequence[Contender],
    memory: dict[str, dict[str, int]],
    warnings: list[str],
) -> dict[str, Any]:
    """Medians per contender and size, the Verge/nginx comparisons, memory and warnings."""
    nbytes = {s.key: s.nbytes for s in SIZES}
    medians = {
        key: {size: summarize_runs(runs, nbytes[size]) for size, runs in per_size.items() if runs}
        for key, per_size in samples.items()
    }
    comparisons = {
        size.key: {metric: compare(medians, contenders, size.key, metric) for metric in metrics}
        for size in SIZES
        for metrics in [(HEADLINE[size.key], "p99_ms")]
    }
    return {
        "medians": medians,
        "comparisons": comparisons,
        "memory": memory,
        "warnings": warnings,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
