"""Request smuggling and framing corpus: a real edge in front of a raw-socket recording origin.

The security finding behind this file: for a cacheable GET the edge dropped the client's body
but forwarded its Content-Length, so the origin read the next request on the pooled
connection as that body. Every case here sends exact bytes to the edge and then checks, from
the origin's own strict framing (tests/edge/rawhttp.py), that the origin never saw two
requests where the client sent one: no more requests than the edge accepted, only the
method+target pairs the client sent, only the bodies the client framed, nothing it could not
frame. A plain GET on a fresh connection afterwards must still get its own object.

Expected policy (nginx-like strictness): ambiguous framing is a 400 (or 501/413/505) and a
closed connection, never a guess; a GET or HEAD with a body is forwarded with that body and
not cached; the authority of an absolute-form target wins over Host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import EdgeProcess
from tests.edge.rawhttp import (
    ABORTED,
    ORIGIN_FAILURE,
    Exchange,
    RawResponse,
    RecordedRequest,
    RecordingOrigin,
    exchange,
    named_origin,
    named_target,
)

pytestmark = pytest.mark.timeout(30)

CONFIG = """
limits:
  max_body_bytes: 64KiB
  header_timeout: 2s
  body_timeout: 2s
origin_timeouts:
  first_byte: 3s
services:
  - name: t
    hosts: ["t.test"]
    origins: ["{site}"]
  - name: other
    hosts: ["other.test"]
    origins: ["{other}"]
"""

BODY_LIMIT = 64 * 1024  # limits.max_body_bytes above
H = b"Host: t.test\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
REQUEST_BYTES = re.compile(rb"(GET|POST|HEAD|PUT|DELETE|OPTIONS) /|HTTP/1\.")


@dataclass
class Stack:
    edge: EdgeProcess
    site: RecordingOrigin  # the origin of t.test
    other: RecordingOrigin  # the origin of other.test


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with RecordingOrigin("site") as site, RecordingOrigin("other") as other:
        workdir = tmp_path_factory.mktemp("smuggling")
        edge = EdgeProcess(workdir, config=CONFIG.format(site=site.url, other=other.url))
        edge.start()
        try:
            yield Stack(edge, site, other)
        finally:
            edge.stop()


# ----- the corpus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Bytes a client sends in one write and what must come of them.

    ``{P}`` in the bytes and targets stands for the case's own path prefix, so that no two
    cases share a cache entry.
    """

    id: str
    raw: bytes
    statuses: tuple[frozenset[int], ...]  # the allowed status of each response, in order
    closes: bool = False  # the edge must close the connection after the last response
    sent: tuple[tuple[str, str], ...] = ()  # the (method, target) of each request head sent
    bodies: tuple[bytes, ...] = ()  # the request bodies as the client framed them
    forwarded: tuple[tuple[str, bytes], ...] | None = None  # exact (target, body) at the origin
    after: str = ""  # "uncached": the next plain GET of sent[0] goes to the origin; "cached"
    methods: tuple[str, ...] = ()  # request methods, for HEAD responses without a body


def accept(id: str, raw: bytes, sent, *, bodies=(), forwarded=None, after="", methods=()) -> Case:
    """A request (or pipeline) the edge must serve: 200 for each request sent."""
    return Case(
        id=id,
        raw=raw,
        statuses=tuple(frozenset({200}) for _ in sent),
        sent=tuple(sent),
        bodies=tuple(bodies),
        forwarded=None if forwarded is None else tuple(forwarded),
        after=after,
        methods=tuple(methods),
    )


def reject(id: str, raw: bytes, *codes: int, closes: bool = True) -> Case:
    """A request the edge must refuse itself (status in ``codes``, default 400): the origin
    sees nothing."""
    return Case(id=id, raw=raw, statuses=(frozenset(codes or (400,)),), closes=closes)


