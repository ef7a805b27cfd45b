"""`verge demo` / `make demo`: the sample origin plus an edge in front of it, one command.

The configuration is embedded (see DEMO_CONFIG) so the demo needs no file; it shows the
three kinds of rules: static (long TTL), API (sorted query keys) and dynamic (micro-cache).
"""

from __future__ import annotations

import atexit
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx

from verge.config import parse_config
from verge.edge.node import NodeOptions, check_port_free, run_node

DEMO_CONFIG = """
access_log: "-"
services:
  - name: demo
    hosts: ["demo.verge.test", "localhost"]
    default: true
    origins: ["{origin}"]
    health_check: {{path: /, interval: 5}}
    rules:
      - {{path: /static/, kind: static}}
      - {{path: /api/, kind: api}}
      - {{path: /dynamic/, kind: dynamic, micro_cache: 1}}
      - {{path: /old-home, redirect: {{to: /, status: 301}}}}
"""


def _wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"error: {url} did not come up within {timeout:.0f}s")


def run_demo(listen: tuple[str, int], origin_listen: tuple[str, int], state_dir: Path) -> None:
    ohost, oport = origin_listen
    check_port_free(ohost, oport)
    origin = subprocess.Popen([sys.executable, "-m", "verge.cli", "demo-origin", "--listen",
                               f"{ohost}:{oport}"])
    atexit.register(origin.terminate)
    origin_url = f"http://{ohost}:{oport}"
    _wait_http(origin_url + "/")
    config = parse_config(DEMO_CONFIG.format(origin=origin_url), "<demo config>")
    token = os.environ.get("VERGE_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    host, port = listen
    state_dir.mkdir(parents=True, exist_ok=True)
    options = NodeOptions(listen_host=host, listen_port=port, admin_host=host,
                          admin_port=port + 1, admin_token=token,
                          cache_dir=str((state_dir / "cache").resolve()), workers=2,
                          access_log=None)
    check_port_free(host, port)
    check_port_free(host, port + 1)
    edge_url = f"http://{host}:{port}"
    print(f"""
  Verge demo
    edge          {edge_url}/            (try: curl -i {edge_url}/static/app.js, twice)
    origin        {origin_url}/
    admin         http://{host}:{port + 1}/metrics
    admin token   {token}
    purge         verge purge --admin http://{host}:{port + 1} --token {token} {edge_url}/static/app.js
  Ctrl-C stops everything.
""", flush=True)
    try:
        run_node(options, config)
    finally:
        origin.terminate()
