"""HTTPS origins behind the edge: verification on by default, a pinned CA, SNI, verify off.

The origin is a small threaded HTTPS server with a certificate from the dev CA
(verge.certs); it records the SNI of every handshake. The dev CA is in no system store, so
an origin that is not pinned to it must fail verification with a clear 502.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from verge.certs import dev_certificates, issue_cert
from verge.config import OriginSpec

pytestmark = pytest.mark.timeout(60)

ORIGIN_NAME = "origin.test"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"tls origin host={self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class TlsOrigin:
    """An HTTPS origin on 127.0.0.1 that remembers the server name of each handshake."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.server_names: list[str | None] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        ctx.sni_callback = lambda _obj, name, _ctx: self.server_names.append(name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pki")
    ca = dev_certificates(out, hosts=[]).ca
    leaf = issue_cert(ca, [ORIGIN_NAME, "localhost"], out / "origin.pem", out / "origin-key.pem")
    return ca, leaf


@pytest.fixture
def tls_origin(pki) -> Iterator[TlsOrigin]:
    _, leaf = pki
    origin = TlsOrigin(leaf.cert_file, leaf.key_file)
    yield origin
    origin.stop()


def service(name: str, origin: str) -> str:
    return f"""  - name: {name}
    hosts: [{name}.test]
    origins:
      - {origin}
"""


@pytest.fixture
def edge(edge_factory, tls_origin: TlsOrigin, pki):
    ca, _ = pki
    port = tls_origin.port
    services = [
        service("pinned", f'{{url: "https://localhost:{port}", tls_ca: "{ca.cert_file}"}}'),
        service(
            "byhost",
            f'{{url: "https://127.0.0.1:{port}", tls_ca: "{ca.cert_file}", '
            f"host_header: {ORIGIN_NAME}}}",
        ),
        service(
            "byname",
            f'{{url: "https://127.0.0.1:{port}", tls_ca: "{ca.cert_file}", '
            f"tls_server_name: {ORIGIN_NAME}}}",
        ),
        service(
            "wrongname",
            f'{{url: "https://127.0.0.1:{port}", tls_ca: "{ca.cert_file}", '
            "tls_server_name: other.test}",
        ),
        service("system", f'"https://localhost:{port}"'),
        service("noverify", f'{{url: "https://localhost:{port}", tls_verify: false}}'),
        service("noca", f'{{url: "https://localhost:{port}", tls_ca: "/nonexistent/ca.pem"}}'),
    ]
    return edge_factory(config="services:\n" + "".join(services))


def get(edge, host: str, path: str = "/obj") -> httpx.Response:
    with edge.client() as client:
        return client.get(path, headers={"Host": host})


def test_pinned_ca_works_and_sni_is_the_url_host(edge, tls_origin: TlsOrigin) -> None:
    first = get(edge, "pinned.test")
    assert first.status_code == 200, first.text
    assert first.text == "tls origin host=pinned.test\n"
    assert tls_origin.server_names == ["localhost"]
    second = get(edge, "pinned.test")
    assert "hit" in second.headers["cache-status"]


def test_sni_is_the_host_header_when_set(edge, tls_origin: TlsOrigin) -> None:
    response = get(edge, "byhost.test")
    assert response.status_code == 200, response.text
    assert response.text == f"tls origin host={ORIGIN_NAME}\n"
    assert tls_origin.server_names == [ORIGIN_NAME]


def test_tls_server_name_sets_sni_and_keeps_client_host(edge, tls_origin: TlsOrigin) -> None:
    response = get(edge, "byname.test")
    assert response.status_code == 200, response.text
    assert response.text == "tls origin host=byname.test\n"
    assert tls_origin.server_names == [ORIGIN_NAME]


def test_name_not_in_certificate_is_a_clear_502(edge) -> None:
    response = get(edge, "wrongname.test")
    assert response.status_code == 502
    assert "certificate verification failed" in response.text
    assert "other.test" in response.text or "mismatch" in response.text


def test_unknown_ca_is_a_clear_502(edge, tls_origin: TlsOrigin) -> None:
    """Verification is on by default: the dev CA is not in the system store."""
    response = get(edge, "system.test")
    assert response.status_code == 502
    assert "certificate verification failed" in response.text
    assert "local issuer" in response.text, response.text
    assert tls_origin.server_names == ["localhost"]  # it got as far as the handshake


def test_verify_off_accepts_any_certificate(edge) -> None:
    response = get(edge, "noverify.test")
    assert response.status_code == 200, response.text


def test_missing_ca_file_is_a_clear_502(edge) -> None:
    response = get(edge, "noca.test")
    assert response.status_code == 502
    assert "cannot load tls_ca '/nonexistent/ca.pem'" in response.text


def test_tls_options_only_for_https_origins() -> None:
    with pytest.raises(ValidationError, match="https:// origins only"):
        OriginSpec.model_validate({"url": "http://example.com", "tls_verify": False})
    with pytest.raises(ValidationError, match="host name"):
        OriginSpec.model_validate({"url": "https://a.example", "tls_server_name": "a b"})


@pytest.mark.parametrize(
    ("spec", "server_name"),
    [
        ({"url": "https://10.0.0.1"}, None),
        ({"url": "https://10.0.0.1", "host_header": "www.example.com:8443"}, "www.example.com"),
        (
            {"url": "https://10.0.0.1", "host_header": "a.example", "tls_server_name": "b.example"},
            "b.example",
        ),
    ],
)
def test_sni_choice(spec: dict, server_name: str | None) -> None:
    options = OriginSpec.model_validate(spec).tls_options()
    assert options == {"tls_ca": None, "tls_verify": True, "tls_server_name": server_name}
