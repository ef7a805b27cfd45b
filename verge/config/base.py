"""What every config section is built from: the Model base, cross-field errors, bounded text,
and the names a config holds (header names, hosts, slugs) with their normal forms.

These are public so that other verge configs (the router's, verge.config.router) follow the
same rules and report errors the same way (verge.config.loader turns them into file:line).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from verge.config.bounds import (
    MAX_FILE_PATH,
    MAX_HEADER_NAME,
    MAX_HEADER_VALUE,
    MAX_HOST,
    MAX_LABEL,
    MAX_NAME,
    MAX_PEM,
    MAX_SECRET,
    MAX_TEXT,
    MAX_URL,
    MAX_URL_PATH,
)


class Model(BaseModel):
    """Base for all sections: unknown keys are errors, numbers must be finite.

    Per-request methods read private attributes through ``self.__pydantic_private__[...]``:
    plain ``self._x`` on a pydantic model goes through ``__getattr__`` and costs ~2 µs.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def conflict(at: tuple[str | int, ...], reason: str) -> PydanticCustomError:
    """A cross-field error; `at` extends the error path so the message points at the right line."""
    return PydanticCustomError("config_conflict", "{reason}", {"reason": reason, "at": at})


Name = Annotated[str, Field(max_length=MAX_NAME)]
Label = Annotated[str, Field(max_length=MAX_LABEL)]
HostText = Annotated[str, Field(max_length=MAX_HOST)]
Url = Annotated[str, Field(max_length=MAX_URL)]
UrlPath = Annotated[str, Field(max_length=MAX_URL_PATH)]
FilePath = Annotated[str, Field(max_length=MAX_FILE_PATH)]
Secret = Annotated[str, Field(max_length=MAX_SECRET)]
Pem = Annotated[str, Field(max_length=MAX_PEM)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


def _header_name(name: str) -> str:
    """Header names are stored lower-cased (HTTP/2 needs it; matching is case-insensitive)."""
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name.lower()


def _header_value(value: str) -> str:
    if any(char in value for char in "\r\n\0"):
        raise ValueError(f"header value {value!r} contains a line break or NUL")
    return value


HeaderName = Annotated[str, Field(max_length=MAX_HEADER_NAME), AfterValidator(_header_name)]
HeaderValue = Annotated[str, Field(max_length=MAX_HEADER_VALUE), AfterValidator(_header_value)]


def ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def config_host(value: str) -> str:
    """Normalise a configured host: lower-case, no trailing dot, IDNA, "*" or "*.suffix" wildcards."""
    host = value.strip().lower().rstrip(".")
    if host == "*":
        return host
    ip = ip_literal(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    if ip is not None:
        return ip
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise ValueError(f"invalid host {value!r}: {exc}") from None
    name = host.removeprefix("*.")
    if ":" in name:
        raise ValueError(f"host {value!r} has a port; hosts are matched without the port")
    if not HOSTNAME_RE.fullmatch(name) or len(name) > 253:
        raise ValueError(
            f"invalid host {value!r}: use a name like example.com, a wildcard like "
            "*.example.com, or * for every host"
        )
    return host


def request_host_name(host: str) -> str:
    """The name part of a Host header: no port, no brackets, lower-case, no trailing dot."""
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
    else:
        name = host.partition(":")[0]
    return name.rstrip(".").lower()


def _slug(value: str) -> str:
    if not SLUG_RE.fullmatch(value) or len(value) > 63:
        raise ValueError(f"{value!r} must be a slug: lower-case letters, digits and '-'")
    return value


Slug = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_slug)]


def glob_regex(pattern: str) -> str:
    """Regex source for a glob where "*" matches any run of characters, "/" included.

    Matching takes time linear in the path whatever the glob: every "*" but the last takes
    the earliest occurrence of the text after it and never gives it back (an atomic group),
    which finds a match whenever there is one. A plain ".*" per star would backtrack: a
    tenant's rule "/*a*a*b" against a long path of "a"s would stall the edge worker.
    """
    literals = re.split(r"\*+", pattern)
    if len(literals) == 1:
        return re.escape(pattern)
    first, *middle, last = literals
    committed = "".join(f"(?>.*?{re.escape(part)})" for part in middle)
    return f"{re.escape(first)}{committed}.*{re.escape(last)}"
