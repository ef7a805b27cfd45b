"""Design B with the real pipeline: Verge's EdgeApp behind the PyO3 hyper server (v2 build: headers passed).
MODE callback: handle_fast called from the tokio thread under the GIL (misses: run on the loop, tokio thread waits).
MODE queue: eventfd-woken batches on the asyncio loop; misses become tasks."""
import asyncio, os, sys
sys.path.insert(0, "/tmp/h2spike/v2"); sys.path.insert(1, "/work/main")
sys.path.append("/work/main/.venv/lib/python3.11/site-packages")
import uvloop, vh2
from verge.edge.worker import Worker
from verge.edge.node import NodeOptions, build_config
from verge.http.message import Request
from verge.http.server import ResponseWriter, FileResponse
from verge.http.h2server import parse_wire_head
mode, PORT = sys.argv[1], int(sys.argv[2])

class Collect:
    def __init__(self): self.parts = []
    def write_raw(self, b): self.parts.append(b)
    def write_many(self, bs): self.parts.extend(bs)
    async def drain(self): pass
    async def sendfile(self, fd, off, n): self.parts.append(os.pread(fd, n, off))

_heads = {}
def head_of(head):
    got = _heads.get(head)
    if got is None:
        status, fields = parse_wire_head(head)
        got = (status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields if k != b"content-length"])
        if len(_heads) < 4096: _heads[head] = got
    return got

def fast(edge, method, target, authority, headers):
    req = Request(method, target, headers=[("host", authority), *headers] if authority else headers,
                  version="2", client="127.0.0.1")
    req.scheme = "https"
    r = edge.handle_fast(req)
    if r is None: return req, None
    if type(r) is FileResponse:
        data = os.pread(r.fd, r.count, r.offset)
        if r.close_fd: os.close(r.fd)
        return req, (*head_of(r.head), data)
    if type(r) is tuple: head, body = r
    else:
        i = r.index(b"\r\n\r\n") + 4; head, body = r[:i], r[i:]
    return req, (*head_of(head), body)

async def slow(edge, req):
    sink = Collect(); req.version = "1.1"
    w = ResponseWriter(sink, req, True); await edge.handle(req, w); await w.end()
    wire = b"".join(sink.parts); i = wire.index(b"\r\n\r\n") + 4
    status, hdrs = head_of(wire[:i]); body = wire[i:]
    if b"chunked" in wire[:i].lower():
        out, rest = [], body
        while rest:
            n, _, rest = rest.partition(b"\r\n"); n = int(n, 16)
            if n == 0: break
            out.append(rest[:n]); rest = rest[n + 2:]
        body = b"".join(out); hdrs = [h for h in hdrs if h[0] != "transfer-encoding"]
    return (status, hdrs, body)

async def main():
    loop = asyncio.get_running_loop()
    opts = NodeOptions(listen_host="127.0.0.1", listen_port=0, admin_host="127.0.0.1", admin_port=0,
                       admin_token="x" * 32, cache_dir=f"/tmp/h2spike/vdata/cache-{mode}", workers=1,
                       origin="http://127.0.0.1:18080", access_log=f"/tmp/h2spike/vdata/access-{mode}.log")
    worker = Worker({"index": 0, "options": opts.public(), "config": build_config(opts).model_dump(mode="json")})
    edge = worker.app
    edge.start(); loop.create_task(worker._housekeeping())
    C, K = "/tmp/h2spike/certs/cert.der", "/tmp/h2spike/certs/key.der"
    if mode == "callback":
        def handler(method, target, authority, headers):
            req, ans = fast(edge, method, target, authority, headers)
            if ans is None:  # miss: run the async path on the loop; this tokio thread waits (spike only)
                ans = asyncio.run_coroutine_threadsafe(slow(edge, req), loop).result()
            return ans
        srv = vh2.start(PORT, C, K, handler)
    else:
        srv = vh2.start(PORT, C, K, None)
        async def later(rid, req):
            srv.respond([(rid, *(await slow(edge, req)))])
        def on_ready():
            out = []
            for rid, method, target, authority, headers in srv.take():
                req, ans = fast(edge, method, target, authority, headers)
                if ans is None: loop.create_task(later(rid, req))
                else: out.append((rid, *ans))
            if out: srv.respond(out)
        loop.add_reader(srv.fileno(), on_ready)
    print(f"verge+vh2 {mode} ready on {PORT}", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
