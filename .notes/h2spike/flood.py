"""PING / SETTINGS flood probe: send N frames without reading replies; report close, RSS and CPU."""
import socket, ssl, sys, time, select, os
from hyperframe.frame import PingFrame, SettingsFrame
kind, port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss(p):
    for line in open(f"/proc/{p}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024
def cpu(p):
    f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split(); return (int(f[11]) + int(f[12])) / 100
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
fr = PingFrame(0, opaque_data=b"12345678").serialize() if kind == "ping" else SettingsFrame(0, settings={4: 65535}).serialize()
batch = fr * 1000
r0, c0, t0, sent, how = rss(pid), cpu(pid), time.monotonic(), 0, "still open"
s.settimeout(2)
try:
    while sent < n:
        s.sendall(batch); sent += 1000
except (ConnectionResetError, BrokenPipeError, ssl.SSLError, socket.timeout) as e:
    how = f"stopped: {type(e).__name__}"
time.sleep(0.3)
if how == "still open":
    try:
        s.setblocking(False); d = s.recv(1 << 20)
        how = "closed by server" if not d else "still open"
    except (ssl.SSLWantReadError, BlockingIOError): pass
    except Exception as e: how = f"closed ({type(e).__name__})"
print(f"{kind} port {port}: sent {sent} frames in {time.monotonic()-t0:.2f}s -> {how}; RSS {r0}->{rss(pid)} MiB; CPU +{cpu(pid)-c0:.2f}s")
