"""SIGTERM drains: requests in flight finish (HTTP/1.1 and HTTP/2), then the edge exits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from verge.certs import dev_certificates

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def edge(edge_factory, origin, tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["127.0.0.1"])
    shop = certs.hosts["127.0.0.1"]
    origin.route("/slow", delay=1.0, body=b"finished\n")
    config = f"""
tls:
  default: {{cert: "{shop.cert_file}", key: "{shop.key_file}", hosts: [shop.test]}}
services:
  - {{name: shop, hosts: ["*"], origins: ["{origin.url}"]}}
"""
    edge = edge_factory(config=config, extra_args=("--https", "127.0.0.1:0"))
    edge.ca = certs.ca.cert_file
    return edge


def curl_h2(edge, path: str) -> subprocess.CompletedProcess:
    """curl over HTTP/2: it finishes the streams a GOAWAY lets through (httpx aborts them)."""
    return subprocess.run(["curl", "-s", "--http2", "--cacert", str(edge.ca), "-w",
                           " %{http_version}", f"https://127.0.0.1:{edge.https_port}{path}"],
                          capture_output=True, text=True, timeout=20)


def test_requests_in_flight_finish_when_the_edge_is_told_to_stop(edge, origin):
    with httpx.Client(base_url=edge.url, timeout=10) as h1, ThreadPoolExecutor(2) as pool:
        plain = pool.submit(h1.get, "/slow")
        multiplexed = pool.submit(curl_h2, edge, "/slow")
        assert origin.wait_for_hits("/slow", 2)  # both are at the origin now
        started = time.monotonic()
        os.killpg(edge.proc.pid, signal.SIGTERM)
        assert plain.result().content == b"finished\n"
        assert multiplexed.result().stdout == "finished\n 2"
    edge.proc.wait(10)
    assert edge.proc.returncode == 0
    assert time.monotonic() - started < 8
