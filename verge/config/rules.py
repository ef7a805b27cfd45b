"""A service's rules: which paths are cached how, header edits, redirects and signed URLs.

A rule's path is a prefix or a glob, compiled once (verge.config.base.glob_regex: linear time
whatever a tenant writes); Service.match_rule picks the first rule that matches.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from verge.config.base import (
    HeaderName,
    HeaderValue,
    Label,
    Model,
    Secret,
    Url,
    UrlPath,
    conflict,
    glob_regex,
)
from verge.config.bounds import MAX_HEADER_EDITS, MAX_ORIGINS
from verge.config.origins import OriginSpec
from verge.config.units import Duration, PositiveDuration


class HeaderRules(Model):
    """Header edits. Names are stored lower-case; numbers in values are taken as text."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    request_add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=MAX_HEADER_EDITS
    )
    request_remove: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)
    response_add: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=MAX_HEADER_EDITS
    )
    response_remove: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)


_PLACEHOLDER_RE = re.compile(r"\$([A-Za-z_]\w*)")
_REDIRECT_PLACEHOLDERS = ("path", "query")


class Redirect(Model):
    to: Url
    """Absolute URL or path; $path and $query are filled in from the request (see location)."""
    status: Literal[301, 302, 303, 307, 308] = 301

    @model_validator(mode="before")
    @classmethod
    def _bare_target(cls, data: object) -> object:
        return {"to": data} if isinstance(data, str) else data

    @field_validator("to")
    @classmethod
    def _check_target(cls, target: str) -> str:
        if not target.startswith(("/", "$path", "http://", "https://")):
            raise ValueError(f"redirect target {target!r} must be a path or an http(s):// URL")
        if any(char.isspace() for char in target):
            raise ValueError(f"redirect target {target!r} contains whitespace")
        for name in _PLACEHOLDER_RE.findall(target):
            if name not in _REDIRECT_PLACEHOLDERS:
                raise ValueError(f"unknown placeholder ${name} in {target!r}; use $path or $query")
        return target

    def location(self, path: str, query: str = "") -> str:
        """The Location for a request path and raw query string (without "?").

        $query right after "?" or "&" is the raw query (the separator is dropped when there is
        none); anywhere else it is "?query", or nothing when the request has no query.
        """
        target = self.to

        def expand(match: re.Match[str]) -> str:
            if match.group(1) == "path":
                return path
            glued = match.start() > 0 and target[match.start() - 1] in "?&"
            return query if glued or not query else "?" + query

        location = _PLACEHOLDER_RE.sub(expand, target)
        if not query and target.endswith(("?$query", "&$query")):
            location = location[:-1]
        return location


_PARAM_RE = re.compile(r"[A-Za-z0-9_.~-]+")


class SignedUrls(Model):
    """A rule's signed-URL check (verge.edge.signing): 403 without a valid HMAC token."""

    secret: Secret | None = Field(default=None, repr=False)
    """The HMAC secret (at least 16 characters); or give secret_env."""
    secret_env: Label | None = None
    """Read the secret from this environment variable of the edge instead."""
    param: Label = "token"
    """The query parameter that carries the token (removed before the cache and the origin)."""
    cookie: bool = True
    """Also accept the token in the verge_token cookie, and set it from a query token."""

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, secret: str | None) -> str | None:
        if secret is not None and len(secret) < 16:  # (a value_error: the secret is not echoed)
            raise ValueError("the secret must be at least 16 characters")
        return secret

    @field_validator("param")
    @classmethod
    def _check_param(cls, param: str) -> str:
        if not _PARAM_RE.fullmatch(param):
            raise ValueError(f"param {param!r} must be a plain query parameter name")
        return param

    @model_validator(mode="after")
    def _one_secret(self) -> SignedUrls:
        if (self.secret is None) == (self.secret_env is None):
            raise conflict(("secret",), "give the secret inline (secret) or by name (secret_env)")
        value = os.environ.get(self.secret_env) if self.secret_env else None
        if value is not None and len(value) < 16:
            raise conflict(("secret_env",), f"${self.secret_env} must be at least 16 characters")
        return self

    def secret_value(self) -> str | None:
        """The secret; None when secret_env names a variable this process does not have
        (requests are then refused: the check fails closed)."""
        if self.secret is not None:
            return self.secret
        value = os.environ.get(self.secret_env or "")
        return value if value and len(value) >= 16 else None


class Rule(Model):
    path: UrlPath
    """A prefix ("/static/") or a glob matching the whole path ("/api/*.json")."""
    kind: Literal["static", "dynamic", "api", "default"] = "default"
    ttl: Duration | None = None
    """Lifetime when the origin gives no freshness information."""
    override: bool = False
    """Cache for ttl whatever the origin's Cache-Control/Expires say."""
    bypass: bool = False
    """Never cache; every request goes to the origin."""
    micro_cache: PositiveDuration | None = None
    """Cache for this many seconds whatever the origin says (sets ttl and override)."""
    ignore_query: bool = False
    ignore_cookies: bool = False
    """Strip Cookie from the origin request and Set-Cookie from the cached response."""
    sort_query: bool = False
    key_headers: list[HeaderName] = Field(default_factory=list, max_length=MAX_HEADER_EDITS)
    """Request headers that become part of the cache key."""
    headers: HeaderRules = Field(default_factory=HeaderRules)
    redirect: Redirect | None = None
    origins: Annotated[list[OriginSpec], Field(max_length=MAX_ORIGINS)] | None = None
    """Send this path to these origins instead of the service's (e.g. /live/ to a stream server)."""
    signed: SignedUrls | None = None
    """Require a signed token (query parameter or cookie) for this path: see verge.edge.signing."""

    _glob: re.Pattern[str] | None = PrivateAttr(None)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"rule path {path!r} must start with '/'")
        if any(char.isspace() or char in "?#" for char in path):
            raise ValueError(
                f"rule path {path!r} must be a URL path (no spaces, query or fragment)"
            )
        return path

    @field_validator("key_headers")
    @classmethod
    def _dedupe_key_headers(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _resolve(self) -> Rule:
        given = set(self.model_fields_set)
        if self.micro_cache is not None:
            self._apply_micro_cache(given)
        self._apply_kind_defaults(given)
        if self.override and self.ttl is None:
            raise conflict(("override",), "override: true needs a ttl")
        self._glob = re.compile(glob_regex(self.path)) if "*" in self.path else None
        return self

    def _apply_micro_cache(self, given: set[str]) -> None:
        if self.bypass:
            raise conflict(("bypass",), "bypass: true contradicts micro_cache; choose one")
        if "override" in given and not self.override:
            raise conflict(("override",), "micro_cache always overrides; drop override: false")
        if self.ttl is not None and self.ttl != self.micro_cache:
            raise conflict(("ttl",), "micro_cache sets the ttl; drop ttl or make them equal")
        self.ttl = self.micro_cache
        self.override = True

    def _apply_kind_defaults(self, given: set[str]) -> None:
        if self.kind == "static":
            if self.ttl is None and "ttl" not in given:
                self.ttl = 86400.0
            if "ignore_cookies" not in given:
                self.ignore_cookies = True
        elif self.kind == "api":
            if "sort_query" not in given:
                self.sort_query = True
        elif self.kind == "dynamic" and self.micro_cache is None and "bypass" not in given:
            self.bypass = True

    def matches(self, path: str) -> bool:
        glob = self.__pydantic_private__["_glob"]
        if glob is None:
            return path.startswith(self.path)
        return glob.fullmatch(path) is not None
