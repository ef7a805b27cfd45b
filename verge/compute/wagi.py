"""The WAGI ABI between the edge and a function: CGI environment in, CGI response out.

Why CGI: any program that targets wasm32-wasi (C, Rust, Go, Zig...) is already a function;
it needs no SDK, only ``getenv``, ``stdin`` and ``stdout``. This module is sans-I/O: it
turns a request into an environment, and a function's stdout bytes into a result.
The runtime (``runtime.py``) moves the bytes; nothing here touches wasm or sockets.

Input (WAGI / RFC 3875)
-----------------------
Environment: ``REQUEST_METHOD``, ``PATH_INFO`` (decoded path), ``X_RAW_PATH_INFO`` (as
sent), ``QUERY_STRING``, ``REQUEST_URI``, ``SCRIPT_NAME`` (empty), ``SERVER_NAME``,
``SERVER_PORT``, ``SERVER_PROTOCOL``, ``SERVER_SOFTWARE``, ``GATEWAY_INTERFACE``,
``REMOTE_ADDR``/``REMOTE_HOST``, ``CONTENT_TYPE``, ``CONTENT_LENGTH``, one ``HTTP_*``
per request header (repeats joined with ", "), ``X_MATCHED_ROUTE`` and ``X_FULL_URL``
like WAGI, ``VERGE_REQUEST_ID``, ``VERGE_PHASE`` (``request`` or ``response``), then the
function's own variables and secrets declared at deploy time (these win on a clash).
Stdin: the request body.

Output (what a function prints on stdout)
----------------------------------------
CGI header lines (``Name: value``, LF or CRLF), one blank line, then the body.

* **Answer**: ``Status: 404 Not Found`` (default 200), ``Content-Type``, any other header.
  ``Location`` without ``Status`` means ``302 Found`` (WAGI's redirect rule). At least one
  of ``Content-Type``, ``Location``, ``Status`` must be present (as in WAGI). Hop-by-hop
  fields and ``Content-Length`` are dropped: the edge frames the body itself.
* **Pass** (continue to the cache / origin): ``X-Verge-Pass: 1``. Optional edits of the
  request that continues:
  ``X-Verge-Rewrite-Path: /new/path?q=1`` (new request-target, origin-form),
  ``X-Verge-Set-Header: Name: value`` (repeatable; replaces every ``Name``),
  ``X-Verge-Remove-Header: Name`` (repeatable). The body of a pass is ignored.

Response editing (``VERGE_PHASE=response``)
-------------------------------------------
The function runs after the origin answered: stdin is the origin response in the same
CGI form (``Status: 200 OK``, headers, blank line, body; see :func:`encode_response`).
It prints either a full answer (which replaces the response) or ``X-Verge-Pass: 1``,
meaning "deliver the origin response", with ``X-Verge-Set-Header`` /
``X-Verge-Remove-Header`` applied to the response headers (the body is left as is and
need not be copied through the function).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from verge.http.message import Headers
from verge.http_semantics import HOP_BY_HOP, reason_phrase

PASS_HEADER = "x-verge-pass"
REWRITE_PATH_HEADER = "x-verge-rewrite-path"
SET_HEADER = "x-verge-set-header"
REMOVE_HEADER = "x-verge-remove-header"
_CONTROL_HEADERS = frozenset({PASS_HEADER, REWRITE_PATH_HEADER, SET_HEADER, REMOVE_HEADER})
_DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {"content-length", "status"}
_NOT_ANSWERED = frozenset(_DROPPED_RESPONSE_HEADERS | _CONTROL_HEADERS)  # (lower case)
_TRUTHY = frozenset({"1", "true", "yes", "on"})

MAX_HEAD_BYTES = 64 * 1024  # the CGI header block of a function's output
MAX_HEADER_LINES = 200


class BadOutput(ValueError):
    """A function's stdout is not a valid CGI response."""


