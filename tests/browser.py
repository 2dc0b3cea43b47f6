"""Debian's Chromium, headless, for the tests that look at the status page in a real browser:
the DOM after the page's scripts ran (``dump_dom``), a screenshot, and what the page shows
(``PageReading``: the data attributes it puts on its charts and device rows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

# No network beyond the page, no first-run work, no GPU: what a CI machine without a display runs.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    """The browser's path; skipped where it is not installed, except in CI (env CI set), where it
    fails: ``bash scripts/setup.sh dev`` installs it when run as root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "chromium is not installed (apt-get install chromium); the status page's browser tests need it"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message}, and CI is set: install it in the CI image", pytrace=False)
    pytest.skip(message)


def _run(url: str, *args: str, budget_ms: int = 4000) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                               *args, url], capture_output=True, text=True, timeout=120)


def dump_dom(url: str) -> str:
    proc = _run(url, "--dump-dom")
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 760)) -> Path:
    proc = _run(url, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}")
    assert proc.returncode == 0 and path.is_file(), proc.stderr[-2000:]
    return path


class PageReading(HTMLParser):
    """The numbers the status page shows: each element's attributes by id, and each device row's
    cells (``data-field`` -> ``data-value``)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.devices: dict[str, dict[str, str]] = {}
        self._row: dict[str, str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "tr" and "data-device" in a:
            self._row = self.devices.setdefault(a["data-device"], {})
        elif tag == "td" and self._row is not None and "data-field" in a:
            self._row[a["data-field"]] = a.get("data-value", "")

    def series(self, chart: str, name: str) -> list[float]:
        text = self.by_id[chart].get(f"data-{name}", "")
        return [float(v) for v in text.split(",")] if text else []
