"""Design A with the real pipeline: Verge's EdgeApp (handle_fast + handle) behind granian's embedded RSGI
server, in the same uvloop loop as Verge's housekeeping. Read-only use of /work/main and its venv."""
import asyncio, os, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main")
sys.path.append("/work/main/.venv/lib/python3.11/site-packages")
import uvloop
from granian.server.embed import Server
from granian.constants import Interfaces, HTTPModes, TaskImpl
from verge.edge.worker import Worker
from verge.edge.node import NodeOptions, build_config
from verge.http.message import Request
from verge.http.server import ResponseWriter, FileResponse
from verge.http.h2server import parse_wire_head

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 18470

class Collect:
    """Stands in for the protocol under ResponseWriter on the slow path: gathers HTTP/1.1 wire bytes."""
    def __init__(self): self.parts = []
    def write_raw(self, b): self.parts.append(b)
    def write_many(self, bs): self.parts.extend(bs)
    async def drain(self): pass
    async def sendfile(self, fd, off, n): self.parts.append(os.pread(fd, n, off))
    def upgrade_pending(self, r): return False

_heads = {}
def rsgi_head(head: bytes):
    """HTTP/1.1 head -> (status, RSGI header list), memoised per rendered head (deliver renders once per entry)."""
    got = _heads.get(head)
    if got is None:
        status, fields = parse_wire_head(head)
        got = (status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields if k != b"content-length"])
        if len(_heads) < 4096: _heads[head] = got
    return got

def answer_wire(proto, data):
    if type(data) is tuple:
        head, body = data
    else:
        i = data.index(b"\r\n\r\n") + 4; head, body = data[:i], data[i:]
    status, headers = rsgi_head(head)
    proto.response_bytes(status, headers, body)

def make_app(edge):
    async def app(scope, proto):
        target = scope.path + ("?" + scope.query_string if scope.query_string else "")
        headers = [("host", scope.authority or "")] if scope.authority else []
        headers += scope.headers.items()
        req = Request(scope.method, target, headers=headers, version="2", client=scope.client)
        req.scheme = "https"
        r = edge.handle_fast(req)
        if r is not None:
            if type(r) is FileResponse:
                data = os.pread(r.fd, r.count, r.offset)
                if r.close_fd: os.close(r.fd)
                status, hdrs = rsgi_head(r.head); proto.response_bytes(status, hdrs, data); return
            answer_wire(proto, r); return
        sink = Collect(); req.version = "1.1"
        w = ResponseWriter(sink, req, True)
        await edge.handle(req, w)
        await w.end()
        wire = b"".join(sink.parts)
        i = wire.index(b"\r\n\r\n") + 4
        status, hdrs = rsgi_head(wire[:i]); body = wire[i:]
        if b"chunked" in wire[:i].lower():  # de-chunk (slow path only)
            out, rest = [], body
            while rest:
                n, _, rest = rest.partition(b"\r\n"); n = int(n, 16)
                if n == 0: break
                out.append(rest[:n]); rest = rest[n + 2:]
            body = b"".join(out); hdrs = [h for h in hdrs if h[0] != "transfer-encoding"]
        proto.response_bytes(status, hdrs, body)
    return app

async def main():
    opts = NodeOptions(listen_host="127.0.0.1", listen_port=0, admin_host="127.0.0.1", admin_port=0,
                       admin_token="x" * 32, cache_dir="/tmp/h2spike/vdata/cache-vg", workers=1,
                       origin="http://127.0.0.1:18080", access_log="/tmp/h2spike/vdata/access-vg.log")
    config = build_config(opts)
    worker = Worker({"index": 0, "options": opts.public(), "config": config.model_dump(mode="json")})
    worker.app.start()
    asyncio.get_running_loop().create_task(worker._housekeeping())
    srv = Server(make_app(worker.app), address="127.0.0.1", port=PORT, interface=Interfaces.RSGI,
                 http=HTTPModes.auto, ssl_cert=Path("/tmp/h2spike/certs/cert.pem"),
                 ssl_key=Path("/tmp/h2spike/certs/key.pem"), log_level="warning", backlog=1024, task_impl=TaskImpl(os.environ.get("TASK", "asyncio")))
    asyncio.get_running_loop().add_signal_handler(15, srv.stop)
    print("verge+granian ready", PORT, flush=True)
    await srv.serve()

uvloop.run(main())