@dataclass(slots=True)
class CgiRequest:
    """What the edge knows about a request, in the shape the environment needs.

    ``target`` is the raw origin-form request-target (``/path?query``, still
    percent-encoded); ``host`` is the Host header value (may carry a port).
    """

    method: str
    target: str
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    scheme: str = "http"
    host: str = ""
    server_port: int = 80
    remote_addr: str = ""
    route: str = ""
    protocol: str = "HTTP/1.1"


@dataclass(slots=True)
class Answer:
    """The function answered: the edge sends this response to the client."""

    status: int
    headers: Headers
    body: bytes


@dataclass(slots=True)
class Pass:
    """The function passed: the request (or origin response) continues, possibly edited."""

    target: str | None = None
    set_headers: Headers = field(default_factory=list)
    remove_headers: tuple[str, ...] = ()

    def edit_headers(self, headers: Headers) -> Headers:
        """``headers`` with the removals and replacements applied (a new list)."""
        drop = {n.lower() for n in self.remove_headers}
        drop.update(n.lower() for n, _ in self.set_headers)
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out.extend(self.set_headers)
        return out

    def edit_request(self, target: str, headers: Headers) -> tuple[str, Headers]:
        """The request-target and headers the pipeline continues with."""
        return (self.target or target), self.edit_headers(headers)


Result = Answer | Pass


CGI_NAMES = (  # the environment every invocation gets, in this order (values: cgi_values)
    "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE",
    "SERVER_PROTOCOL",
    "SERVER_NAME",
    "SERVER_PORT",
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "X_RAW_PATH_INFO",
    "PATH_TRANSLATED",
    "QUERY_STRING",
    "REQUEST_URI",
    "REMOTE_ADDR",
    "REMOTE_HOST",
    "CONTENT_LENGTH",
    "X_MATCHED_ROUTE",
    "X_FULL_URL",
    "VERGE_REQUEST_ID",
    "VERGE_PHASE",
)
_HEADER_NAMES_CACHED = 1024  # header name -> variable name, for names seen before


def build_environ(
    req: CgiRequest,
    *,
    request_id: str = "",
    phase: str = "request",
    function_env: tuple[tuple[str, str], ...] = (),
) -> list[tuple[str, str]]:
    """The CGI environment (name, value) pairs for one invocation."""
    env = list(zip(CGI_NAMES, cgi_values(req, request_id, phase), strict=True))
    env.extend(header_environ(req.headers).items())
    if function_env:
        declared = {name for name, _ in function_env}
        env = [(n, v) for n, v in env if n not in declared]
        env.extend(function_env)
    return env


def cgi_values(req: CgiRequest, request_id: str = "", phase: str = "request") -> list[str]:
    """The values of :data:`CGI_NAMES` for ``req`` (the runtime's fast path; see
    :func:`build_environ` for the whole environment)."""
    raw_path, _, query = req.target.partition("?")
    raw_path = raw_path or "/"
    host = req.host or "localhost"
    remote = req.remote_addr
    return [
        "CGI/1.1",
        "Verge",
        req.protocol,
        _strip_port(host),
        str(req.server_port),
        req.method,
        "",
        unquote(raw_path, errors="replace") if "%" in raw_path else raw_path,
        raw_path,
        raw_path,
        query,
        req.target,
        remote,
        remote,
        str(len(req.body)),
        req.route,
        f"{req.scheme}://{host}{req.target}",
        request_id,
        phase,
    ]


def header_environ(headers: Headers) -> dict[str, str]:
    """One variable per request header: ``HTTP_*`` (repeats joined with ", "), and
    ``CONTENT_TYPE``; Content-Length and names that are not tokens are left out."""
    merged: dict[str, str] = {}
    for name, value in headers:
        key = _VARIABLE_OF.get(name)
        if key is None:
            key = _variable_of(name)
        if not key:
            continue
        if key in merged and key != "CONTENT_TYPE":
            merged[key] = f"{merged[key]}, {value}"
        else:
            merged[key] = value
    return merged


_VARIABLE_OF: dict[str, str] = {}


