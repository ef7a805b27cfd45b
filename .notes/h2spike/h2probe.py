"""Probe an h2 server: 'reset PORT N' (rapid reset: HEADERS+RST_STREAM pairs), 'goaway PORT' (wait for GOAWAY)."""
import socket, ssl, sys, time, select
import h2.connection, h2.config, h2.events, h2.exceptions

def connect(port):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection(); s.sendall(c.data_to_send())
    return s, c

HDRS = [(":method", "GET"), (":path", "/bench/obj"), (":scheme", "https"), (":authority", "127.0.0.1")]

def pump(s, c, timeout=0.0):
    evs = []
    while select.select([s], [], [], timeout)[0] or s.pending():
        data = s.recv(65536)
        if not data:
            return evs, True
        try:
            evs += c.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            evs.append(("protoerr", str(e)))
        timeout = 0.0
        out = c.data_to_send()
        if out:
            try: s.sendall(out)
            except OSError: return evs, True
    return evs, False

def reset(port, n):
    s, c = connect(port)
    pump(s, c, 0.2)
    sent, closed, goaway, answered = 0, False, None, 0
    t0 = time.monotonic()
    while sent < n and not closed:
        for _ in range(200):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, HDRS, end_stream=True); c.reset_stream(sid); sent += 1
        try: s.sendall(c.data_to_send())
        except OSError: closed = True; break
        evs, closed = pump(s, c)
        for e in evs:
            if isinstance(e, h2.events.ConnectionTerminated): goaway = (e.error_code, e.last_stream_id)
            if isinstance(e, h2.events.ResponseReceived): answered += 1
        if goaway: break
    evs, closed2 = pump(s, c, 0.5)
    for e in evs:
        if isinstance(e, h2.events.ConnectionTerminated): goaway = (e.error_code, e.last_stream_id)
        if isinstance(e, h2.events.ResponseReceived): answered += 1
    print(f"port {port}: sent {sent} HEADERS+RST pairs in {time.monotonic()-t0:.2f}s; responses seen {answered}; "
          f"GOAWAY={goaway}; closed={closed or closed2}")

def goaway(port):
    s, c = connect(port)
    sid = c.get_next_available_stream_id(); c.send_headers(sid, HDRS, end_stream=True); s.sendall(c.data_to_send())
    pump(s, c, 0.5)
    print("READY", flush=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        evs, closed = pump(s, c, 0.2)
        for e in evs:
            if isinstance(e, h2.events.ConnectionTerminated):
                print(f"port {port}: GOAWAY error={e.error_code!r} last_stream={e.last_stream_id} after {time.monotonic()-t0:.2f}s", flush=True)
        if closed:
            print(f"port {port}: connection closed after {time.monotonic()-t0:.2f}s", flush=True); return
    print(f"port {port}: no close within 10s")

if sys.argv[1] == "reset": reset(int(sys.argv[2]), int(sys.argv[3]))
else: goaway(int(sys.argv[2]))
