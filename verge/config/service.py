"""A service: the hosts it answers for, its origins and rules, HTTPS and protection.

The unit a tenant controls. Service.match_rule answers the per-request question "which rule
applies to this path" with the rules' prefixes and globs compiled once.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PrivateAttr, field_validator, model_validator

from verge.config.base import SLUG_RE, HostText, Model, Name, config_host, conflict
from verge.config.bounds import MAX_HOSTS_PER_SERVICE, MAX_ORIGINS, MAX_RULES
from verge.config.origins import HealthCheck, OriginSpec
from verge.config.rules import HeaderRules, Rule
from verge.config.units import Duration
from verge.protect.settings import Protection


class Hsts(Model):
    max_age: Duration = 31536000.0
    include_subdomains: bool = False
    preload: bool = False

    def header(self) -> str:
        value = f"max-age={int(self.max_age)}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value


class Service(Model):
    name: Name
    """A slug: lower-case letters, digits and "-"."""
    hosts: list[Annotated[HostText, AfterValidator(config_host)]] = Field(
        min_length=1, max_length=MAX_HOSTS_PER_SERVICE
    )
    """Host names ("example.com"), wildcards ("*.example.com": any subdomain) or "*" (any host)."""
    default: bool = False
    """Serve requests whose Host matches no service."""
    origins: list[OriginSpec] = Field(min_length=1, max_length=MAX_ORIGINS)
    health_check: HealthCheck | None = None
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    """Tried in order; the first match applies."""
    headers: HeaderRules = Field(default_factory=HeaderRules)
    """Service-wide header edits, applied before the matching rule's."""
    https_redirect: bool = False
    """Answer plain-HTTP requests with a 308 to the same URL over HTTPS."""
    hsts: Hsts | None = None
    """Strict-Transport-Security on HTTPS responses."""
    encoded_slashes: Literal["reject", "keep"] = "reject"
    """Paths with an encoded '/' or '\\' (%2F, %5C): "reject" answers 400 (an origin that
    decodes them would see a path no rule saw); "keep" forwards them still encoded."""
    protection: Protection | None = None
    """Rate limits, deny lists and the WAF of this service (verge.protect)."""

    _matchers: tuple[tuple[str, re.Pattern[str] | None, Rule], ...] = PrivateAttr(())

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not SLUG_RE.fullmatch(name) or len(name) > 63:
            raise ValueError(
                f"service name {name!r} must be a slug: lower-case letters, digits and '-' "
                "(e.g. my-site)"
            )
        return name

    @model_validator(mode="after")
    def _index_rules(self) -> Service:
        first_with_path: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.path in first_with_path:
                earlier = first_with_path[rule.path]
                raise conflict(
                    ("rules", index, "path"),
                    f"never matches: rules[{earlier}] has the same path {rule.path!r}",
                )
            first_with_path[rule.path] = index
        self._matchers = tuple((rule.path, rule._glob, rule) for rule in self.rules)
        return self

    def match_rule(self, path: str) -> Rule | None:
        """The first rule whose prefix or glob matches the URL path (no query string)."""
        for prefix, glob, rule in self.__pydantic_private__["_matchers"]:
            if glob is None:
                if path.startswith(prefix):
                    return rule
            elif glob.fullmatch(path) is not None:
                return rule
        return None
