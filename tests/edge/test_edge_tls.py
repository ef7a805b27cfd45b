"""The edge over TLS: SNI certificates from config, HTTP/1.1 and HTTP/2 by ALPN, HSTS, redirects."""

from __future__ import annotations

import subprocess

import pytest

from verge.certs import dev_certificates

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tls_edge(edge_factory, origin, tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test", "blog.test"])
    shop, blog = certs.hosts["shop.test"], certs.hosts["blog.test"]
    origin.route("/page", headers=[("Cache-Control", "max-age=60")], body=b"secure page")
    config = f"""
tls:
  certificates:
    - {{cert: "{shop.cert_file}", key: "{shop.key_file}", hosts: [shop.test]}}
    - {{cert: "{blog.cert_file}", key: "{blog.key_file}", hosts: [blog.test]}}
services:
  - name: shop
    hosts: [shop.test]
    origins: ["{origin.url}"]
    https_redirect: true
    hsts: {{max_age: 1d, include_subdomains: true}}
  - name: blog
    hosts: [blog.test]
    origins: ["{origin.url}"]
"""
    edge = edge_factory(config=config, extra_args=("--https", "127.0.0.1:0"))
    edge.ca = certs.ca.cert_file
    return edge


def curl(edge, host: str, path: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "-D", "-", "--cacert", edge.ca, "--resolve",
         f"{host}:{edge.https_port}:127.0.0.1", *extra, f"https://{host}:{edge.https_port}{path}"],
        capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_https_hit_after_miss_with_hsts(tls_edge, origin, version):
    first = curl(tls_edge, "shop.test", "/page", version)
    second = curl(tls_edge, "shop.test", "/page", version)
    assert first.returncode == 0, first.stderr
    assert second.stdout.endswith("secure page")
    proto = "HTTP/2" if version == "--http2" else "HTTP/1.1"
    assert second.stdout.startswith(proto + " 200")
    lower = second.stdout.lower()
    assert "cache-status: verge; hit" in lower
    assert "strict-transport-security: max-age=86400; includesubdomains" in lower
    assert origin.hits("/page") == 1


def test_sni_picks_each_services_certificate(tls_edge):
    for host in ("shop.test", "blog.test"):
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_edge.https_port}",
             "-servername", host, "-CAfile", tls_edge.ca],
            input="", capture_output=True, text=True, timeout=20)
        assert f"CN = {host}" in out.stdout or f"CN={host}" in out.stdout
        assert "Verify return code: 0 (ok)" in out.stdout


def test_old_tls_versions_refused(tls_edge):
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{tls_edge.https_port}",
                          "-servername", "shop.test", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
                         input="", capture_output=True, text=True, timeout=20)
    assert "Cipher is (NONE)" in out.stdout or out.returncode != 0


def test_plain_http_redirects_to_https_and_no_hsts_over_http(tls_edge):
    import httpx

    r = httpx.get(f"{tls_edge.url}/page?x=1", headers={"Host": "shop.test"})
    assert r.status_code == 308
    assert r.headers["location"] == f"https://shop.test:{tls_edge.https_port}/page?x=1"
    plain = httpx.get(f"{tls_edge.url}/page", headers={"Host": "blog.test"})
    assert plain.status_code == 200 and "strict-transport-security" not in plain.headers


def test_plain_http_on_the_tls_port_is_closed_and_edge_keeps_serving(tls_edge):
    import socket

    with socket.create_connection(("127.0.0.1", tls_edge.https_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"secure page" not in data
    assert curl(tls_edge, "shop.test", "/page").stdout.endswith("secure page")


async def test_http3_on_the_same_port_advertised_with_alt_svc(tls_edge, origin):
    from aioquic.asyncio import connect
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    from tests.http.test_h3server import H3Client

    alt_svc = curl(tls_edge, "shop.test", "/page").stdout.lower()
    assert f'alt-svc: h3=":{tls_edge.https_port}"' in alt_svc
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="shop.test")
    config.load_verify_locations(tls_edge.ca)
    async with connect("127.0.0.1", tls_edge.https_port, configuration=config,
                       create_protocol=H3Client) as client:
        headers, body = await client.request("GET", "/page", authority="shop.test")
    assert headers[b":status"] == b"200" and body == b"secure page"
    assert headers[b"cache-status"] == b"verge; hit"  # the same cache as HTTP/1.1 and HTTP/2
    assert origin.hits("/page") == 1


async def test_http3_picks_each_services_certificate_and_resumes_on_any_worker(
        edge_factory, origin, tmp_path):
    import asyncio

    from aioquic.asyncio import connect
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration

    from tests.http.test_h3server import H3Client

    certs = dev_certificates(tmp_path / "certs", hosts=["shop.test", "blog.test"])
    shop, blog = certs.hosts["shop.test"], certs.hosts["blog.test"]
    origin.route("/page", headers=[("Cache-Control", "max-age=60")], body=b"page")
    edge = edge_factory(config=f"""
tls:
  certificates:
    - {{cert: "{shop.cert_file}", key: "{shop.key_file}", hosts: [shop.test]}}
    - {{cert: "{blog.cert_file}", key: "{blog.key_file}", hosts: [blog.test]}}
services:
  - {{name: shop, hosts: [shop.test, blog.test], origins: ["{origin.url}"]}}
""", workers=2, extra_args=("--https", "127.0.0.1:0"))

    async def get(host: str, ticket=None) -> tuple[bool, object]:
        """A verified HTTP/3 request for host: (resumed?, the new session ticket)."""
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host)
        config.load_verify_locations(str(certs.ca.cert_file))  # checks the name too
        config.session_ticket = ticket
        issued = asyncio.get_running_loop().create_future()
        async with connect("127.0.0.1", edge.https_port, configuration=config,
                           create_protocol=H3Client,
                           session_ticket_handler=lambda t: issued.done() or issued.set_result(t),
                           ) as client:
            headers, body = await client.request("GET", "/page", authority=host)
            assert headers[b":status"] == b"200" and body == b"page"
            return client._quic.tls.session_resumed, await asyncio.wait_for(issued, 5)

    for host in ("shop.test", "blog.test"):
        resumed, ticket = await get(host)
        assert not resumed
        for _ in range(4):  # new source ports: the kernel spreads them over both workers
            resumed, ticket = await get(host, ticket)
            assert resumed
