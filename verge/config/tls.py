"""The tls section: certificates picked by SNI and the default one."""

from __future__ import annotations

from pydantic import Field, model_validator

from verge.config.base import FilePath, HostText, Label, Model, Pem
from verge.config.bounds import MAX_CERTIFICATE_HOSTS, MAX_CERTIFICATES


class Certificate(Model):
    """A PEM certificate (chain) and its key, for the hostnames it serves (SNI).

    Either file paths (``cert`` + ``key``) or the PEM text inline (``cert_pem`` + ``key_pem``,
    as the control-plane bundle carries them; the edge writes them to private files).
    """

    cert: FilePath | None = None
    """Path of the PEM chain (server certificate first)."""
    key: FilePath | None = None
    """Path of its private key."""
    cert_pem: Pem | None = None
    """The PEM chain itself, instead of ``cert``."""
    key_pem: Pem | None = Field(default=None, repr=False)
    """The private key PEM itself, instead of ``key`` (never logged)."""
    name: Label | None = None
    """A label (the control plane's certificate name)."""
    hosts: list[HostText] = Field(default_factory=list, max_length=MAX_CERTIFICATE_HOSTS)
    """Host names or "*.example.com" wildcards picked by SNI; empty: only as the default."""
    ocsp_response: FilePath | None = None
    """Path of a DER OCSP response to staple (re-read when the file changes)."""

    @model_validator(mode="after")
    def _files_or_inline(self) -> Certificate:
        files, inline = (self.cert, self.key), (self.cert_pem, self.key_pem)
        if all(files) and not any(inline) or all(inline) and not any(files):
            return self
        raise ValueError("give either cert + key (file paths) or cert_pem + key_pem (PEM text)")


class TlsSettings(Model):
    certificates: list[Certificate] = Field(default_factory=list, max_length=MAX_CERTIFICATES)
    default: Certificate | None = None
    """Served when the client's SNI matches no certificate (none: the handshake fails)."""
