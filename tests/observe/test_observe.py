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