def either(id: str, raw: bytes, sent, bodies=(), closes: bool = False) -> Case:
    """Unambiguous but unusual input: refused with a 400, or served exactly as the client
    framed it."""
    return Case(
        id=id,
        raw=raw,
        statuses=(frozenset({200, 400}),),
        closes=closes,
        sent=tuple(sent),
        bodies=tuple(bodies),
        forwarded=tuple(
            (t, b) for (_, t), b in zip(sent, bodies or [b""] * len(sent), strict=True)
        ),
    )


def post(
    headers: bytes,
    body: bytes,
    target: bytes = b"{P}/a",
    method: bytes = b"POST",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + H + headers + b"\r\n" + body


def get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + H + extra + b"\r\n"


def te_cl_body() -> bytes:
    smuggled = b"GPOST /smuggled HTTP/1.1\r\nHost: t.test\r\nContent-Length: 15\r\n\r\nx=1"
    return b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n"


CURL_GET_WITH_BODY = (
    b"GET {P}/static/app.js?a=1 HTTP/1.1\r\nHost: t.test\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: 5\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n\r\nhello"
)

GET_WITH_BODY = [
    accept(
        "get-cl-body",
        post(b"Content-Length: 5\r\n", b"hello", b"{P}/a?x=1", b"GET"),
        [("GET", "{P}/a?x=1")],
        bodies=[b"hello"],
        forwarded=[("{P}/a?x=1", b"hello")],
        after="uncached",
    ),
    accept(
        "get-chunked-body",
        post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO, method=b"GET"),
        [("GET", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
        after="uncached",
    ),
    accept(
        "head-cl-body",
        post(b"Content-Length: 5\r\n", b"hello", method=b"HEAD"),
        [("HEAD", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
        after="uncached",
        methods=["HEAD"],
    ),
    accept(
        "get-cl-zero",
        post(b"Content-Length: 0\r\n", b"", method=b"GET"),
        [("GET", "{P}/a")],
        forwarded=[("{P}/a", b"")],
        after="cached",
    ),
    accept(
        "get-body-curl-shaped",
        CURL_GET_WITH_BODY,
        [("GET", "{P}/static/app.js?a=1")],
        bodies=[b"hello"],
        forwarded=[("{P}/static/app.js?a=1", b"hello")],
        after="uncached",
    ),
    accept(
        "get-body-is-a-request",
        post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED, method=b"GET"),
        [("GET", "{P}/a")],
        bodies=[SMUGGLED],
        forwarded=[("{P}/a", SMUGGLED)],
        after="uncached",
    ),
    accept(
        "get-body-then-pipelined-get",
        post(b"Content-Length: 5\r\n", b"hello", method=b"GET") + get(b"{P}/b"),
        [("GET", "{P}/a"), ("GET", "{P}/b")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello"), ("{P}/b", b"")],
        after="uncached",
    ),
]

CL_TE = [
    reject("cl-te", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG")),
    reject(
        "cl-te-smuggles-request",
        post(
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED)),
            b"0\r\n\r\n" + SMUGGLED,
        ),
    ),
    reject("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", te_cl_body())),
    reject(
        "cl-te-lowercase-names",
        post(b"content-length: 6\r\ntransfer-encoding: chunked\r\n", b"0\r\n\r\nG"),
    ),
    reject(
        "cl-te-uppercase-value",
        post(b"Content-Length: 6\r\nTransfer-Encoding: CHUNKED\r\n", b"0\r\n\r\nG"),
    ),
    reject(
        "get-cl-te",
        post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG", method=b"GET"),
    ),
    # RFC 9112 §6.1: TE in HTTP/1.0 is faulty framing; served at most once, then closed
    either(
        "te-http10",
        post(b"Transfer-Encoding: chunked\r\n", CHUNKED_HELLO, version=b"HTTP/1.0"),
        [("POST", "{P}/a")],
        [b"hello"],
        closes=True,
    ),
]

TE_TE = [
    reject(
        "te-chunked-identity",
        post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_HELLO),
        400,
        501,
    ),
    reject("te-identity", post(b"Transfer-Encoding: identity\r\n", b"hello"), 400, 501),
    reject("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", CHUNKED_HELLO), 400, 501),
    reject(
        "te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED_HELLO), 400, 501
    ),
    reject(
        "te-duplicate",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO),
        400,
        501,
    ),
    reject(
        "te-duplicate-with-cl",
        post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 5\r\n",
            b"0\r\n\r\n",
        ),
        400,
        501,
    ),
    reject("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", CHUNKED_HELLO)),
    reject(
        "te-space-before-colon-with-cl",
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    ),
    # HTAB is OWS (RFC 9110 §5.6.3): chunked, framed as such, or refused; with a CL: 400
    either(
        "te-tab-ows",
        post(b"Transfer-Encoding:\tchunked\r\n", CHUNKED_HELLO),
        [("POST", "{P}/a")],
        [b"hello"],
    ),
    reject(
        "te-tab-ows-with-cl",
        post(b"Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    ),
    reject("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", CHUNKED_HELLO), 400, 501),
    reject(
        "te-underscore-with-cl",
        post(b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    ),
    reject("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_HELLO)),
    reject(
        "te-obs-fold-with-cl",
        post(b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
    ),
    accept(
        "te-trailing-space",
        post(b"Transfer-Encoding: chunked  \r\n", CHUNKED_HELLO),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
    # trailing HTAB is OWS too, but llhttp refuses it: a 400 is as safe as serving it
    either(
        "te-trailing-tab",
        post(b"Transfer-Encoding: chunked\t\r\n", CHUNKED_HELLO),
        [("POST", "{P}/a")],
        [b"hello"],
    ),
    accept(
        "te-capitalised-value",
        post(b"Transfer-Encoding: Chunked\r\n", CHUNKED_HELLO),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
]

CONTENT_LENGTH = [
    reject("cl-two-values", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    reject("cl-two-same-values", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    reject("cl-list-same", post(b"Content-Length: 5, 5\r\n", b"hello")),
    reject("cl-plus", post(b"Content-Length: +5\r\n", b"hello")),
    reject("cl-minus", post(b"Content-Length: -1\r\n", b"hello")),
    reject("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello")),
    reject("cl-inner-space", post(b"Content-Length: 5 5\r\n", b"hello")),
    reject("cl-empty", post(b"Content-Length: \r\n", b"hello")),
    reject("cl-space-before-colon", post(b"Content-Length : 5\r\n", b"hello")),
    reject("cl-huge", post(b"Content-Length: 99999999999999999999\r\n", b"hello"), 400, 413),
    reject("cl-over-limit", post(b"Content-Length: %d\r\n" % (BODY_LIMIT + 1), b"hello"), 413),
    reject(
        "get-cl-huge",
        post(b"Content-Length: 99999999999999999999\r\n", b"", method=b"GET"),
        400,
        413,
    ),
]

LINES = [
    reject("obs-fold", get(b"{P}/a", b"X-Foo: a\r\n b\r\n")),
    reject("obs-fold-first-line", b"GET {P}/a HTTP/1.1\r\n X-Foo: a\r\n" + H + b"\r\n"),
    either("bare-lf-everywhere", b"GET {P}/a HTTP/1.1\nHost: t.test\n\n", [("GET", "{P}/a")]),
    either("bare-lf-last-line", b"GET {P}/a HTTP/1.1\r\nHost: t.test\r\n\n", [("GET", "{P}/a")]),
    reject(
        "bare-lf-hides-te",
        post(b"X: y\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    ),
    reject(
        "bare-cr-hides-te",
        post(b"X: y\rTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    ),
    reject("nul-in-value", get(b"{P}/a", b"X-Foo: a\x00b\r\n")),
    reject("cr-in-value", get(b"{P}/a", b"X-Foo: a\rb\r\n")),
]

CHUNKS = [
    accept(
        "chunk-extension",
        post(b"Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
    accept(
        "chunk-extension-quoted",
        post(b"Transfer-Encoding: chunked\r\n", b'5;a="b c"\r\nhello\r\n0;z\r\n\r\n'),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
    accept(
        "chunk-trailer",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
    accept(
        "chunk-size-leading-zeros",
        post(b"Transfer-Encoding: chunked\r\n", b"0005\r\nhello\r\n0\r\n\r\n"),
        [("POST", "{P}/a")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello")],
    ),
    reject("chunk-size-zz", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n")),
    reject(
        "chunk-size-inner-space",
        post(b"Transfer-Encoding: chunked\r\n", b"5 5\r\nhello\r\n0\r\n\r\n"),
    ),
    reject(
        "chunk-size-negative", post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n")
    ),
    reject("chunk-size-empty", post(b"Transfer-Encoding: chunked\r\n", b"\r\nhello\r\n0\r\n\r\n")),
    reject("chunk-size-0x", post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n")),
    reject(
        "chunk-size-17-hex-digits",
        post(b"Transfer-Encoding: chunked\r\n", b"f" * 17 + b"\r\nhello\r\n0\r\n\r\n"),
        400,
        413,
    ),
    reject(
        "chunk-size-over-limit",
        # the chunk size itself is not visible to the edge (llhttp keeps it): the 413 comes
        # when the chunk's data passes the limit
        post(b"Transfer-Encoding: chunked\r\n",
             b"%x\r\n" % (BODY_LIMIT * 16) + b"x" * (BODY_LIMIT + 100)),
        413,
    ),
    reject(
        "chunked-body-over-limit",
        post(
            b"Transfer-Encoding: chunked\r\n",
            (b"%x\r\n" % 40_000 + b"x" * 40_000 + b"\r\n") * 2 + b"0\r\n\r\n",
        ),
        413,
    ),
    reject(
        "chunk-data-without-crlf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ),
    reject("chunk-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n")),
]

TARGETS = [
    reject("get-star", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400, 405, 501, closes=False),
    reject("head-star", b"HEAD * HTTP/1.1\r\n" + H + b"\r\n", 400, 405, 501, closes=False),
    reject(
        "connect",
        b"CONNECT t.test:443 HTTP/1.1\r\nHost: t.test:443\r\n\r\n",
        400,
        405,
        501,
        closes=False,
    ),
    reject("trace", b"TRACE {P}/a HTTP/1.1\r\n" + H + b"\r\n", 400, 405, 501, closes=False),
    reject("fragment", get(b"{P}/a#b"), closes=False),
    reject("target-without-slash", get(b"c/a"), closes=False),
    reject("absolute-form-userinfo", get(b"http://user:pw@t.test{P}/a"), closes=False),
    reject("absolute-form-ftp", get(b"ftp://t.test{P}/a"), closes=False),
    reject("absolute-form-unknown-authority", get(b"http://nowhere.test{P}/a"), 404, closes=False),
]

HOSTS = [
    reject("host-space", b"GET {P}/a HTTP/1.1\r\nHost: t.test x\r\n\r\n", closes=False),
    reject("host-slash", b"GET {P}/a HTTP/1.1\r\nHost: t.test/x\r\n\r\n", closes=False),
    reject("host-userinfo", b"GET {P}/a HTTP/1.1\r\nHost: user@t.test\r\n\r\n", closes=False),
    reject("host-empty", b"GET {P}/a HTTP/1.1\r\nHost: \r\n\r\n", closes=False),
    reject("host-twice", get(b"{P}/a", H), closes=False),
    reject("host-list", b"GET {P}/a HTTP/1.1\r\nHost: t.test, t.test\r\n\r\n", closes=False),
]

VERSIONS = [
    reject("http-2.0", b"GET {P}/a HTTP/2.0\r\n" + H + b"\r\n", 505, 400),
    reject("http-1.2", b"GET {P}/a HTTP/1.2\r\n" + H + b"\r\n", 505, 400),
    reject("http-0.9", b"GET {P}/a\r\n\r\n", 505, 400),
    reject("http-1.1x", b"GET {P}/a HTTP/1.1x\r\n" + H + b"\r\n", 505, 400),
    reject("http-lowercase", b"GET {P}/a http/1.1\r\n" + H + b"\r\n", 505, 400),
]

PIPELINES = [
    accept(
        "pipelined-three-gets",
        get(b"{P}/a") + get(b"{P}/b") + get(b"{P}/a"),
        [("GET", "{P}/a"), ("GET", "{P}/b"), ("GET", "{P}/a")],
    ),
    accept(
        "pipelined-post-then-get",
        post(b"Content-Length: 5\r\n", b"hello") + get(b"{P}/b"),
        [("POST", "{P}/a"), ("GET", "{P}/b")],
        bodies=[b"hello"],
        forwarded=[("{P}/a", b"hello"), ("{P}/b", b"")],
    ),
    Case(  # the good request is answered, then the bad one gets its 400 and the close
        id="pipelined-get-then-cl-te",
        raw=get(b"{P}/a")
        + post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG")
        + SMUGGLED,
        statuses=(frozenset({200}), frozenset({400})),
        closes=True,
        sent=(("GET", "{P}/a"),),
    ),
]

CORPUS = (
    GET_WITH_BODY
    + CL_TE
    + TE_TE
    + CONTENT_LENGTH
    + LINES
    + CHUNKS
    + TARGETS
    + HOSTS
    + VERSIONS
    + PIPELINES
)


# ----- checks ---------------------------------------------------------------------------------


def bind(case: Case) -> tuple[bytes, str]:
    prefix = f"/c/{case.id}"
    return case.raw.replace(b"{P}", prefix.encode()), prefix


def sub(text: str, prefix: str) -> str:
    return text.replace("{P}", prefix)


def fetch(stack: Stack, target: str, host: str = "t.test") -> RawResponse | None:
    """A plain GET on a fresh connection; its response, or None if none came."""
    got = exchange(
        stack.edge.port,
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        expect=1,
        grace=0,
    )
    return got.responses[0] if got.responses else None


def describe(got: Exchange, records: list[RecordedRequest]) -> str:
    lines = [
        f"edge answered {got.statuses} closed={got.closed} reset={got.reset}"
        f" leftover={got.leftover[:120]!r}"
    ]
    lines += [f"  origin: {r.describe()}" for r in records] or ["  origin: nothing"]
    return "\n".join(lines)


def response_problems(case: Case, got: Exchange, prefix: str) -> list[str]:
    problems = []
    statuses = got.statuses
    wanted = [sorted(s) for s in case.statuses]
    if len(statuses) != len(case.statuses) or any(
        s not in allowed for s, allowed in zip(statuses, case.statuses, strict=False)
    ):
        problems.append(f"statuses {statuses}, expected one of {wanted} per response")
    if case.closes and statuses and statuses[-1] in case.statuses[-1] and not got.closed:
        problems.append(f"connection left open after {statuses[-1]}")
    if got.reset and not statuses:
        problems.append("connection reset without a response")
    for index, response in enumerate(got.responses):
        if response.body.startswith(ORIGIN_FAILURE.encode()):
            problems.append(
                f"response {index} ({response.status}) is the origin's own framing "
                f"error, relayed: {response.body!r}"
            )
        if response.status == 200 and response.body and index < len(case.sent):
            target = sub(case.sent[index][1], prefix)
            if named_target(response.body) != target:
                problems.append(f"response {index} is {response.body!r}, not {target}'s")
    return problems


def origin_problems(
    case: Case, got: Exchange, records: list[RecordedRequest], prefix: str
) -> list[str]:
    """The invariant: the origin saw no request, body or framing the client did not send."""
    problems = [
        f"origin could not frame: {r.describe()}"
        for r in records
        if r.problem not in (None, ABORTED)
    ]
    complete = [r for r in records if r.problem is None]
    accepted = sum(1 for s in got.statuses if s < 400)
    if len(complete) > accepted:
        problems.append(f"origin saw {len(complete)} requests, the edge accepted {accepted}")
    sent = {(m, sub(t, prefix)) for m, t in case.sent}
    sent |= {("GET", t) for m, t in sent if m == "HEAD"}  # a HEAD may be filled with a GET
    for record in complete:
        if not case.sent:
            problems.append(f"edge forwarded a request it should refuse: {record.describe()}")
        elif (record.method, record.target) not in sent:
            problems.append(f"origin saw a request the client never sent: {record.describe()}")
        smuggled = REQUEST_BYTES.search(record.body) and record.body not in case.bodies
        if smuggled or (case.sent and record.body and record.body not in case.bodies):
            inside = " (request bytes inside)" if smuggled else ""
            problems.append(
                f"origin saw a body the client never framed{inside}: {record.describe()}"
            )
        if record.chunk_extensions:
            problems.append(f"chunk extensions forwarded as-is: {record.describe()}")
        hosts = [v for n, v in record.headers if n.lower() == "host"]
        if hosts != ["t.test"]:
            problems.append(f"origin got Host fields {hosts}")
    if case.forwarded is not None and all(s < 300 for s in got.statuses) and got.statuses:
        expected = [(sub(t, prefix), b) for t, b in case.forwarded]
        seen = [(r.target, r.body) for r in complete]
        if seen != expected:
            problems.append(f"origin saw {seen}, expected exactly {expected}")
    return problems


def belongs(record: RecordedRequest, prefix: str) -> bool:
    """Whether a record may come from this case: its own paths (not the follow-up), or
    anything outside the corpus's /c/ tree (smuggled targets, unparseable heads); a late
    record of an earlier case is not this case's."""
    target = record.target
    return (f"{prefix}/" in target and target != f"{prefix}/after") or "/c/" not in target


def fresh_get_problems(stack: Stack, prefix: str) -> list[str]:
    """Afterwards a plain GET on a fresh connection gets its own object (no poisoned pool)."""
    response = fetch(stack, f"{prefix}/after")
    if (
        response is None
        or response.status != 200
        or named_target(response.body) != f"{prefix}/after"
    ):
        return [f"follow-up GET {prefix}/after got {response}"]
    return []


def cache_problems(stack: Stack, case: Case, prefix: str) -> list[str]:
    """A GET with a body left nothing in the cache; a GET with Content-Length: 0 did."""
    target = sub(case.sent[0][1], prefix)
    mark = stack.site.mark()
    response = fetch(stack, target)
    went = len(stack.site.since(mark))
    cache_status = (response.header("cache-status") or "") if response else ""
    if response is None or named_target(response.body) != target:
        return [f"follow-up GET {target} got {response}"]
    if case.after == "uncached" and (not went or "hit" in cache_status.split("; ")):
        return [
            f"a GET with a body was cached: the next GET {target} got Cache-Status "
            f"{cache_status!r}, origin saw it {went} times"
        ]
    if case.after == "cached" and went:
        return [f"a GET with Content-Length: 0 was not cached (Cache-Status {cache_status!r})"]
    return []


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_framing_corpus(stack, case):
    raw, prefix = bind(case)
    methods = case.methods or [raw.split(b" ", 1)[0].decode("latin-1")] * len(case.statuses)
    mark, other_mark = stack.site.mark(), stack.other.mark()
    got = exchange(
        stack.edge.port,
        raw,
        expect=len(case.statuses),
        methods=methods,
        grace=0.3 if case.closes else 0.1,
    )
    problems = response_problems(case, got, prefix)
    problems += fresh_get_problems(stack, prefix)  # also lets late forwards reach the origin
    records = [r for r in stack.site.since(mark) if belongs(r, prefix)]
    problems += origin_problems(case, got, records, prefix)
    problems += [
        f"other.test's origin saw {r.describe()}"
        for r in stack.other.since(other_mark)
        if f"{prefix}/" in r.target
    ]
    if case.after:
        problems += cache_problems(stack, case, prefix)
    assert not problems, "\n".join(problems) + "\n" + describe(got, records)


# ----- the scenarios from the report ----------------------------------------------------------


def seen_under(origin: RecordingOrigin, mark: int, path: str) -> list[tuple]:
    """(method, target, Host, body, problem) of what ``origin`` recorded under ``path``."""
    return [
        (r.method, r.target, r.header("host"), r.body, r.problem)
        for r in origin.since(mark)
        if path in r.target
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_report_get_with_body_then_victim(stack):
    """`curl -X GET -d hello .../static/app.js?a=1` then `curl .../static/app.js?a=2`: the
    victim gets its own object, the origin sees two requests and the body only on the first."""
    base = f"{stack.edge.url}/report/static/app.js"
    mark = stack.site.mark()
    curl = ["curl", "-sS", "--max-time", "5", "-H", "Host: t.test", "-w", "\n%{http_code}"]
    attacker = subprocess.run(
        [*curl, "-X", "GET", "-d", "hello", f"{base}?a=1"], capture_output=True, timeout=10
    )
    victim = subprocess.run([*curl, f"{base}?a=2"], capture_output=True, timeout=10)
    seen = seen_under(stack.site, mark, "/report/")
    victim_body, victim_status = victim.stdout.rsplit(b"\n", 1)
    assert (victim_status, named_target(victim_body)) == (b"200", "/report/static/app.js?a=2"), (
        victim.stdout,
        seen,
    )
    assert named_target(attacker.stdout.rsplit(b"\n", 1)[0]) == "/report/static/app.js?a=1", (
        attacker.stdout,
        seen,
    )
    assert seen == [
        ("GET", "/report/static/app.js?a=1", "t.test", b"hello", None),
        ("GET", "/report/static/app.js?a=2", "t.test", b"", None),
    ]


def test_absolute_form_authority_wins_over_host(stack):
    """RFC 9112 §3.2.2: `GET http://other.test/x` with `Host: t.test` is other.test's request,
    sent to other.test's origin in origin-form; its answer is not stored under t.test."""
    site_mark, other_mark = stack.site.mark(), stack.other.mark()
    got = exchange(stack.edge.port, get(b"http://other.test/abs/reflect?abs=3"), expect=1)
    seen_site = seen_under(stack.site, site_mark, "/abs/")
    seen_other = seen_under(stack.other, other_mark, "/abs/")
    assert got.statuses == [200], (got.raw, seen_site, seen_other)
    assert named_origin(got.responses[0].body) == "other", (got.responses[0].body, seen_site)
    assert seen_other == [("GET", "/abs/reflect?abs=3", "other.test", b"", None)]
    assert seen_site == []
    mine = fetch(stack, "/abs/reflect?abs=3")
    assert mine is not None and named_origin(mine.body) == "site", mine
    assert [r[1] for r in seen_under(stack.site, site_mark, "/abs/")] == ["/abs/reflect?abs=3"]


# ----- the recording origin itself ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, seen",
    [
        (get(b"/a") + get(b"/b"), [("/a", b"", None), ("/b", b"", None)]),
        (post(b"Content-Length: 5\r\n", b"hello", b"/a"), [("/a", b"hello", None)]),
        (
            post(b"Transfer-Encoding: chunked\r\n", b"5;x=y\r\nhello\r\n0\r\n\r\n", b"/a"),
            [("/a", b"hello", None)],
        ),
        (
            post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO, b"/a"),
            [("/a", b"", "both Transfer-Encoding and Content-Length")],
        ),
        (get(b"/a", b"X: a\r\n b\r\n"), [("", b"", "obs-fold line b' b'")]),
        (
            post(b"Content-Length: 5\r\n", b"he", b"/a"),
            [("/a", b"", "stalled mid-message for 0.2s")],
        ),
    ],
    ids=["pipelined", "content-length", "chunked", "cl-and-te", "obs-fold", "stalled-body"],
)
def test_recording_origin_frames_strictly(raw, seen):
    """The origin's view must be trustworthy: it frames exactly, and flags what it cannot."""
    with RecordingOrigin(stall=0.2) as origin:
        got = exchange(origin.port, raw, expect=len(seen), timeout=2)
        records = origin.requests
    assert [(r.target, r.body, r.problem) for r in records] == seen
    assert len(got.responses) == len(seen)
