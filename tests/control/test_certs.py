"""Certificates through the control plane: API, validation, tenant isolation, sealing, fleet.

The API tests run on SQLite and PostgreSQL (the ``api`` fixture); the last test starts a real
control plane and edge and checks by SNI handshakes that a certificate added and rotated
through the API is served without a restart.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cli import run_verge
from tests.control.conftest import Api
from verge.certs import CertFiles, ensure_ca
from verge.control.certificates import KeySealer, sni_assignment
from verge.control.models import TlsCertificate

V1 = "/api/v1"


# ---- certificates made at test time ---------------------------------------------------------


class Ca:
    def __init__(self, files: CertFiles) -> None:
        self.files = files
        self.cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        self.key = serialization.load_pem_private_key(files.key_file.read_bytes(), None)

    def issue(
        self,
        *hosts: str,
        days: float = 90,
        starts: float = -1,
        key: ec.EllipticCurvePrivateKey | None = None,
        cn: str = "leaf",
    ) -> tuple[str, str]:
        """(chain PEM, key PEM) for ``hosts`` (no SAN when none), valid from ``starts`` days."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=starts))
            .not_valid_after(now + dt.timedelta(days=days))
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return Ca(ensure_ca(tmp_path_factory.mktemp("ca")))


@pytest.fixture(autouse=True)
def _secret_for_postgres(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL stores need VERGE_SECRET; SQLite ones use the key file next to the DB."""
    if "db_url" in request.fixturenames and request.getfixturevalue("db_url").startswith(
        "postgres"
    ):
        monkeypatch.setenv("VERGE_SECRET", "test-secret")
    else:
        monkeypatch.delenv("VERGE_SECRET", raising=False)


def add(api: Api, name: str, pems: tuple[str, str], token: str | None = None, **extra):
    body = {"name": name, "cert_pem": pems[0], "key_pem": pems[1], **extra}
    return api.post(f"{V1}/certificates", token, json=body)


def _no_key_anywhere(text: str, key_pem: str) -> None:
    body = "".join(key_pem.strip().splitlines()[1:-1])
    assert "PRIVATE KEY" not in text
    assert body[:40] not in text.replace("\\n", "")


# ---- the API ----------------------------------------------------------------------------------


def test_add_list_get_rotate_delete(api: Api, ca: Ca) -> None:
    pems = ca.issue("shop.test", "www.shop.test")
    before = api.store.config_version()
    created = add(api, "shop", pems)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "shop" and body["hosts"] == ["shop.test", "www.shop.test"]
    assert len(body["fingerprint_sha256"]) == 64 and body["not_after"].endswith("Z")
    assert "warning" not in body
    assert api.store.config_version() == before + 1

    listed = api.get(f"{V1}/certificates")
    assert listed.json()["total"] == 1 and listed.json()["items"][0]["name"] == "shop"
    got = api.get(f"{V1}/certificates/shop")
    assert got.json()["fingerprint_sha256"] == body["fingerprint_sha256"]

    new = ca.issue("shop.test")
    rotated = api.put(f"{V1}/certificates/shop", json={"cert_pem": new[0], "key_pem": new[1]})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["version"] == 2 and rotated.json()["hosts"] == ["shop.test"]
    assert rotated.json()["fingerprint_sha256"] != body["fingerprint_sha256"]

    bundle = api.store.bundle()
    [entry] = bundle["config"]["tls"]["certificates"]
    assert entry["hosts"] == ["shop.test"] and entry["key_pem"].strip() == new[1].strip()

    assert api.delete(f"{V1}/certificates/shop").status_code == 204
    assert api.get(f"{V1}/certificates/shop").status_code == 404
    assert api.store.bundle()["config"]["tls"]["certificates"] == []
    assert add(api, "shop", pems).status_code == 201
    assert add(api, "shop", pems).status_code == 409


def test_no_key_material_in_answers_audit_or_database(api: Api, ca: Ca) -> None:
    pems = ca.issue("shop.test")
    created = add(api, "shop", pems)
    rotated_pems = ca.issue("shop.test")
    api.put(
        f"{V1}/certificates/shop", json={"cert_pem": rotated_pems[0], "key_pem": rotated_pems[1]}
    )
    for text in (
        created.text,
        api.get(f"{V1}/certificates").text,
        api.get(f"{V1}/certificates/shop").text,
        api.get(f"{V1}/audit").text,
    ):
        _no_key_anywhere(text, pems[1])
        _no_key_anywhere(text, rotated_pems[1])
    actions = [e["action"] for e in api.get(f"{V1}/audit").json()["items"]]
    assert {"certificate.create", "certificate.update"} <= set(actions)
    with api.store.reading() as session:  # sealed at rest
        row = session.query(TlsCertificate).one()
        assert "PRIVATE KEY" not in row.key_sealed


def test_key_file_next_to_sqlite_database(api: Api, ca: Ca) -> None:
    if not api.store.url.startswith("sqlite"):
        pytest.skip("the key file is the SQLite default")
    assert add(api, "shop", ca.issue("shop.test")).status_code == 201
    database = Path(api.store.url.split(":///", 1)[1])
    key_file = database.with_name(database.name + ".key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("case", "status", "field", "words"),
    [
        ("garbage_cert", 400, "cert_pem", "no PEM certificate"),
        ("garbage_key", 400, "key_pem", "not a PEM private key"),
        ("other_key", 400, "key_pem", "does not belong"),
        ("expired", 400, "cert_pem", "expired"),
        ("future", 400, "cert_pem", "not valid before"),
        ("no_san", 400, "cert_pem", "subjectAltName"),
        ("wrong_order", 400, "cert_pem", "wrong chain order"),
        ("foreign_issuer", 400, "cert_pem", "did not issue"),
        ("missing_key", 422, "key_pem", "required"),
        ("bad_name", 422, "name", ""),
    ],
)
def test_validation_errors_name_the_field(
    api: Api, ca: Ca, case: str, status: int, field: str, words: str
) -> None:
    cert, key = ca.issue("shop.test")
    body = {"name": "shop", "cert_pem": cert, "key_pem": key}
    if case == "garbage_cert":
        body["cert_pem"] = "hello"
    elif case == "garbage_key":
        body["key_pem"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    elif case == "other_key":
        body["key_pem"] = ca.issue("shop.test")[1]
    elif case == "expired":
        body["cert_pem"], body["key_pem"] = ca.issue("shop.test", days=-1, starts=-10)
    elif case == "future":
        body["cert_pem"], body["key_pem"] = ca.issue("shop.test", starts=2)
    elif case == "no_san":
        body["cert_pem"], body["key_pem"] = ca.issue()
    elif case == "wrong_order":
        body["cert_pem"] = ca.files.cert_file.read_text() + cert
        body["key_pem"] = key
    elif case == "foreign_issuer":
        body["cert_pem"] = cert + ca.issue("unrelated.test")[0]
    elif case == "missing_key":
        del body["key_pem"]
    elif case == "bad_name":
        body["name"] = "Not A Slug"
    response = api.post(f"{V1}/certificates", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    _no_key_anywhere(response.text, key)


def test_chain_in_order_is_accepted(api: Api, ca: Ca) -> None:
    cert, key = ca.issue("shop.test")
    response = add(api, "shop", (cert + ca.files.cert_file.read_text(), key))
    assert response.status_code == 201, response.text


def test_expiring_soon_gets_a_warning(api: Api, ca: Ca) -> None:
    response = add(api, "soon", ca.issue("soon.test", days=5))
    assert response.status_code == 201
    assert "expires in" in response.json()["warning"]
    assert "warning" in api.get(f"{V1}/certificates/soon").json()


def test_tenant_isolation(api: Api, ca: Ca) -> None:
    acme = api.tenant("acme", zones=("acme.test",))
    other = api.tenant("other", zones=("other.test",))
    api.service("acme-site", "acme.test", "*.cdn.acme.test", token=acme)
    api.service("other-site", "other.test", token=other)

    assert add(api, "acme", ca.issue("acme.test", "img.cdn.acme.test"), acme).status_code == 201
    # another tenant's hostname, or none of one's own: refused
    stolen = add(api, "steal", ca.issue("acme.test"), other)
    assert stolen.status_code == 403 and stolen.json()["field"] == "cert_pem"
    assert "another tenant" in stolen.json()["error"]
    assert add(api, "nothing", ca.issue("nobody.test"), other).status_code == 403
    assert add(api, "x", ca.issue("other.test"), other, tenant="acme").status_code == 403
    # not visible, not replaceable, not deletable by the other tenant
    assert api.get(f"{V1}/certificates", other).json()["total"] == 0
    assert api.get(f"{V1}/certificates/acme", other).status_code == 404
    new = ca.issue("other.test")
    replaced = api.put(
        f"{V1}/certificates/acme", other, json={"cert_pem": new[0], "key_pem": new[1]}
    )
    assert replaced.status_code == 404
    assert api.delete(f"{V1}/certificates/acme", other).status_code == 404
    # the owner sees it, read-only tokens of the tenant too, and admins see everything
    assert api.get(f"{V1}/certificates", acme).json()["items"][0]["tenant"] == "acme"
    reader = api.tenant("acme", role="read_only")
    assert api.get(f"{V1}/certificates/acme", reader).status_code == 200
    assert add(api, "r", ca.issue("acme.test"), reader).status_code == 403
    assert api.get(f"{V1}/certificates").json()["total"] == 1
    # a rotation to another tenant's host is refused too
    hijack = ca.issue("other.test")
    moved = api.put(
        f"{V1}/certificates/acme", acme, json={"cert_pem": hijack[0], "key_pem": hijack[1]}
    )
    assert moved.status_code == 403
    # tenant audit shows its own certificate events only
    other_audit = api.get(f"{V1}/audit", other).json()["items"]
    assert all(e["object"] != "certificate:acme" for e in other_audit)


def test_node_bundle_only_for_node_credentials(api: Api, ca: Ca) -> None:
    pems = ca.issue("shop.test")
    add(api, "shop", pems)
    credential = api.join()
    bundle = api.get(f"{V1}/nodes/self/config", credential).json()
    [entry] = bundle["config"]["tls"]["certificates"]
    assert entry["cert_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in entry["key_pem"]
    assert api.get(f"{V1}/nodes/self/config").status_code == 403  # admin token: no


def test_sni_prefers_the_certificate_of_the_hosts_tenant() -> None:
    owners = {"shop.test": 1, "*.img.test": 2}
    certs = [
        ("a-early", 2, ["shop.test", "free.test"]),
        ("b-shop", 1, ["shop.test"]),
        ("c-img", 2, ["x.img.test"]),
        ("d-dup", 3, ["free.test"]),
    ]
    assert sni_assignment(certs, owners) == {
        "a-early": ["free.test"],
        "b-shop": ["shop.test"],
        "c-img": ["x.img.test"],
    }


def test_sealer_rotation_and_wrong_secret() -> None:
    old = KeySealer([b"old"])
    sealed = old.seal("KEY")
    assert KeySealer([b"new", b"old"]).open(sealed) == "KEY"
    with pytest.raises(ValueError, match="VERGE_SECRET"):
        KeySealer([b"new"]).open(sealed)
    assert "old" not in repr(old)


# ---- a real control plane and edge --------------------------------------------------------------


def _served_certificate(port: int, host: str, ca_file: Path) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.timeout(120)
def test_edge_serves_added_and_rotated_certificate_without_restart(tmp_path, origin, ca) -> None:
    from tests.control.test_fleet import Fleet, wait_until
    from verge.certs import dev_certificates

    own = dev_certificates(tmp_path / "own", hosts=["localhost"])  # the node's default
    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    try:
        service = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": origin.url}]}
        assert fleet.api.post("/api/v1/services", json=service).status_code == 201
        first = ca.issue("shop.test", cn="shop v1")
        r = fleet.api.post(
            "/api/v1/certificates", json={"name": "shop", "cert_pem": first[0], "key_pem": first[1]}
        )
        assert r.status_code == 201, r.text
        first_print = r.json()["fingerprint_sha256"]

        fleet.start_edge(
            "e1",
            fleet.join_token(),
            extra=(
                "--https",
                "127.0.0.1:0",
                "--tls-cert",
                str(own.hosts["localhost"].cert_file),
                "--tls-key",
                str(own.hosts["localhost"].key_file),
            ),
        )
        proc = fleet.edges["e1"]
        https_port = int(proc.ready_line.rsplit(":", 1)[1])
        pid = proc.proc.pid

        def serves(fingerprint: str) -> bool:
            try:
                cert = _served_certificate(https_port, "shop.test", ca.files.cert_file)
            except (OSError, ssl.SSLError):
                return False
            return _fingerprint(cert) == fingerprint

        wait_until(lambda: serves(first_print), what="the added certificate served by SNI")
        # the node's own certificate still serves other names
        other = _served_certificate(https_port, "localhost", own.ca.cert_file)
        assert other.subject.rfc4514_string() == "CN=localhost"

        # keys written for the workers are private; the saved bundle too
        cert_dir = tmp_path / "e1" / "control" / "certs"
        key_files = list(cert_dir.glob("*.key"))
        assert key_files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_files)
        bundle_file = tmp_path / "e1" / "control" / "bundle.json"
        assert stat.S_IMODE(bundle_file.stat().st_mode) == 0o600

        second = ca.issue("shop.test", cn="shop v2")
        r = fleet.api.put(
            "/api/v1/certificates/shop", json={"cert_pem": second[0], "key_pem": second[1]}
        )
        assert r.status_code == 200, r.text
        wait_until(lambda: serves(r.json()["fingerprint_sha256"]), what="the rotated certificate")
        assert proc.proc.poll() is None and proc.proc.pid == pid  # no restart
        wait_until(lambda: len(list(cert_dir.glob("*.key"))) == 1, what="old key file pruned")
        key_lines = {line for pem in (first[1], second[1]) for line in pem.splitlines()[1:-1]}
        assert not any(k in line for k in key_lines for line in proc.lines)  # never logged
        saved = json.loads(bundle_file.read_text())
        assert saved["config"]["tls"]["certificates"][0]["name"] == "shop"
    finally:
        fleet.stop()


def test_postgresql_needs_verge_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from verge.control.certificates import SecretUnavailable, sealer_for

    monkeypatch.delenv("VERGE_SECRET", raising=False)
    with pytest.raises(SecretUnavailable, match="VERGE_SECRET"):
        sealer_for("postgresql+psycopg://db/verge")
    monkeypatch.setenv("VERGE_SECRET", "a, b")
    assert sealer_for("postgresql+psycopg://db/verge").open(KeySealer([b"b"]).seal("K")) == "K"


@pytest.mark.timeout(120)
def test_cli_cert_add_list_rm(tmp_path, origin, ca) -> None:
    import subprocess

    from tests.control.test_fleet import ADMIN, Fleet

    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    try:
        cert, key = ca.issue("cli.test")
        (tmp_path / "c.pem").write_text(cert)
        (tmp_path / "k.pem").write_text(key)
        env = {"VERGE_CONTROL": fleet.control_url, "VERGE_TOKEN": ADMIN}

        def verge(*args: str) -> subprocess.CompletedProcess:
            return run_verge(["cert", *args], env)

        added = verge(
            "add", "cli", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem")
        )
        assert added.returncode == 0, added.stderr
        assert "cli.test" in added.stdout and "PRIVATE" not in added.stdout
        listed = verge("list", "--json")
        assert json.loads(listed.stdout)[0]["hosts"] == ["cli.test"]
        bad = verge(
            "add", "bad", "--cert", str(tmp_path / "k.pem"), "--key", str(tmp_path / "k.pem")
        )
        assert bad.returncode == 1 and "cert_pem" in bad.stderr
        assert verge("rm", "cli").returncode == 0
        assert verge("list", "--json").stdout.strip() == "[]"
        assert verge("dev", "--help").returncode == 0
    finally:
        fleet.stop()


def _presented(port: int, host: str) -> str:
    """The common name of the certificate an edge presents for SNI ``host`` (unverified)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


@pytest.mark.timeout(120)
def test_a_tenants_wildcard_certificate_is_never_presented_for_another_tenants_host(
    tmp_path, origin, ca
) -> None:
    """The attack report: B uploaded `*.verge.test`; edges presented it for A's hosts."""
    from tests.control.test_fleet import Fleet, wait_until
    from verge.certs import dev_certificates

    own = dev_certificates(tmp_path / "own", hosts=["localhost"])  # the node's default
    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    try:
        tokens = {}
        for tenant, zone, hosts in (("a", "demo.verge.test", ["demo.verge.test", "*.demo.verge.test"]),
                                    ("b", "b.verge.test", ["b.verge.test"])):
            assert fleet.api.post("/api/v1/tenants",
                                  json={"name": tenant, "zones": [zone]}).status_code == 201
            made = fleet.api.post("/api/v1/tokens", json={"role": "tenant_admin", "tenant": tenant})
            tokens[tenant] = {"Authorization": f"Bearer {made.json()['token']}"}
            service = {"name": f"{tenant}-web", "hosts": hosts, "origins": [{"url": origin.url}]}
            r = fleet.api.post("/api/v1/services", json=service, headers=tokens[tenant])
            assert r.status_code == 201, r.text
        for tenant, name, hosts in (("a", "a-cert", ["demo.verge.test", "*.demo.verge.test"]),
                                    ("b", "b-wide", ["*.verge.test"])):
            cert, key = ca.issue(*hosts, cn=name)
            r = fleet.api.post("/api/v1/certificates", headers=tokens[tenant],
                               json={"name": name, "cert_pem": cert, "key_pem": key})
            assert r.status_code == 201, r.text

        fleet.start_edge("e1", fleet.join_token(), extra=(
            "--https", "127.0.0.1:0",
            "--tls-cert", str(own.hosts["localhost"].cert_file),
            "--tls-key", str(own.hosts["localhost"].key_file),
        ))
        port = int(fleet.edges["e1"].ready_line.rsplit(":", 1)[1])
        wait_until(lambda: _presented(port, "b.verge.test") == "b-wide", what="certificates")
        assert _presented(port, "demo.verge.test") == "a-cert"
        assert _presented(port, "shop.demo.verge.test") == "a-cert"
        assert _presented(port, "nobody.verge.test") == "localhost"  # not B's: B serves none

        # without A's own certificate, A's hosts get the node's default, still never B's
        assert fleet.api.delete("/api/v1/certificates/a-cert", headers=tokens["a"]).status_code \
            == 204
        wait_until(lambda: _presented(port, "demo.verge.test") == "localhost",
                   what="A's certificate gone")
        assert _presented(port, "b.verge.test") == "b-wide"
        saved = json.loads((tmp_path / "e1" / "control" / "bundle.json").read_text())
        assert [c["hosts"] for c in saved["config"]["tls"]["certificates"]] == [["b.verge.test"]]
    finally:
        fleet.stop()
