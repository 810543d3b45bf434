"""A real headless browser for page tests: Debian's Chromium driven through chromedriver (Selenium).

The flags keep it off the network (this machine has none beyond loopback and would refuse the
browser's own background connections) and away from any profile but a fresh one; the browser
console is captured so a test can assert the page logged no errors.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} not found: apt-get install chromium chromium-driver (scripts/test does as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed: pip install -e '.[test]'"
    return None


@contextmanager
def chromium(*, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile and the browser console logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sidemesh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's SEVERE entries so far (reading them empties the browser's buffer)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
