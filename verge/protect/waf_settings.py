"""A service's web application firewall settings: the ``waf:`` section of its protection.

    waf: {rules: owasp-crs, paranoia: 1, mode: block, on: [dynamic, misses],
          exclude: [{path: /upload, rules: [920420]}], budget_ms: 50, fail: open}

Every field is bounded (the table below), as in verge/config/bounds.py: a tenant writes this through
the control plane, and what it may ask costs the edge CPU (the WAF's cost grows with the
paranoia level, the bytes inspected and the time budget). The model imports nothing from
verge, so verge.config can embed it without an import cycle. verge.protect.waf turns it into
engine rules.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = ["WafExclusion", "WafSettings"]

KiB = 1024
MiB = 1024 * KiB

# Bounds (the same names and sizes as verge/config/bounds.py's table where they overlap)
MAX_URL_PATH = 1024
"""An exclusion's path or path glob (verge.config.MAX_URL_PATH)."""
MAX_EXCLUSIONS = 100
"""Exclusions of one service: each is one more phase-1 rule for every request."""
MAX_EXCLUDED_RULES = 100
"""Rule ids of one exclusion."""
MAX_RULE_ID = 999_999
"""ModSecurity rule ids: 1–99,999 local rules, 900,000–999,999 the Core Rule Set."""
MAX_BUDGET_MS = 1000.0
"""Milliseconds one request may wait for the engine (queue included)."""
MAX_INSPECTED_BODY = 1 * MiB
"""Request body bytes inspected. The engine costs ~1.5 µs of CPU per byte of form or JSON
data at paranoia 1, ~3.5 µs at 4: a 1 MiB body occupies a worker thread for 1.5–4 s."""

# What an exclusion path may contain: RFC 3986 path characters and "*", already
# percent-decoded (the engine matches the decoded, normalised path), nothing that needs
# quoting inside a SecRule.
_PATH_RE = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")

Mode = Literal["block", "detect"]
Trigger = Literal["dynamic", "misses", "all"]


def _exclusion_path(path: str) -> str:
    if not _PATH_RE.fullmatch(path):
        raise ValueError(
            f"exclusion path {path!r} must start with '/' and hold only URL path characters "
            "(decoded: no '%', spaces, quotes, backslashes, '?' or '#'); '*' is a wildcard"
        )
    return path


ExclusionPath = Annotated[str, Field(max_length=MAX_URL_PATH), AfterValidator(_exclusion_path)]
RuleId = Annotated[int, Field(ge=1, le=MAX_RULE_ID)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class WafExclusion(_Model):
    """Rules switched off for requests whose path matches (false positives of one app)."""

    path: ExclusionPath
    """A prefix ("/upload") or a glob matching the whole path ("/api/*/upload"), as for
    service rules; matched against the percent-decoded, normalised path ("/a/../upload" is
    "/upload")."""
    rules: list[RuleId] = Field(min_length=1, max_length=MAX_EXCLUDED_RULES)
    """Rule ids to remove for those requests (e.g. 920420: content type not allowed)."""


def _dedupe(values: list[Trigger]) -> list[Trigger]:
    return list(dict.fromkeys(values))


class WafSettings(_Model):
    """The OWASP Core Rule Set, evaluated by libmodsecurity, on the requests `on` names."""

    rules: Literal["owasp-crs"] = "owasp-crs"
    """The rule set: the OWASP Core Rule Set (the only one for now)."""
    paranoia: int = Field(1, ge=1, le=4)
    """CRS paranoia level: 1 few false positives … 4 many rules, many false positives."""
    mode: Mode = "block"
    """block: refuse what the rules flag (403); detect: count and log it, serve anyway."""
    on: Annotated[list[Trigger], AfterValidator(_dedupe)] = Field(
        default_factory=lambda: ["dynamic", "misses"], min_length=1, max_length=3
    )
    """Which requests are inspected (any listed condition): dynamic = requests with a query
    string or a body, or a method other than GET/HEAD; misses = requests not answered from
    the cache; all = every request, cache hits included (~0.6 ms of CPU each at PL1)."""
    exclude: list[WafExclusion] = Field(default_factory=list, max_length=MAX_EXCLUSIONS)
    budget_ms: float = Field(50.0, gt=0, le=MAX_BUDGET_MS)
    """Longest a request waits for its verdict, queueing for a worker thread included."""
    fail: Literal["open", "closed"] = "open"
    """When the budget runs out, the engine fails or the pool is full: open serves the
    request uninspected, closed refuses it (503). Open trades protection for availability:
    a request made slow on purpose is served uninspected too, so keep the worst case (the
    inspection limits at ~1.5 µs a byte) inside the budget, or fail closed."""
    max_body_bytes: int = Field(16 * KiB, ge=0, le=MAX_INSPECTED_BODY)
    """Request body bytes inspected (0: bodies are not inspected); see `oversize`. 16 KiB
    (AWS WAF's default too) costs at most ~25 ms of CPU at paranoia 1."""
    oversize: Literal["truncate", "block"] = "truncate"
    """A body, URL or header block over the inspection limits: truncate inspects the first
    bytes (padding can then hide an attack past them), block refuses it (413, 414, 431)."""

    @property
    def blocking(self) -> bool:
        return self.mode == "block"
