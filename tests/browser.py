"""Headless Chromium for the browser tests (dashboard, player), started one way.

The driver path is explicit, so Selenium Manager never tries to download anything; each
browser gets its own profile directory, removed when it closes; the console log is kept so
a timeout can show what the page printed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def missing() -> str | None:
    """Why no browser test can run here (None: they can)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return "headless Chromium missing: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing: pip install selenium"
    return None


@contextlib.contextmanager
def headless_chromium(extra_flags: Sequence[str] = ()) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="verge-chromium-")
    for flag in [*BASE_FLAGS, *extra_flags, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition: Callable, what: str, timeout: float = 15.0,
             poll: float = 0.05):
    """condition()'s first true value; on timeout an AssertionError with the page's text and
    its console log."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=poll).until(lambda d: condition())
    except TimeoutException:
        logs = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        body = driver.execute_script("return document.body.innerText")
        raise AssertionError(
            f"timed out waiting for {what}; page says:\n{body}\nconsole:\n{logs}"
        ) from None
