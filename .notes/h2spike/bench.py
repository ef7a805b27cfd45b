"""Alternating h2load rounds; server pinned to CPU 0, h2load to CPU 1; CPU us/request from /proc.

usage: bench.py ROUNDS name=port:pid [name=port:pid ...]
"""
import json, os, re, statistics, subprocess, sys, time

TICK = os.sysconf("SC_CLK_TCK")
NICE = ["nice", "-n", os.environ.get("NICE", "0")]
ALL = {"c10m10": ["-c10", "-m10"], "c64m1": ["-c64", "-m1"], "c10m100": ["-c10", "-m100"]}
LOADS = {k: ALL[k] for k in os.environ.get("LOADS", "c10m10,c64m1").split(",")}

def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop(); out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(x) for x in open(f"/proc/{p}/task/{t}/children").read().split()]
        except FileNotFoundError:
            pass
    return out

def cpu_s(pid):
    total = 0
    for p in tree(pid):
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except FileNotFoundError:
            pass
    return total / TICK

def h2load(port, load, n):
    cmd = NICE + ["taskset", "-c", "1", "h2load", *LOADS[load], "-n", str(n), "--connection-active-timeout=30",
           f"https://127.0.0.1:{port}/bench/obj"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    two = re.search(r"status codes: (\d+) 2xx", out)
    tls = re.search(r"TLS Protocol: (\S+)", out); alpn = re.search(r"Application protocol: (\S+)", out)
    if not m or int(two.group(1)) != n:
        print(out, file=sys.stderr); raise SystemExit(f"h2load failed on port {port}")
    return float(m.group(3)), int(req.group(4)), (tls and tls.group(1), alpn and alpn.group(1))

def measure(port, pid, load, n):
    c0, t0 = cpu_s(pid), time.monotonic()
    rate, ok, proto = h2load(port, load, n)
    c1 = cpu_s(pid)
    return {"rps": rate, "cpu_us": (c1 - c0) / ok * 1e6, "proto": proto, "share": (c1 - c0) / (time.monotonic() - t0)}

def main():
    rounds = int(sys.argv[1])
    dur = float(os.environ.get("DUR", "5"))
    cont = []
    for a in sys.argv[2:]:
        name, rest = a.split("="); port, pid = rest.split(":")
        cont.append((name, int(port), int(pid)))
    for _, _, pid in cont:  # same priority for every thread of every server
        for p in tree(pid):
            for t in os.listdir(f"/proc/{p}/task"):
                subprocess.run(["renice", "-n", os.environ.get("NICE", "0"), "-p", t], capture_output=True)
    print("# loadavg", open("/proc/loadavg").read().strip(), "nice", os.environ.get("NICE", "0"), flush=True)
    sizes = {}
    for name, port, pid in cont:  # warm up and size each run to ~DUR seconds
        for load in LOADS:
            rate, _, proto = h2load(port, load, 4000)
            sizes[(name, load)] = max(10000, min(300000, int(rate * dur) // 1000 * 1000))
            print(f"# {name} {load}: probe {rate:.0f} req/s {proto}, n={sizes[(name, load)]}", flush=True)
    res = {}
    for r in range(rounds):
        for name, port, pid in cont:
            for load in LOADS:
                s = measure(port, pid, load, sizes[(name, load)])
                res.setdefault((name, load), []).append(s)
                print(f"[load {open('/proc/loadavg').read().split()[0]}] round {r+1} {name:14s} {load:7s} {s['rps']:9.0f} req/s {s['cpu_us']:6.1f} us/req  server-cpu-share {s['share']:.2f}", flush=True)
    print("\n# medians")
    summary = {}
    for (name, load), ss in res.items():
        rps = statistics.median(x["rps"] for x in ss); cpu = statistics.median(x["cpu_us"] for x in ss)
        summary[f"{name}/{load}"] = {"rps": rps, "cpu_us": cpu, "runs": [round(x["rps"]) for x in ss]}
        print(f"{name:14s} {load:7s} {rps:9.0f} req/s  {cpu:6.1f} us/req  runs={[round(x['rps']) for x in ss]}")
    out = os.environ.get("OUT")
    if out:
        json.dump(summary, open(out, "w"), indent=1)

main()
