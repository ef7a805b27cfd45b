"""Origins: where a service's requests go (URL, weight, TLS) and how their health is checked."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from verge.config.base import (
    HOSTNAME_RE,
    FilePath,
    HostText,
    Model,
    Url,
    UrlPath,
    conflict,
    ip_literal,
)
from verge.config.bounds import MAX_HEALTH_STREAK, MAX_ORIGIN_WEIGHT, MAX_STATUS_PATTERNS
from verge.config.units import HealthInterval, PositiveDuration


def _status_pattern(value: object) -> int | str:
    """200 (one status) or "2xx" (a class); digit strings become ints."""
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[1-5]xx", text):
            return text
        value = int(text) if text.isdigit() else value
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    raise ValueError(f"invalid status {value!r}: use a code like 200 or a class like 2xx")


StatusPattern = Annotated[
    Annotated[int, Field(ge=100, le=599)] | Annotated[str, Field(max_length=3)],
    BeforeValidator(_status_pattern),
]


class HealthCheck(Model):
    path: UrlPath = "/"
    interval: HealthInterval = 5.0
    timeout: PositiveDuration = 2.0
    fails: int = Field(3, ge=1, le=MAX_HEALTH_STREAK)
    """Consecutive failures that mark an origin down."""
    passes: int = Field(2, ge=1, le=MAX_HEALTH_STREAK)
    """Consecutive successes that mark it up again."""
    expect_status: list[StatusPattern] = Field(
        default_factory=lambda: ["2xx", "3xx"], min_length=1, max_length=MAX_STATUS_PATTERNS
    )
    """Healthy statuses: codes (200) or classes ("2xx"); the default means any status < 400."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/") or any(char.isspace() for char in path):
            raise ValueError(f"health check path {path!r} must start with '/' and have no spaces")
        return path

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheck:
        if self.timeout > self.interval:
            raise conflict(("timeout",), "timeout is longer than interval")
        return self

    def is_healthy_status(self, status: int) -> bool:
        return status in self.expect_status or f"{status // 100}xx" in self.expect_status


class OriginSpec(Model):
    """An origin server; a bare "http://host:port" string is accepted in place of the mapping."""

    url: Url
    """http:// or https:// plus host[:port]; nothing else."""
    weight: int = Field(1, ge=1, le=MAX_ORIGIN_WEIGHT)
    """Share of the requests relative to the other origins (1 to MAX_ORIGIN_WEIGHT)."""
    host_header: HostText | None = None
    """Host header sent to this origin (default: the client's)."""
    tls_ca: FilePath | None = None
    """https only: PEM file of the CA(s) to trust for this origin, instead of the system store."""
    tls_verify: bool = True
    """https only: check the origin's certificate and name. false is UNSAFE (anyone on the path
    can pose as the origin); only for a self-signed origin on a network you trust."""
    tls_server_name: HostText | None = None
    """https only: name sent as SNI and checked in the certificate (default: host_header
    without its port, else the URL's host)."""

    _scheme: str = PrivateAttr("http")
    _host: str = PrivateAttr("")
    _port: int = PrivateAttr(80)

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, data: object) -> object:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        scheme, host, port = _split_origin_url(url)
        netloc = f"[{host}]" if ":" in host else host
        return f"{scheme}://{netloc}" + (f":{port}" if port is not None else "")

    @field_validator("host_header")
    @classmethod
    def _check_host_header(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(char.isspace() for char in value)):
            raise ValueError(f"host_header {value!r} must be a non-empty name without spaces")
        return value

    @field_validator("tls_server_name")
    @classmethod
    def _check_server_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() or c in "/:" for c in value)):
            raise ValueError(f"tls_server_name {value!r} must be a host name")
        return value

    @model_validator(mode="after")
    def _remember_parts(self) -> OriginSpec:
        scheme, host, port = _split_origin_url(self.url)
        self._scheme, self._host = scheme, host
        self._port = port if port is not None else (443 if scheme == "https" else 80)
        tls_set = self.tls_ca is not None or not self.tls_verify or self.tls_server_name
        if scheme != "https" and tls_set:
            raise ValueError(
                "tls_ca, tls_verify and tls_server_name apply to https:// origins only"
            )
        return self

    def tls_options(self) -> dict[str, Any]:
        """Keyword arguments for ``verge.http.client.Origin.parse``: CA, verification, SNI."""
        if not self.tls:
            return {}
        server_name = self.tls_server_name
        if server_name is None and self.host_header:
            server_name = urlsplit(f"//{self.host_header}").hostname
        return {
            "tls_ca": self.tls_ca,
            "tls_verify": self.tls_verify,
            "tls_server_name": server_name,
        }

    @property
    def scheme(self) -> str:
        return self.__pydantic_private__["_scheme"]

    @property
    def host(self) -> str:
        """Host name or IP address (IPv6 without brackets)."""
        return self.__pydantic_private__["_host"]

    @property
    def port(self) -> int:
        """The port, defaulted from the scheme."""
        return self.__pydantic_private__["_port"]

    @property
    def tls(self) -> bool:
        return self.__pydantic_private__["_scheme"] == "https"


def _split_origin_url(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, explicit port or None) of an origin URL, or ValueError saying what is wrong."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"origin URL {url!r} must look like http://host[:port] or https://host[:port]"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"origin URL {url!r} must not contain credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"origin URL {url!r} must be scheme://host[:port] only, without a path")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"origin URL {url!r} has an invalid port") from None
    if port == 0:
        raise ValueError(f"origin URL {url!r} has an invalid port")
    host = parts.hostname or ""
    if not (ip_literal(host) or HOSTNAME_RE.fullmatch(host)):
        raise ValueError(f"origin URL {url!r} has an invalid host {host!r}")
    return scheme, ip_literal(host) or host, port
