"""Stream server metrics: live streams, publishers, viewers, ingest bitrate, ingest-to-playlist
latency — Prometheus text at ``/metrics`` on the stream server's HTTP port.

Ingest-to-playlist latency is measured per part of the first video rendition: the wall time
at which the part's first frame reached the ingest (remembered per input timestamp) to the
wall time at which the packager listed the part. ffmpeg's output timeline starts at 0 at the
first keyframe it was fed, so a part's media start time plus that keyframe's input timestamp
names the input frame.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest

PART_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
BITRATE_WINDOW = 5.0  # seconds of ingest bytes the bitrate gauge averages over
ARRIVALS_KEPT = 2000  # video frames remembered per stream (80 s at 25 fps)


class IngestClock:
    """When each video frame of one stream reached the ingest, and the bytes per second."""

    def __init__(self) -> None:
        self.arrivals: deque[tuple[int, float]] = deque(maxlen=ARRIVALS_KEPT)  # (ts ms, wall)
        self.first_keyframe_ts: int | None = None
        self.bytes_total = 0
        self._recent: deque[tuple[float, int]] = deque()

    def frame(self, timestamp_ms: int, size: int, keyframe: bool, video: bool) -> None:
        now = time.time()
        self.bytes_total += size
        self._recent.append((now, size))
        while self._recent and now - self._recent[0][0] > BITRATE_WINDOW:
            self._recent.popleft()
        if video:
            if keyframe and self.first_keyframe_ts is None:
                self.first_keyframe_ts = timestamp_ms
            self.arrivals.append((timestamp_ms, now))

    def restarted(self) -> None:
        """The transcoder restarts from the next keyframe: a new output time origin."""
        self.first_keyframe_ts = None

    def bitrate(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = max(self._recent[-1][0] - self._recent[0][0], 1e-3)
        return sum(size for _, size in self._recent) * 8 / span

    def arrival_of(self, media_seconds: float) -> float | None:
        """Wall time at which the input frame at output media time `media_seconds` arrived."""
        if self.first_keyframe_ts is None or not self.arrivals:
            return None
        wanted = self.first_keyframe_ts + round(media_seconds * 1000)
        index = bisect.bisect_right(self.arrivals, (wanted, float("inf"))) - 1
        return self.arrivals[index][1] if index >= 0 else None


class StreamMetrics:
    def __init__(self) -> None:
        self.part_latency = [0] * (len(PART_BUCKETS) + 1)
        self.part_latency_sum = 0.0
        self.requests: dict[str, int] = {}

    def part_listed(self, latency: float) -> None:
        self.part_latency[bisect.bisect_left(PART_BUCKETS, latency)] += 1
        self.part_latency_sum += latency

    def request(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1

    def render(self, server) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, server))
        return generate_latest(registry)


class _Collector:
    def __init__(self, metrics: StreamMetrics, server) -> None:
        self.metrics, self.server = metrics, server

    def collect(self):
        live = [c for c in self.server.channels.values() if c.live]
        yield _gauge("verge_stream_live", "Live streams", len(live))
        publishing = sum(1 for c in live if c.ending is None)
        yield _gauge("verge_stream_publishers", "Connected publishers", publishing)
        yield _gauge("verge_stream_flv_viewers", "HTTP-FLV viewers",
                     sum(len(c.fanout.viewers) for c in live))
        bitrate = GaugeMetricFamily("verge_stream_ingest_bitrate_bps",
                                    "Ingest bitrate over the last 5 s", labels=["stream"])
        received = CounterMetricFamily("verge_stream_ingest_bytes", "Media bytes received",
                                       labels=["stream"])
        for channel in live:
            bitrate.add_metric([channel.path], channel.clock.bitrate())
            received.add_metric([channel.path], channel.clock.bytes_total)
        yield bitrate
        yield received
        requests = CounterMetricFamily("verge_stream_requests", "HTTP requests by resource",
                                       labels=["kind"])
        for kind, count in sorted(self.metrics.requests.items()):
            requests.add_metric([kind], count)
        yield requests
        buckets, total = [], 0
        for bound, count in zip((*PART_BUCKETS, float("inf")), self.metrics.part_latency,
                                strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), total))
        yield HistogramMetricFamily(
            "verge_stream_ingest_to_playlist_seconds",
            "From a part's first frame at the ingest to the part listed in its playlist",
            buckets=buckets, sum_value=self.metrics.part_latency_sum)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
