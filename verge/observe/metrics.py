"""Edge metrics: plain counters on the hot path, Prometheus text on the admin port.

Why not prometheus_client's Counter objects in the workers: each ``inc()`` takes a lock and
its multiprocess mode writes mmap files, which costs more than the rest of a cache hit.
Workers count in plain ints, a batch of request records at a time (verge.observe.records);
the supervisor collects a snapshot from each worker over its control channel, sums them, and
renders them with prometheus_client's exposition code.
"""

from __future__ import annotations

import bisect
import operator
from collections import Counter
from collections.abc import Iterable

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest

_COUNTED_FIELDS = operator.itemgetter(6, 7, 8, 9)  # of a record: status, sent, result, service
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    """Counters of one worker process."""

    __slots__ = ("requests", "bytes_sent", "origin_requests", "origin_errors", "_latency",
                 "_latency_sum", "services")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (cache result, status) -> count
        # per service: requests, hits, bytes, 2xx, 3xx, 4xx, 5xx, origin ms sum, origin count
        self.services: dict[str, list] = {}
        self.bytes_sent = 0
        self.origin_requests = 0
        self.origin_errors = 0
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    def count(self, result: str, status: int, sent: int, service: str = "") -> None:
        self.count_records(((0.0, 0.0, "", "", "", "", status, sent, result, service),))

    def count_records(self, records) -> None:
        """:meth:`count` for a batch of request records (layout: verge.observe.records).

        The batch is first tallied by (status, bytes, result, service) in C (Counter over
        itemgetter): a batch of hits to a few objects has a few distinct keys.
        """
        requests, services = self.requests, self.services
        for (status, sent, result, service), n in Counter(map(_COUNTED_FIELDS, records)).items():
            status = int(status)
            key = (result, status)
            requests[key] = requests.get(key, 0) + n
            self.bytes_sent += sent * n
            per = services.get(service)
            if per is None:
                per = services[service] = [0, 0, 0, 0, 0, 0, 0, 0.0, 0]
            per[0] += n
            if result == "hit":
                per[1] += n
            per[2] += sent * n
            klass = status // 100
            if 2 <= klass <= 5:
                per[klass + 1] += n

    def origin_latency(self, seconds: float, service: str = "") -> None:
        self.origin_requests += 1
        self._latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds
        per = self.services.get(service)
        if per is None:
            per = self.services[service] = [0, 0, 0, 0, 0, 0, 0, 0.0, 0]
        per[7] += seconds * 1000
        per[8] += 1

    def snapshot(self) -> dict:
        return {
            "requests": [[r, s, n] for (r, s), n in self.requests.items()],
            "bytes_sent": self.bytes_sent,
            "origin_requests": self.origin_requests,
            "origin_errors": self.origin_errors,
            "latency": list(self._latency),
            "latency_sum": self._latency_sum,
            "services": {name: list(values) for name, values in self.services.items()},
        }


def merge(snapshots: Iterable[dict]) -> dict:
    """Sum worker snapshots into one."""
    snapshots = list(snapshots)
    total = EdgeMetrics().snapshot()
    requests: dict[tuple[str, int], int] = {}
    for snap in snapshots:
        for result, status, n in snap["requests"]:
            requests[(result, status)] = requests.get((result, status), 0) + n
        for name in ("bytes_sent", "origin_requests", "origin_errors", "latency_sum"):
            total[name] += snap[name]
        total["latency"] = [a + b for a, b in zip(total["latency"], snap["latency"], strict=True)]
    total["requests"] = [[r, s, n] for (r, s), n in sorted(requests.items())]
    total["functions"] = _merge_functions(snap.get("functions") or {} for snap in snapshots)
    total["protection"] = _merge_protection(snap.get("protection") or {} for snap in snapshots)
    return total


def _merge_protection(per_worker: Iterable[dict]) -> dict[str, dict]:
    """Protection counters (verge.edge.protect.ServiceProtection.stats) summed over workers."""
    merged: dict[str, dict] = {}
    for services in per_worker:
        for service, stats in services.items():
            into = merged.setdefault(service, {"rules": {}, "denied": 0, "waf": {}})
            into["denied"] += stats.get("denied", 0)
            for rule, counts in stats.get("rules", {}).items():
                rule_into = into["rules"].setdefault(rule, {})
                for outcome, n in counts.items():
                    rule_into[outcome] = rule_into.get(outcome, 0) + n
            for outcome, n in stats.get("waf", {}).items():
                into["waf"][outcome] = into["waf"].get(outcome, 0) + n
    return merged


def _merge_functions(per_worker: Iterable[dict]) -> dict[str, dict]:
    """Edge function counters summed over workers (peak memory: the largest), in total and
    per version (``versions``: module sha256 prefix -> the same counters)."""
    merged: dict[str, dict] = {}
    for functions in per_worker:
        for name, stats in functions.items():
            into = merged.setdefault(name, {**_no_counts(), "versions": {}})
            _add_counts(into, stats)
            for version, counts in (stats.get("versions") or {}).items():
                _add_counts(into["versions"].setdefault(version, _no_counts()), counts)
    return merged


