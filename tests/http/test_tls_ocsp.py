"""OCSP stapling from a response file: stapled when asked, reloaded on change, fail safe.

The OCSP responses are made at test time with cryptography's OCSPResponseBuilder, signed by
the dev CA; ``openssl s_client -status`` asks for and prints the stapled response.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from verge.certs import DevCertificates, dev_certificates
from verge.compat.openssl import BindingError
from verge.http import tls_ocsp
from verge.http.tls import CertSpec, TlsStore, safe_server_context

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]
HOST = "ocsp.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return dev_certificates(tmp_path_factory.mktemp("certs"), hosts=[HOST, "plain.test"])


def ocsp_der(certs: DevCertificates, status: ocsp.OCSPCertStatus, hours: float = 24) -> bytes:
    leaf = x509.load_pem_x509_certificate(certs.hosts[HOST].cert_file.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(certs.ca.cert_file.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca.key_file.read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    revoked = status == ocsp.OCSPCertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=ca_cert,
            algorithm=hashes.SHA1(),
            cert_status=status,
            this_update=now - dt.timedelta(hours=1),
            next_update=now + dt.timedelta(hours=hours),
            revocation_time=now - dt.timedelta(hours=2) if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert)
    )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class TlsServer:
    """A thread that completes handshakes with the store's front context (SNI switching)."""

    def __init__(self, store: TlsStore) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = store.server_context()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve(certs: DevCertificates) -> Iterator:
    servers: list[TlsServer] = []

    def start(ocsp_file: Path | None) -> TlsServer:
        leaf = certs.hosts[HOST]
        spec = CertSpec(
            str(leaf.cert_file), str(leaf.key_file), (HOST,), str(ocsp_file) if ocsp_file else None
        )
        plain = certs.hosts["plain.test"]
        other = CertSpec(str(plain.cert_file), str(plain.key_file), ("plain.test",))
        server = TlsServer(TlsStore([spec, other]))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def s_client(port: int, host: str = HOST, *extra: str) -> str:
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            host,
            "-status",
            *extra,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_stapled_response_is_sent(serve, certs, tmp_path, version) -> None:
    response = tmp_path / "ocsp.der"
    write(response, ocsp_der(certs, ocsp.OCSPCertStatus.GOOD))
    server = serve(response)
    out = s_client(server.port, HOST, version)
    assert "OCSP Response Status: successful" in out
    assert "Cert Status: good" in out
    # another certificate without a response file staples nothing
    assert "OCSP response: no response sent" in s_client(server.port, "plain.test", version)


def test_response_file_change_is_picked_up(serve, certs, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tls_ocsp, "RECHECK_SECONDS", 0.0)
    response = tmp_path / "ocsp.der"
    write(response, ocsp_der(certs, ocsp.OCSPCertStatus.GOOD))
    server = serve(response)
    assert "Cert Status: good" in s_client(server.port)
    write(response, ocsp_der(certs, ocsp.OCSPCertStatus.REVOKED))
    assert "Cert Status: revoked" in s_client(server.port)


def test_missing_bad_or_stale_response_is_not_stapled(
    serve, certs, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(tls_ocsp, "RECHECK_SECONDS", 0.0)
    response = tmp_path / "ocsp.der"
    server = serve(response)  # no file yet
    with caplog.at_level(logging.WARNING, logger="verge.tls"):
        assert "OCSP response: no response sent" in s_client(server.port)
        assert "OCSP response: no response sent" in s_client(server.port)
        write(response, b"not DER at all")
        out = s_client(server.port)
        assert "OCSP response: no response sent" in out and "Verify return code" in out
        write(response, ocsp_der(certs, ocsp.OCSPCertStatus.GOOD, hours=-0.5))  # past nextUpdate
        assert "OCSP response: no response sent" in s_client(server.port)
        write(response, ocsp_der(certs, ocsp.OCSPCertStatus.GOOD))
        assert "OCSP Response Status: successful" in s_client(server.port)
    problems = [r.getMessage() for r in caplog.records]
    assert sum("cannot read OCSP response" in m for m in problems) == 1  # logged once
    assert any("not stapled" in m for m in problems)
    assert any("nextUpdate" in m for m in problems)


def test_untrusted_binding_logs_once_and_staples_nothing(
    certs, tmp_path, monkeypatch, caplog
) -> None:
    def mismatch(self, ctx):
        raise BindingError("unexpected PySSLContext layout")

    monkeypatch.setattr(tls_ocsp._OpenSsl, "ctx_pointer", mismatch)
    monkeypatch.setattr(tls_ocsp._BINDING, "warned", False)
    leaf = certs.hosts[HOST]
    with caplog.at_level(logging.WARNING, logger="verge.tls"):
        for _ in range(2):
            ctx = safe_server_context(str(leaf.cert_file), str(leaf.key_file))
            assert tls_ocsp.install_ocsp_stapling(ctx, tmp_path / "ocsp.der") is None
    warnings = [r for r in caplog.records if "OCSP stapling unavailable" in r.getMessage()]
    assert len(warnings) == 1


def test_edge_config_accepts_ocsp_response(tmp_path) -> None:
    from verge.config import config_from_data

    config = config_from_data(
        {
            "tls": {
                "certificates": [
                    {
                        "cert": "a.pem",
                        "key": "a-key.pem",
                        "hosts": ["a.test"],
                        "ocsp_response": "a.ocsp",
                    }
                ]
            }
        }
    )
    assert config.tls.certificates[0].ocsp_response == "a.ocsp"
    with pytest.raises(Exception, match="either cert"):
        config_from_data({"tls": {"certificates": [{"cert": "a.pem", "hosts": ["a.test"]}]}})
