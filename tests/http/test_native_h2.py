"""The native HTTPS engine (`verge edge --h2-engine native`): a real edge, real clients.

curl and httpx over HTTP/2 (and curl over HTTP/1.1 on the same listener) reach the real
pipeline (miss, then hit), SNI picks each name's
certificate, targets are normalised as on HTTP/1.1, request bodies arrive intact, the
stream cap refuses stream 101, and SIGTERM lets the request in flight finish.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import h2.connection
import h2.events
import httpx
import pytest
from h2.errors import ErrorCodes
from typer.testing import CliRunner

from verge.certs import dev_certificates
from verge.http import native_h2
from verge.http.tls import CertSpec

pytestmark = pytest.mark.timeout(60)
needs_native = pytest.mark.skipif(
    not native_h2.available(),
    reason="verge.http._h2front is not built (run scripts/build-native.sh)",
)


def _digest(request) -> bytes:
    return hashlib.sha256(request.body).hexdigest().encode()


@pytest.fixture
def native_edge(edge_factory, origin, tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test", "blog.test", "127.0.0.1"])
    shop, blog, ip = (certs.hosts[h] for h in ("shop.test", "blog.test", "127.0.0.1"))
    origin.route("/page", headers=[("Cache-Control", "max-age=60")], body=b"secure page")
    origin.route("/b", headers=[("Cache-Control", "max-age=60")], body=b"bee")
    origin.route("/slow", delay=1.0, body=b"finished\n")
    origin.route("/upload", body=_digest)
    config = f"""
tls:
  certificates:
    - {{cert: "{shop.cert_file}", key: "{shop.key_file}", hosts: [shop.test]}}
    - {{cert: "{blog.cert_file}", key: "{blog.key_file}", hosts: [blog.test]}}
  default: {{cert: "{ip.cert_file}", key: "{ip.key_file}", hosts: []}}
services:
  - {{name: shop, hosts: [shop.test, blog.test, "*"], origins: ["{origin.url}"]}}
