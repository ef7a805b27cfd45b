"""Metrics merge/exposition and the JSON access log."""

from __future__ import annotations

import json

from verge.observe.accesslog import AccessLog
from verge.observe.metrics import EdgeMetrics, merge, render


def test_worker_snapshots_merge_and_render_as_prometheus():
    a, b = EdgeMetrics(), EdgeMetrics()
    a.count("hit", 200, 100)
    b.count("hit", 200, 50)
    b.count("miss", 200, 10)
    a.origin_latency(0.004)
    text = render(merge([a.snapshot(), b.snapshot()]), {"cache_disk_bytes": 123}).decode()
    assert 'verge_requests_total{cache="hit",status="200"} 2.0' in text
    assert "verge_cache_hits_total 2.0" in text
    assert "verge_cache_misses_total 1.0" in text
    assert "verge_bytes_sent_total 160.0" in text
    assert 'verge_origin_latency_seconds_bucket{le="0.005"} 1.0' in text
    assert "verge_cache_disk_bytes 123.0" in text


def test_access_log_lines_are_json_even_with_hostile_urls(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write("127.0.0.1", "GET", "h", '/a"b\\c\x01?q=<x>', 200, 5, "hit", 0.0012)
    log.close()
    line = json.loads(path.read_text().strip())
    assert line["uri"] == '/a"b\\c\x01?q=<x>'
    assert line["status"] == 200 and line["cache"] == "hit" and line["bytes"] == 5


def test_request_records_feed_metrics_and_log_in_batches(tmp_path):
    from verge.observe.records import RequestRecords

    path = tmp_path / "access.log"
    metrics, log = EdgeMetrics(), AccessLog(str(path))
    records = RequestRecords(metrics, log)
    ts = 1795572862.1504
    records.add((ts, 0.0012345, "10.0.0.1", "GET", "h", "/a", b"200", 100, "hit", "shop"))
    records.add((ts + 0.0006, 0.02, "10.0.0.1", "GET", "h", "/a", b"200", 100, "hit", "shop"))
    records.add((ts + 1, 0.5, "10.0.0.2", "POST", "h", "/b", 502, 7, "miss", "shop"))
    assert metrics.snapshot()["bytes_sent"] == 0  # nothing counted before the drain
    records.flush()
    snap = metrics.snapshot()
    assert sorted(snap["requests"]) == [["hit", 200, 2], ["miss", 502, 1]]
    assert snap["bytes_sent"] == 207
    assert snap["services"]["shop"][:3] == [3, 2, 207]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["ts"] for line in lines] == [1795572862.15, 1795572862.151, 1795572863.15]
    assert [line["ms"] for line in lines] == [1.23, 20.0, 500.0]
    assert [line["status"] for line in lines] == [200, 200, 502]
    assert lines[2]["method"] == "POST" and lines[2]["uri"] == "/b" and lines[2]["bytes"] == 7
    assert records.pending == []
