"""HTTP semantics that every layer may share: hop-by-hop fields and status reason phrases.

Why a module of its own, importing only the standard library: the pure cache policy
(:mod:`verge.cache.policy`), the function runtime's CGI framing (:mod:`verge.compute.wagi`)
and the protocol layer (:mod:`verge.http`) all need the same few facts of RFC 9110, and
none of them should pull in another's code to get them (see ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType

__all__ = ["HOP_BY_HOP", "REASONS", "reason_phrase"]

# RFC 9110 §7.6.1: connection-specific fields, never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

# Python 3.11's HTTPStatus still carries the RFC 7231 wording of these; RFC 9110 §15 renamed them.
_RFC9110_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}

REASONS: Mapping[int, str] = MappingProxyType(
    {status.value: status.phrase for status in HTTPStatus} | _RFC9110_PHRASES
)
"""Status code -> reason phrase (RFC 9110 §15), for every status HTTPStatus knows."""


def reason_phrase(status: int, default: str = "") -> str:
    """The reason phrase of ``status``, or ``default`` for a code without one."""
    return REASONS.get(status, default)