def _variable_of(header: str) -> str:
    """The variable a header goes into ("" for none), remembered for the next request."""
    key = header.upper().replace("-", "_")
    if key == "CONTENT_LENGTH" or not key.replace("_", "").isalnum():
        key = ""
    elif key != "CONTENT_TYPE":
        key = "HTTP_" + key
    if len(_VARIABLE_OF) < _HEADER_NAMES_CACHED:
        _VARIABLE_OF[header] = key
    return key


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def encode_response(status: int, headers: Headers, body: bytes) -> bytes:
    """An HTTP response in CGI form: the input of response editing and of ``fetch``."""
    lines = [f"Status: {status} {reason_phrase(status)}".rstrip()]
    lines.extend(f"{n}: {v}" for n, v in headers)
    head = "\n".join(lines) + "\n\n"
    return head.encode("latin-1", "replace") + body


def split_head(data: bytes) -> tuple[list[tuple[str, str]], int]:
    """Parse the CGI header block: ([(name, value)], offset of the body)."""
    end, sep = _head_end(data)
    if end < 0:
        raise BadOutput("no blank line after the CGI headers")
    return _head_fields(data[:end]), end + sep


def _head_fields(data: bytes) -> list[tuple[str, str]]:
    """The (name, value) fields of a CGI header block (without its blank line)."""
    head = data.decode("latin-1")
    lines = head.split("\n")
    if len(lines) > MAX_HEADER_LINES:
        raise BadOutput(f"more than {MAX_HEADER_LINES} header lines")
    crlf = "\r" in head
    fields = []
    for line in lines:
        if crlf:
            line = line.rstrip("\r")
        if not line:
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name or " " in name:
            raise BadOutput(f"malformed header line {line[:80]!r}")
        fields.append((name, value.strip()))
    return fields


def _head_end(data: bytes) -> tuple[int, int]:
    """(index of the blank line, its length), or (-1, 0) when the head is incomplete."""
    if data.startswith(b"\n"):
        return 0, 1
    if data.startswith(b"\r\n"):
        return 0, 2
    lf = data.find(b"\n\n", 0, MAX_HEAD_BYTES)
    crlf = data.find(b"\n\r\n", 0, MAX_HEAD_BYTES)
    if lf < 0 and crlf < 0:
        if len(data) > MAX_HEAD_BYTES:
            raise BadOutput(f"CGI header block over {MAX_HEAD_BYTES} bytes")
        return -1, 0
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 1, 2
    return lf + 1, 1


def parse_status(value: str) -> int:
    """The code of a CGI ``Status`` value such as ``404 Not Found``."""
    code = value.split(None, 1)[0] if value.strip() else ""
    if not (len(code) == 3 and code.isdigit() and 100 <= int(code) <= 599):
        raise BadOutput(f"bad Status {value[:40]!r}")
    return int(code)


def parse_output(data: bytes) -> Result:
    """A function's stdout -> :class:`Answer` or :class:`Pass` (raises :class:`BadOutput`)."""
    end, sep = _head_end(data)
    if end < 0:
        raise BadOutput("no blank line after the CGI headers")
    return parse_head(data[:end], data[end + sep :])


HEADS_KEPT = 512  # parsed heads remembered (all forgotten when full: the set changed)
HEAD_KEPT_BYTES = 2048  # longer heads are parsed each time


def parse_head(head: bytes, body: bytes) -> Result:
    """:func:`parse_output` of an output whose header block is ``head`` (up to its blank
    line, which is not included) and whose body is ``body``.

    Why: a function prints the same head for most requests (``Content-Type: text/plain``),
    and what a head means depends on nothing else; so each head is parsed once and its
    meaning remembered (a few hundred short ones). Every result is a new object (its lists
    too): a caller may change it."""
    meaning = _MEANINGS.get(head)
    if meaning is None:
        meaning = _meaning(head)
        if len(head) <= HEAD_KEPT_BYTES:
            if len(_MEANINGS) >= HEADS_KEPT:
                _MEANINGS.clear()
            _MEANINGS[head] = meaning
    return meaning.result(body)