def _no_counts() -> dict:
    return {"invocations": 0, "errors": 0, "cpu_ms": 0.0, "peak_memory": 0}


def _add_counts(into: dict, stats: dict) -> None:
    for field in ("invocations", "errors", "cpu_ms"):
        into[field] += stats.get(field, 0)
    into["peak_memory"] = max(into["peak_memory"], stats.get("peak_memory", 0))


class _SnapshotCollector:
    def __init__(self, snap: dict, gauges: dict[str, float]) -> None:
        self.snap = snap
        self.gauges = gauges

    def collect(self):
        snap = self.snap
        requests = CounterMetricFamily(
            "verge_requests", "Client requests by cache result and status",
            labels=["cache", "status"],
        )
        results: dict[str, int] = {}
        for result, status, n in snap["requests"]:
            requests.add_metric([result, str(status)], n)
            results[result] = results.get(result, 0) + n
        yield requests
        hits = sum(n for r, n in results.items() if r.startswith("hit"))
        yield CounterMetricFamily("verge_cache_hits", "Requests answered from cache", value=hits)
        misses = sum(n for r, n in results.items() if r in ("miss", "collapsed", "stale"))
        yield CounterMetricFamily("verge_cache_misses", "Requests that went to the origin for a cacheable object", value=misses)
        yield CounterMetricFamily("verge_bytes_sent", "Response bytes sent to clients", value=snap["bytes_sent"])
        yield CounterMetricFamily("verge_origin_errors", "Origin requests that failed", value=snap["origin_errors"])
        buckets, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), snap["latency"], strict=True):
            running += n
            buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
        yield HistogramMetricFamily(
            "verge_origin_latency_seconds", "Time to the origin's response head",
            buckets=buckets, sum_value=snap["latency_sum"],
        )
        for name, value in self.gauges.items():
            yield GaugeMetricFamily(f"verge_{name}", name.replace("_", " "), value=value)
        yield from _function_families(snap.get("functions") or {})
        yield from _protection_families(snap.get("protection") or {})


def _function_families(functions: dict[str, dict]):
    """Per edge function: invocations, errors (limits, crashes), CPU time, peak memory, over
    all its versions (a redeploy does not reset them); and runs and errors per version
    (``version``: the module's sha256, 12 hex digits; ``unloaded``: it failed to load)."""
    families = {
        "invocations": CounterMetricFamily("verge_function_invocations", "Edge function runs",
                                           labels=["function"]),
        "errors": CounterMetricFamily("verge_function_errors",
                                      "Edge function runs that failed or broke a limit",
                                      labels=["function"]),
        "cpu_ms": CounterMetricFamily("verge_function_cpu_seconds",
                                      "CPU time used by edge functions", labels=["function"]),
        "peak_memory": GaugeMetricFamily("verge_function_peak_memory_bytes",
                                         "Largest linear memory a run used", labels=["function"]),
    }
    per_version = {
        "invocations": CounterMetricFamily("verge_function_version_invocations",
                                           "Edge function runs per module version",
                                           labels=["function", "version"]),
        "errors": CounterMetricFamily("verge_function_version_errors",
                                      "Edge function runs per module version that failed",
                                      labels=["function", "version"]),
    }
    for name, stats in sorted(functions.items()):
        for field, family in families.items():
            value = stats.get(field, 0)
            family.add_metric([name], value / 1000 if field == "cpu_ms" else value)
        for version, counts in sorted((stats.get("versions") or {}).items()):
            for field, family in per_version.items():
                family.add_metric([name, version], counts.get(field, 0))
    yield from families.values()
    yield from per_version.values()


def _protection_families(services: dict[str, dict]):
    """Per service: rate-limit outcomes per rule, deny-list refusals, WAF outcomes."""
    limits = CounterMetricFamily(
        "verge_rate_limit_requests", "Requests a rate-limit rule counted, by outcome "
        "(allowed, limited: over the rate, blocked: refused or dropped)",
        labels=["service", "rule", "outcome"])
    denied = CounterMetricFamily("verge_deny_list_requests", "Requests refused by a deny list",
                                 labels=["service"])
    waf = CounterMetricFamily("verge_waf_requests", "Requests the WAF inspected, by outcome "
                              "(inspected, blocked, detected, timeouts, errors)",
                              labels=["service", "outcome"])
    for service, stats in sorted(services.items()):
        for rule, counts in sorted(stats.get("rules", {}).items()):
            for outcome, n in sorted(counts.items()):
                limits.add_metric([service, rule, outcome], n)
        denied.add_metric([service], stats.get("denied", 0))
        for outcome, n in sorted(stats.get("waf", {}).items()):
            waf.add_metric([service, outcome], n)
    yield from (limits, denied, waf)


def render(snapshot: dict, gauges: dict[str, float]) -> bytes:
    """Prometheus text exposition of a merged snapshot plus gauges (cache sizes...)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, gauges))
    return generate_latest(registry)
