"""``verge cert ...``: TLS certificates for operators (the logic lives in verge.certs).

``verge cert dev`` works offline: a local development CA and certificates it signs.
``verge cert add|rotate|list|rm`` manage certificates on the control plane; every edge serves
them by SNI within seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from verge.certs import DEFAULT_DEV_HOSTS, dev_certificates
from verge.cli.common import EXIT_USAGE, Api, done, fail, fail_line, warn, with_api

CertFile = Annotated[Path, typer.Option("--cert", help="Certificate chain (PEM), server first.")]
KeyFile = Annotated[Path, typer.Option("--key", help="Its private key (PEM, unencrypted).")]
CertName = Annotated[str, typer.Argument(help="Certificate name.")]
CERT_COLUMNS = [
    ("name", "NAME"),
    ("tenant", "TENANT"),
    ("hosts", "HOSTS"),
    ("not_after", "NOT AFTER"),
    ("fingerprint_sha256", "SHA-256"),
    ("warning", "WARNING"),
]


def cert_dev(
    out: Annotated[
        Path, typer.Option(help="Directory for ca.pem, ca-key.pem and one cert+key per host.")
    ] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Host name, *.wildcard or IP address (repeatable). "
            f"Default: {', '.join(DEFAULT_DEV_HOSTS)}.",
        ),
    ] = None,
) -> None:
    """Make a local development CA (reused if it exists) and certificates it signs."""
    hosts = tuple(host) if host else DEFAULT_DEV_HOSTS
    try:
        made = dev_certificates(out, hosts)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"CA:  {made.ca.cert_file}  (key {made.ca.key_file}, mode 0600)")
    for name, files in made.hosts.items():
        typer.echo(f"{name}:  {files.cert_file}  {files.key_file}")
    typer.echo(f"Trust it with e.g.: curl --cacert {made.ca.cert_file} https://{hosts[0]}:PORT/")


def _read_pems(cert: Path, key: Path) -> tuple[str, str]:
    try:
        return cert.read_text(), key.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail_line(f"cannot read {getattr(exc, 'filename', None) or 'file'}: {exc}", EXIT_USAGE)


def _show_certificate(api: Api, what: str, cert: dict[str, Any]) -> None:
    if api.printed_json(cert):
        return
    done(
        f"{what} {cert['name']}: {', '.join(cert.get('hosts', []))} "
        f"(until {cert.get('not_after')}, sha256 {cert.get('fingerprint_sha256', '')[:16]}...)"
    )
    if cert.get("warning"):
        warn(f"warning: {cert['warning']}")


@with_api
def cert_add(
    api: Api,
    name: Annotated[str, typer.Argument(help="Certificate name: lower-case letters, digits, '-'.")],
    cert: CertFile,
    key: KeyFile,
    tenant: Annotated[
        str | None, typer.Option(help="Owning tenant (admin tokens; others use their own).")
    ] = None,
) -> None:
    """Upload a certificate and key; every edge serves it by SNI within seconds, no restart."""
    cert_pem, key_pem = _read_pems(cert, key)
    created = api.call(lambda client: client.add_certificate(name, cert_pem, key_pem, tenant))
    _show_certificate(api, "certificate added:", created)


@with_api
def cert_rotate(api: Api, name: CertName, cert: CertFile, key: KeyFile) -> None:
    """Replace a certificate's chain and key (new handshakes get it; open connections keep theirs)."""
    cert_pem, key_pem = _read_pems(cert, key)
    rotated = api.call(lambda client: client.rotate_certificate(name, cert_pem, key_pem))
    _show_certificate(api, "certificate rotated:", rotated)


@with_api
def cert_list(api: Api) -> None:
    """List certificates (names, hosts, expiry; never keys)."""
    api.list_all(lambda client: client.list_certificates, "Certificates", CERT_COLUMNS)


@with_api
def cert_rm(api: Api, name: CertName) -> None:
    """Delete a certificate; edges stop offering it with the next config bundle."""
    api.call(lambda client: client.delete_certificate(name))
    api.report({"deleted": name}, f"certificate {name} deleted")


def register(app: typer.Typer) -> None:
    """Add the ``cert`` command group to the ``verge`` app."""
    cert_app = typer.Typer(
        help="TLS certificates: a local dev CA, and certificates on the control plane.",
        no_args_is_help=True,
    )
    cert_app.command("dev")(cert_dev)
    cert_app.command("add")(cert_add)
    cert_app.command("rotate")(cert_rotate)
    cert_app.command("list")(cert_list)
    cert_app.command("rm")(cert_rm)
    app.add_typer(cert_app, name="cert")
