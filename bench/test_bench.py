"""Tests for the pure parts of the benchmark harness: wrk parsing and the report arithmetic.

Run with `.venv/bin/pytest bench/test_bench.py` (bench/ is not a package and not under
tests/, so the default test run does not collect it). Starting real servers is what
`bench/run.py --only nginx --quick` is for.
"""

from __future__ import annotations

import pytest
from loadgen import WrkError, WrkResult, parse_wrk, wrk_command
from report import SIZES, Contender, build_summary, compare, summarize_runs
from run import round_order

CLEAN = """Running 5s test @ http://127.0.0.1:8080/bench/1k.bin
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.61ms  245.30us   9.63ms   93.51%
    Req/Sec    31.23k     1.02k   32.47k    82.00%
  Latency Distribution
     50%    1.57ms
     75%    1.64ms
     90%    1.74ms
     99%  850.00us
  155402 requests in 5.00s, 186.95MB read
Requests/sec:  31074.91
Transfer/sec:     37.38MB
"""

WITH_ERRORS = """Running 2s test @ http://127.0.0.1:8080/x
  1 threads and 4 connections
  Latency Distribution
     50%    1.37ms
     75%    2.96ms
     90%    5.24ms
     99%    1.20s
  2125 requests in 1.00m, 1.05GB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   2120.67
Transfer/sec:      1.05GB
"""


def test_parse_clean_report_converts_units() -> None:
    result = parse_wrk(CLEAN)
    assert result.requests_per_s == pytest.approx(31074.91)
    assert result.p50_ms == pytest.approx(1.57)
    assert result.p99_ms == pytest.approx(0.85)
    assert result.requests == 155402
    assert result.duration_s == pytest.approx(5.0)
    assert result.transfer_bytes_per_s == pytest.approx(37.38 * 1024**2)
    assert result.errors == 0


def test_parse_counts_socket_errors_and_non_2xx() -> None:
    result = parse_wrk(WITH_ERRORS)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.duration_s == pytest.approx(60.0)
    assert (result.socket_errors, result.non_2xx, result.errors) == (6, 7, 13)
    assert result.transfer_bytes_per_s == pytest.approx(1.05 * 1024**3)


def test_parse_without_latency_distribution_fails() -> None:
    without = "\n".join(line for line in CLEAN.splitlines() if "%" not in line)
    with pytest.raises(WrkError):
        parse_wrk(without)


def test_wrk_command_pins_and_never_has_fewer_connections_than_threads() -> None:
    argv = wrk_command("http://h/x", duration_s=2.4, connections=1, threads=2, cpus="1")
    assert argv[:3] == ["taskset", "-c", "1"]
    assert "-c2" in argv and "-t2" in argv and "-d2s" in argv and "--latency" in argv
    assert wrk_command("u", duration_s=5, connections=50, threads=1, cpus=None)[0] == "wrk"


def _result(rps: float, p99: float, errors: int = 0) -> WrkResult:
    return WrkResult(rps, 1.0, p99, int(rps), 1.0, rps * 1024, 0, errors)


def test_summarize_takes_medians_and_mb_from_body_size() -> None:
    stats = summarize_runs([_result(100, 3.0), _result(300, 1.0), _result(200, 2.0, 1)], 10**6)
    assert stats["requests_per_s"] == 200
    assert stats["p99_ms"] == 2.0
    assert stats["mb_per_s"] == pytest.approx(200.0)
    assert stats["spread"] == pytest.approx(1.0)
    assert stats["errors"] == 1


CONTENDERS = [
    Contender("nginx-sendfile", "on", "nginx", 1, True),
    Contender("nginx-nosendfile", "off", "nginx", 1, True),
    Contender("verge", "Verge", "verge", 1, True),
]


def _medians(on: float, off: float, verge: float | None) -> dict:
    medians = {
        "nginx-sendfile": {"1k": {"requests_per_s": on, "p99_ms": on}},
        "nginx-nosendfile": {"1k": {"requests_per_s": off, "p99_ms": off}},
    }
    if verge is not None:
        medians["verge"] = {"1k": {"requests_per_s": verge, "p99_ms": verge}}
    return medians


def test_compare_throughput_uses_the_faster_nginx_and_checks_target() -> None:
    cmp = compare(_medians(100.0, 80.0, 85.0), CONTENDERS, "1k", "requests_per_s")
    assert cmp["nginx_best_config"] == "nginx-sendfile"
    assert cmp["ratio"] == pytest.approx(0.85)
    assert cmp["target"] == 0.8 and cmp["meets_target"] is True


def test_compare_latency_uses_the_lower_nginx_and_has_no_target() -> None:
    cmp = compare(_medians(4.0, 2.0, 3.0), CONTENDERS, "1k", "p99_ms")
    assert cmp["nginx_best_config"] == "nginx-nosendfile"
    assert cmp["ratio"] == pytest.approx(1.5)
    assert cmp["target"] is None and cmp["meets_target"] is None


def test_compare_without_verge_has_no_ratio() -> None:
    cmp = compare(_medians(100.0, 80.0, None), CONTENDERS, "1k", "requests_per_s")
    assert cmp["ratio"] is None and cmp["meets_target"] is None
    assert cmp["nginx_best"] == 100.0


def test_build_summary_covers_every_size() -> None:
    samples = {"nginx-sendfile": {s.key: [_result(10, 1.0)] for s in SIZES}}
    summary = build_summary(samples, CONTENDERS[:1], {}, [])
    assert set(summary["comparisons"]) == {s.key for s in SIZES}
    assert summary["comparisons"]["10m"]["mb_per_s"]["nginx_best"] == pytest.approx(104.8576)


def test_round_order_rotates_so_each_contender_leads_once() -> None:
    contenders = ["a", "b", "c"]
    firsts = [round_order(contenders, r)[0] for r in range(3)]  # type: ignore[arg-type]
    assert firsts == ["a", "b", "c"]
    assert sorted(round_order(contenders, 4)) == contenders  # type: ignore[arg-type]