"""
    edge = edge_factory(
        config=config, extra_args=("--https", "127.0.0.1:0", "--h2-engine", "native")
    )
    edge.ca = str(certs.ca.cert_file)
    return edge


def _ca(edge) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=edge.ca)


def curl(
    edge, host: str, path: str, *extra: str, version: str = "--http2"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            version,
            "--cacert",
            edge.ca,
            "--resolve",
            f"{host}:{edge.https_port}:127.0.0.1",
            *extra,
            f"https://{host}:{edge.https_port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


@needs_native
def test_curl_http2_miss_then_hit_through_the_pipeline(native_edge, origin):
    first = curl(native_edge, "shop.test", "/page")
    second = curl(native_edge, "shop.test", "/page")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("HTTP/2 200") and first.stdout.endswith("secure page")
    assert "cache-status: verge; fwd=miss" in first.stdout.lower()
    assert second.stdout.startswith("HTTP/2 200") and second.stdout.endswith("secure page")
    assert "cache-status: verge; hit" in second.stdout.lower()
    assert origin.hits("/page") == 1


@needs_native
def test_curl_http11_miss_then_hit_on_the_same_listener(native_edge, origin):
    first = curl(native_edge, "shop.test", "/page", version="--http1.1")
    second = curl(native_edge, "shop.test", "/page", version="--http1.1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("HTTP/1.1 200 OK") and first.stdout.endswith("secure page")
    assert "cache-status: verge; fwd=miss" in first.stdout.lower()
    assert second.stdout.startswith("HTTP/1.1 200 OK") and second.stdout.endswith("secure page")
    assert "cache-status: verge; hit" in second.stdout.lower()
    assert "content-length: 11" in second.stdout.lower()
    assert origin.hits("/page") == 1


@needs_native
def test_httpx_http2_miss_then_hit(native_edge, origin):
    url = f"https://127.0.0.1:{native_edge.https_port}/page"
    with httpx.Client(http2=True, verify=_ca(native_edge), timeout=10) as client:
        miss, hit = client.get(url), client.get(url)
    assert miss.http_version == "HTTP/2" and miss.content == b"secure page"
    assert hit.content == b"secure page" and hit.headers["cache-status"] == "verge; hit"
    assert hit.headers["content-length"] == "11"
    assert origin.hits("/page") == 1


@needs_native
def test_sni_picks_each_names_certificate(native_edge):
    for host in ("shop.test", "blog.test"):
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{native_edge.https_port}",
                "-servername",
                host,
                "-CAfile",
                native_edge.ca,
                "-alpn",
                "h2",
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert f"CN = {host}" in out.stdout or f"CN={host}" in out.stdout
        assert "Verify return code: 0 (ok)" in out.stdout
        assert "ALPN protocol: h2" in out.stdout


@needs_native
def test_dot_segments_are_normalised_before_the_origin(native_edge, origin):
    out = curl(native_edge, "shop.test", "/a/../b", "--path-as-is")
    assert out.stdout.startswith("HTTP/2 200") and out.stdout.endswith("bee")
    encoded = curl(native_edge, "shop.test", "/a/%2E%2E/b", "--path-as-is")
    assert "cache-status: verge; hit" in encoded.stdout.lower()  # the same object
    assert [r.path for r in origin.requests] == ["/b"]
    bad = curl(native_edge, "shop.test", "/a%00b")  # refused as on HTTP/1.1
    assert bad.stdout.startswith("HTTP/2 400") and bad.stdout.endswith("NUL in the path\n")


@needs_native
def test_post_body_arrives_intact(native_edge, origin):
    body = os.urandom(700 * 1024)  # more than the native side queues ahead of the reader
    url = f"https://127.0.0.1:{native_edge.https_port}/upload"
    with httpx.Client(http2=True, verify=_ca(native_edge), timeout=20) as client:
        response = client.post(url, content=body)
    assert response.status_code == 200
    assert response.content == hashlib.sha256(body).hexdigest().encode()
    assert origin.requests[-1].body == body


def _tls_h2_socket(edge) -> ssl.SSLSocket:
    ctx = _ca(edge)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="shop.test")
    assert sock.selected_alpn_protocol() == "h2"
    return sock


@needs_native
def test_streams_beyond_the_cap_of_100_are_refused(native_edge):
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    request = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "shop.test"),
        (":path", "/page"),
    ]
    # 101 streams kept open (no END_STREAM), all sent before the server's SETTINGS arrive
    stream_ids = [1 + 2 * i for i in range(101)]
    for stream_id in stream_ids:
        conn.send_headers(stream_id, request, end_stream=False)
    refused, max_streams = [], None
    with _tls_h2_socket(native_edge) as sock:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while not refused and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    setting = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    max_streams = setting.new_value if setting else max_streams
                elif isinstance(event, h2.events.StreamReset):
                    refused.append((event.stream_id, event.error_code))
            sock.sendall(conn.data_to_send())
    assert max_streams == 100
    assert refused == [(stream_ids[-1], ErrorCodes.REFUSED_STREAM)]


def curl_slow(edge) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "curl",
            "-s",
            "--http2",
            "--cacert",
            edge.ca,
            "-w",
            " %{http_version}",
            f"https://127.0.0.1:{edge.https_port}/slow",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


@needs_native
def test_sigterm_lets_the_request_in_flight_finish(native_edge, origin):
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(curl_slow, native_edge)
        assert origin.wait_for_hits("/slow", 1)
        started = time.monotonic()
        os.killpg(native_edge.proc.pid, signal.SIGTERM)
        assert in_flight.result().stdout == "finished\n 2"
    native_edge.proc.wait(10)
    assert native_edge.proc.returncode == 0
    assert time.monotonic() - started < 8


@needs_native
def test_certificates_reload_and_bad_keys_are_refused(tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test"])
    shop = certs.hosts["shop.test"]
    spec = CertSpec(str(shop.cert_file), str(shop.key_file), ("Shop.Test.", "*.cdn.test"))
    entries, default = native_h2.native_cert_set([spec], None)
    assert entries[0][0] == ["shop.test", "*.cdn.test"] and default is None
    assert len(entries[0][1]) >= 1  # the chain, DER
    bad = tmp_path / "bad.key"
    bad.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    with pytest.raises(ValueError, match="no unencrypted private key"):
        native_h2.native_cert_set([CertSpec(str(shop.cert_file), str(bad), ("x.test",))], None)


def test_native_engine_not_built_names_the_build_script(monkeypatch, origin, tmp_path):
    from verge.cli import app

    monkeypatch.setattr(native_h2, "_h2front", None)
    monkeypatch.delenv("VERGE_H2_ENGINE", raising=False)
    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test"])
    shop = certs.hosts["shop.test"]
    result = CliRunner().invoke(
        app,
        [
            "edge",
            "--origin",
            origin.url,
            "--https",
            "127.0.0.1:0",
            "--h2-engine",
            "native",
            "--tls-cert",
            str(shop.cert_file),
            "--tls-key",
            str(shop.key_file),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 2
    assert "scripts/build-native.sh" in result.output
