"""The dashboard in headless Chromium against a real control-plane process.

A person's path through it: a wrong token shows the API's error, the admin token logs in, the
fleet list shows a joined node and follows its heartbeats, the stats plots draw the samples a
node pushed (for all services and for one), a purge from the form shows its sequence number and
then the acknowledgement progress, and without the vendored uPlot the page says what to run.
The data is fed the way an edge does it: a join token, POST /nodes/join, then heartbeats and
stats samples with the node credential.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.browser import headless_chromium, missing, wait_for

if missing() is not None:
    pytest.skip(str(missing()), allow_module_level=True)
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium missing: pip install selenium"
)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from verge.control.web import STATIC_DIR  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ADMIN = "vrg_admin_dashboard-test-token"
NODE = "edge-dash-1"
VENDORED = all(
    (STATIC_DIR / "vendor" / f).is_file() for f in ("uPlot.iife.min.js", "uPlot.min.css")
)
WINDOW = ("--window-size=1400,1000",)


# ---- a real control plane and a node that talks to it ------------------------------------


def start_control(db: Path) -> tuple[subprocess.Popen, str]:
    """`python -m verge.control.server` on a free port; returns the process and its URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "verge.control.server",
            "--listen",
            "127.0.0.1:0",
            "--db",
            f"sqlite:///{db}",
            "--admin-token",
            ADMIN,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not found and "verge control ready: " in line:
                found.append(line.split("verge control ready: ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(30) or not found:
        stop_process(proc)
        raise RuntimeError("control plane did not start:\n" + "".join(lines))
    return proc, found[0].rstrip("/")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def expect(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, f"{response.request.url}: {response.text}"
    return response.json() if response.content else {}


@dataclass
class ControlPlane:
    url: str
    admin: httpx.Client
    node: httpx.Client  # holds the node credential, as an edge's agent would
    reported: dict = field(default_factory=lambda: {"config_version": 1, "purge_seq": 0})
    stopped: threading.Event = field(default_factory=threading.Event)

    def heartbeat(self) -> None:
        expect(
            self.node.post(
                "/api/v1/nodes/self/heartbeat",
                json={"health": {}, "load": {"connections": 3}, **self.reported},
            ),
            200,
        )

    def keep_alive(self) -> None:
        """Heartbeat every second in the background, as an edge's agent does (the node is up)."""

        def beat() -> None:
            with httpx.Client(base_url=self.url, headers=self.node.headers, timeout=5) as client:
                while not self.stopped.wait(1.0):
                    client.post(
                        "/api/v1/nodes/self/heartbeat",
                        json={"health": {}, "load": {"connections": 3}, **self.reported},
                    )

        threading.Thread(target=beat, daemon=True).start()

    def push_stats(self, samples: list[dict]) -> None:
        r = self.node.post(
            "/api/v1/nodes/self/stats",
            json={"samples": samples},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code in (200, 202, 204), r.text


def sample(t: float, service: str, requests: int, hits: int, status_5xx: int = 0) -> dict:
    return {
        "t": t,
        "service": service,
        "requests": requests,
        "hits": hits,
        "bytes": requests * 12_000,
        "status_2xx": requests - status_5xx,
        "status_3xx": 0,
        "status_4xx": 0,
        "status_5xx": status_5xx,
        "origin_ms_sum": 25.0 * (requests - hits),
        "origin_count": requests - hits,
    }


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Iterator[ControlPlane]:
    proc, url = start_control(tmp_path_factory.mktemp("control") / "control.db")
    # the node's ports: bound, never listening, so the health monitor is refused for sure
    node_ports = [socket.socket() for _ in range(2)]
    for sock in node_ports:
        sock.bind(("127.0.0.1", 0))
    port, admin_port = (sock.getsockname()[1] for sock in node_ports)
    admin = httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {ADMIN}"})
    try:
        for name, host in (("shop", "shop.test"), ("blog", "blog.test")):
            expect(
                admin.post(
                    "/api/v1/services",
                    json={
                        "name": name,
                        "hosts": [host],
                        "origins": [{"url": "http://127.0.0.1:9"}],
                    },
                ),
                201,
            )
        join = expect(admin.post("/api/v1/tokens", json={"name": "join", "role": "join"}), 201)
        joined = expect(
            httpx.post(
                f"{url}/api/v1/nodes/join",
                timeout=10,
                headers={"Authorization": f"Bearer {join['token']}"},
                json={
                    "name": NODE,
                    "url": f"http://127.0.0.1:{port}",
                    "admin_url": f"http://127.0.0.1:{admin_port}",
                    "region": "eu-test",
                },
            ),
            200,
        )
        node = httpx.Client(
            base_url=url, timeout=10, headers={"Authorization": f"Bearer {joined['credential']}"}
        )
        plane = ControlPlane(url, admin, node)
        plane.heartbeat()
        now = time.time()
        # two minutes of traffic in complete 10 s buckets: shop serves and hits; blog has the 5xx
        plane.push_stats(
            [sample(now - 25 - 10 * i, "shop", 200 + 10 * i, 150) for i in range(12)]
            + [sample(now - 25 - 10 * i, "blog", 40, 0, status_5xx=4) for i in range(12)]
        )
        plane.keep_alive()
        yield plane
    finally:
        if "plane" in locals():
            plane.stopped.set()
        admin.close()
        stop_process(proc)
        for sock in node_ports:
            sock.close()


# ---- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with headless_chromium(WINDOW) as driver:
        yield driver


def text(driver, css: str) -> str:
    """The text of the first match, read in one script call (rows are rebuilt on refresh)."""
    return driver.execute_script(
        "const el = document.querySelector(arguments[0]); return el ? el.innerText.trim() : '';",
        css,
    )


def cells(driver, row_css: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0] + ' td')].map(td => td.innerText.trim());",
        row_css,
    )


def open_logged_out(driver, url: str) -> None:
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    wait_for(driver, lambda: driver.find_element(By.ID, "token").is_displayed(), "login form")


def log_in(driver, url: str, token: str = ADMIN) -> None:
    open_logged_out(driver, url)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for(driver, lambda: driver.find_element(By.ID, "nav").is_displayed(), "logged in")


def go(driver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#nav a[data-view="{view}"]').click()
    wait_for(driver, lambda: driver.find_element(By.ID, f"view-{view}").is_displayed(), view)


def severe_console_errors(driver) -> list[str]:
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "/api/v1/" not in e["message"]
    ]


# ---- tests -------------------------------------------------------------------------------


def test_page_and_assets_are_served(control):
    page = httpx.get(control.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/ui/app.js"' in page.text
    for asset in ("app.js", "style.css"):
        assert httpx.get(f"{control.url}/ui/{asset}", timeout=10).status_code == 200


def test_wrong_token_shows_the_api_error(browser, control):
    open_logged_out(browser, control.url)
    browser.find_element(By.ID, "token").send_keys("vrg_nope_wrong")
    browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    error = browser.find_element(By.ID, "login-error")
    wait_for(browser, error.is_displayed, "login error")
    api_error = control.admin.get(
        "/api/v1/services", headers={"Authorization": "Bearer vrg_nope_wrong"}
    )
    assert api_error.status_code == 401
    assert error.text == f"401: {api_error.json()['error']}"
    assert not browser.find_element(By.ID, "nav").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('verge.token')") is None


def test_fleet_lists_the_node_and_refreshes(browser, control):
    log_in(browser, control.url)
    assert browser.execute_script("return sessionStorage.getItem('verge.token')") == ADMIN
    row = f'#fleet-table tr[data-node="{NODE}"]'
    wait_for(browser, lambda: text(browser, row), "the node in the fleet list")
    wait_for(browser, lambda: text(browser, f"{row} .status") == "up", "node status up")
    columns = cells(browser, row)
    assert columns[3] == "eu-test"
    assert "ago" in columns[5]
    # nothing answers at the node's admin URL: the health monitor marks it down for the routers
    wait_for(browser, lambda: cells(browser, row)[2] == "down", "health column down", timeout=10)
    # a heartbeat reporting new versions shows up without reloading the page (2 s refresh)
    control.reported.update(config_version=41, purge_seq=17)
    control.heartbeat()
    wait_for(
        browser,
        lambda: cells(browser, row)[6:8] == ["41", "17"],
        "refreshed versions",
        timeout=10,
    )
    assert "1 node: 1 up" in text(browser, "#fleet-summary")
    assert severe_console_errors(browser) == []


@pytest.mark.skipif(
    not VENDORED, reason="uPlot not vendored: run `make install` (scripts/vendor-web.sh)"
)
def test_stats_plots_render_the_pushed_samples(browser, control):
    log_in(browser, control.url)
    go(browser, "stats")
    requests_plot = '.plot[data-plot="requests"]'
    wait_for(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, f"{requests_plot} canvas"),
        "a plot canvas",
    )
    for key in ("requests", "hit_ratio", "bandwidth", "errors", "origin_ms"):
        canvas = browser.find_element(By.CSS_SELECTOR, f'.plot[data-plot="{key}"] canvas')
        assert canvas.size["width"] > 100 and canvas.size["height"] > 50, key
    wait_for(
        browser,
        lambda: stroke_pixels(browser, "requests", (0x25, 0x63, 0xEB)) > 50,
        "the requests/s line drawn",
    )
    assert stroke_pixels(browser, "errors", (0xDC, 0x26, 0x26)) > 50  # blog's 5xx
    wait_for(browser, lambda: text(browser, '[data-total="5xx"] b') == "48", "all-services totals")

    # one service: shop alone had no 5xx
    Select(browser.find_element(By.ID, "stats-service")).select_by_value("shop")
    wait_for(browser, lambda: text(browser, '[data-total="5xx"] b') == "0", "shop's totals")
    assert text(browser, '[data-total="hit ratio"] b').endswith("%")
    assert stroke_pixels(browser, "requests", (0x25, 0x63, 0xEB)) > 50
    assert text(browser, f"{requests_plot} .now") not in ("", "now –")
    assert not browser.find_element(By.ID, "vendor-missing").is_displayed()
    assert severe_console_errors(browser) == []


def stroke_pixels(driver, plot: str, rgb: tuple[int, int, int]) -> int:
    """Opaque pixels of the series' line colour on a plot's canvas: the data was drawn."""
    return driver.execute_script(
        """
        const [plot, r, g, b] = arguments;
        const canvas = document.querySelector(`.plot[data-plot="${plot}"] canvas`);
        if (!canvas || !canvas.width || !canvas.height) return 0;
        const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
          if (px[i + 3] > 200 && Math.abs(px[i] - r) + Math.abs(px[i + 1] - g)
              + Math.abs(px[i + 2] - b) < 60) n++;
        }
        return n;
    """,
        plot,
        *rgb,
    )


def test_purge_form_shows_seq_and_acknowledgements(browser, control):
    log_in(browser, control.url)
    go(browser, "purge")
    wait_for(
        browser,
        lambda: (
            "shop"
            in [
                o.get_attribute("value")
                for o in browser.find_elements(By.CSS_SELECTOR, "#purge-service option")
            ]
        ),
        "services in the purge form",
    )
    Select(browser.find_element(By.ID, "purge-service")).select_by_value("shop")
    browser.find_element(By.ID, "purge-urls").send_keys(
        "http://shop.test/a.css\nhttp://shop.test/b.js"
    )
    browser.find_element(By.ID, "purge-tags").send_keys("products")
    browser.find_element(By.ID, "purge-soft").click()
    browser.find_element(By.ID, "purge-submit").click()

    wait_for(browser, lambda: text(browser, ".job .seq"), "the purge's sequence number")
    seq = int(text(browser, ".job .seq").lstrip("#"))
    status = expect(control.admin.get(f"/api/v1/purge/{seq}"), 200)
    assert NODE in status["pending"]
    assert "soft" in text(browser, ".job h2") and "shop" in text(browser, ".job h2")
    assert "url http://shop.test/a.css" in text(browser, ".job .targets")
    wait_for(browser, lambda: "0/1 nodes acknowledged" in text(browser, ".job .state"), "0/1 acks")
    assert f"pending: {NODE}" in text(browser, ".job .names")

    expect(control.node.post("/api/v1/nodes/self/purges/ack", json={"seq": seq}), 200)
    wait_for(
        browser,
        lambda: "1/1 nodes acknowledged — complete" in text(browser, ".job .state"),
        "the node's acknowledgement",
    )
    assert f"acked: {NODE}" in text(browser, ".job .names")

    # the API's validation error is shown as is
    browser.find_element(By.ID, "purge-urls").send_keys("http://unknown.test/x")
    browser.find_element(By.ID, "purge-submit").click()
    error = browser.find_element(By.ID, "purge-error")
    wait_for(browser, error.is_displayed, "purge error")
    assert error.text.startswith("400: ")


def test_without_vendored_uplot_the_page_says_to_run_make_install(browser, control):
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/ui/vendor/*"]})
    try:
        log_in(browser, control.url)
        banner = browser.find_element(By.ID, "vendor-missing")
        assert banner.is_displayed() and "make install" in banner.text
        go(browser, "stats")
        wait_for(
            browser,
            lambda: text(browser, '[data-total="requests"] b') not in ("", "0"),
            "the numbers without plots",
        )
        assert browser.find_elements(By.CSS_SELECTOR, ".plot canvas") == []
        go(browser, "fleet")
        wait_for(
            browser,
            lambda: text(browser, f'#fleet-table tr[data-node="{NODE}"]'),
            "the fleet still works",
        )
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        browser.execute_cdp_cmd("Network.disable", {})