@dataclass(frozen=True, slots=True)
class _Answers:
    status: int
    headers: tuple[tuple[str, str], ...]

    def result(self, body: bytes) -> Answer:
        return Answer(self.status, list(self.headers), body)


@dataclass(frozen=True, slots=True)
class _Passes:
    target: str | None
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]

    def result(self, body: bytes) -> Pass:
        return Pass(self.target, list(self.set_headers), self.remove_headers)


@dataclass(frozen=True, slots=True)
class _Refuses:
    reason: str

    def result(self, body: bytes) -> Result:
        raise BadOutput(self.reason)


_MEANINGS: dict[bytes, _Answers | _Passes | _Refuses] = {}


def _meaning(head: bytes) -> _Answers | _Passes | _Refuses:
    """What an output with this header block means, whatever its body."""
    try:
        fields = _head_fields(head)
        names = [name.lower() for name, _ in fields]
        if PASS_HEADER in names and _is_pass(fields):
            passed = _parse_pass(fields)
            return _Passes(passed.target, tuple(passed.set_headers), passed.remove_headers)
        if "content-type" not in names and "location" not in names and "status" not in names:
            raise BadOutput("output has none of Content-Type, Location, Status")
        status = 0
        headers: Headers = []
        for field_, low in zip(fields, names, strict=True):
            if low == "status":
                status = parse_status(field_[1])
            elif low not in _NOT_ANSWERED:
                headers.append(field_)
        if not status:
            status = 302 if "location" in names else 200
        return _Answers(status, tuple(headers))
    except BadOutput as exc:
        return _Refuses(str(exc))


def _is_pass(fields: list[tuple[str, str]]) -> bool:
    return any(n.lower() == PASS_HEADER and v.lower() in _TRUTHY for n, v in fields)


def _parse_pass(fields: list[tuple[str, str]]) -> Pass:
    result = Pass()
    removes = []
    for name, value in fields:
        low = name.lower()
        if low == REWRITE_PATH_HEADER:
            if not value.startswith("/") or any(c in value for c in " \t\r\n"):
                raise BadOutput(f"bad {name} {value[:80]!r}: must be an origin-form target")
            result.target = value
        elif low == SET_HEADER:
            hname, colon, hvalue = value.partition(":")
            if not colon or not hname.strip():
                raise BadOutput(f"bad {name} {value[:80]!r}: expected 'Name: value'")
            result.set_headers.append((hname.strip(), hvalue.strip()))
        elif low == REMOVE_HEADER:
            removes.append(value.strip())
    result.remove_headers = tuple(removes)
    return result


def parse_response(data: bytes) -> Answer:
    """A CGI-form HTTP response (a ``fetch`` answer or an origin response) -> Answer."""
    fields, body_at = split_head(data)
    status = 200
    headers: Headers = []
    for name, value in fields:
        if name.lower() == "status":
            status = parse_status(value)
        else:
            headers.append((name, value))
    return Answer(status, headers, data[body_at:])


def encode_request(method: str, url: str, headers: Headers, body: bytes = b"") -> bytes:
    """A ``fetch`` sub-request as the guest writes it: ``METHOD URL``, headers, blank line, body."""
    lines = [f"{method} {url}", *(f"{n}: {v}" for n, v in headers)]
    return ("\n".join(lines) + "\n\n").encode("latin-1") + body


def parse_request(data: bytes) -> tuple[str, str, Headers, bytes]:
    """The inverse of :func:`encode_request` (raises :class:`BadOutput`)."""
    nl = data.find(b"\n")
    if nl < 0:
        data += b"\n\n"
        nl = data.find(b"\n")
    first = data[:nl].decode("latin-1").strip()
    method, _, url = first.partition(" ")
    url = url.strip()
    if not method.isalpha() or not url or any(c.isspace() for c in url):
        raise BadOutput(f"bad request line {first[:80]!r}")
    rest = data[nl + 1 :]
    if not rest.strip():
        return method.upper(), url, [], b""
    fields, body_at = split_head(rest)
    return method.upper(), url, fields, rest[body_at:]
